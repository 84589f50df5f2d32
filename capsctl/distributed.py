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


SINGLE = Group()


def env_group() -> Group:
    """The process's place in a torchrun job (SINGLE when not started by torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Group(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(device_name: str) -> tuple[Group, str]:
    """Join the torchrun job (if any). Returns the group and the device name this rank uses."""
    group = env_group()
    if not group.enabled:
        return group, device_name
    use_cuda = device_name.startswith("cuda") or (device_name == "auto"
                                                  and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise CapsctlError("--device cuda under torchrun: CUDA is not available here")
        device_name = f"cuda:{group.local_rank}"
        torch.cuda.set_device(group.local_rank)
    else:
        device_name = "cpu"
    timeout = timedelta(seconds=float(os.environ.get("CAPSCTL_DIST_TIMEOUT",
                                                     DEFAULT_TIMEOUT_S)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return group, device_name


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
