"""Data-parallel training on PyTorch's own engine: torch.distributed + DDP, started by torchrun.

One process per device. ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; without them capsctl
runs as a single process and nothing here does anything. NCCL on CUDA, gloo on CPU.

The global batch is ``train.batch_size``, split evenly across ranks: every rank draws the same
global batch of the same global permutation (and the same shifts) and keeps its contiguous
slice, so N processes compute exactly the batches one process would. Evaluation shards the
batches across ranks and sums the counts.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from capsctl.errors import CapsctlError

DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = Group()   # one process, no torchrun (a task kind is capsctl.tasks.SINGLE)


ENV_HINT = "torchrun sets it; unset it to run one process, or start capsctl with torchrun"


def _env_int(name: str, default: int, low: int, high: int | None = None) -> int:
    """The whole number in environment variable ``name`` (``default`` when unset), within
    [low, high]; a one-line CapsctlError otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text, 10)
    except ValueError:
        raise CapsctlError(f"environment variable {name}={text[:40]!r} is not a whole number; "
                           f"{ENV_HINT}") from None
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise CapsctlError(f"environment variable {name}={value} must be {bound}; {ENV_HINT}")
    return value


def env_group() -> Group:
    """The process's place in a torchrun job (ONE_PROCESS when not started by torchrun). A
    malformed WORLD_SIZE, RANK or LOCAL_RANK, or a job of several processes without
    MASTER_ADDR and MASTER_PORT (where torch would look for its peers), is one line."""
    world = _env_int("WORLD_SIZE", 1, 1, 1 << 20)
    if world <= 1:
        return ONE_PROCESS
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k, "").strip()]
    if missing:
        raise CapsctlError(f"WORLD_SIZE={world} but {' and '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not set: the processes "
                           f"cannot find each other; {ENV_HINT}")
    _env_int("MASTER_PORT", 0, 1, 65535)
    return Group(_env_int("RANK", 0, 0, world - 1), world, _env_int("LOCAL_RANK", 0, 0))


def dist_timeout() -> timedelta:
    """The start-up and collective timeout: $CAPSCTL_DIST_TIMEOUT seconds (default 300), a
    finite number above 0; anything else is one line."""
    text = os.environ.get("CAPSCTL_DIST_TIMEOUT", "").strip()
    if not text:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (0 < seconds <= 10 ** 7):   # NaN fails too
        raise CapsctlError(f"environment variable CAPSCTL_DIST_TIMEOUT={text[:40]!r} must be "
                           f"a number of seconds above 0 (at most 10^7; default "
                           f"{DEFAULT_TIMEOUT_S}); fix or unset it")
    return timedelta(seconds=seconds)


def init(device_name: str) -> tuple[Group, str]:
    """Join the torchrun job (if any). Returns the group and the device name this rank uses."""
    group = env_group()
    if not group.enabled:
        return group, device_name
    timeout = dist_timeout()
    use_cuda = device_name.startswith("cuda") or (device_name == "auto"
                                                  and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise CapsctlError("--device cuda under torchrun: CUDA is not available here")
        device_name = f"cuda:{group.local_rank}"
        torch.cuda.set_device(group.local_rank)
    else:
        device_name = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return group, device_name


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        import gc; gc.collect()


def local_batch_size(global_batch: int, group: Group) -> int:
    if global_batch % group.world:
        raise CapsctlError(f"train.batch_size={global_batch} does not split evenly across "
                           f"{group.world} processes; use a multiple of {group.world}")
    return global_batch // group.world


def all_sum(t: torch.Tensor, group: Group) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op for one process)."""
    if group.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_max(t: torch.Tensor, group: Group) -> torch.Tensor:
    if group.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(group: Group) -> None:
    if group.enabled:
        dist.barrier()


def broadcast_object(obj, group: Group):
    """Rank 0's value of ``obj`` on every rank."""
    if not group.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(fn, group: Group):
    """Run ``fn`` on rank 0 only and hand its result, or its one-line error, to every rank."""
    result, error = None, None
    if group.is_main:
        try:
            result = fn()
        except CapsctlError as e:
            error = str(e)
    result, error = broadcast_object((result, error), group)
    if error is not None:
        raise CapsctlError(error)
    return result


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """The command that re-runs ``capsctl`` ``argv`` under torchrun with ``nproc`` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "capsctl", *argv]


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out
