"""What a training checkpoint holds (``TrainState``) and the checks a resume makes on it.

The checkpoint dict (checkpoint.save adds ``format_version``):
  model, config, class_names (when the dataset knows them), step, epoch, batch_in_epoch,
  val_step, best_val_accuracy, best_step, rng
  and, in last.pt only (resumable): optimizer, log_accum, metrics_bytes

``epoch`` and ``batch_in_epoch`` name the next batch to train on, so ``step == epoch *
steps_per_epoch + batch_in_epoch``. ``val_step`` is the step of the latest validation (-1:
none yet): the validation of a position is pending while ``val_step != step`` and the position
is an epoch's end (``batch_in_epoch == steps_per_epoch``) or the run's last step. Checkpoints
made before ``val_step`` existed are read as validated except at an epoch's end.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from capsctl.errors import CheckpointError
from capsctl.training.metrics import Metrics

RESUME_KEYS = ("optimizer", "step", "epoch", "batch_in_epoch", "best_val_accuracy",
               "best_step", "rng")


def rng_state(device: torch.device) -> dict:
    """The generators a resume must restore: the CPU's, and the device's on CUDA."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainState:
    """The model, its optimizer, the position in the run, the best validation result so far
    and the metrics of the current logging interval."""

    def __init__(self, model: torch.nn.Module, opt, config: dict, metrics: Metrics,
                 device: torch.device, class_names: list[str] | None = None):
        self.model, self.opt, self.config, self.metrics = model, opt, config, metrics
        self.device, self.class_names = device, class_names
        self.step = 0                   # optimizer steps taken (skipped batches included)
        self.epoch = 0
        self.batch_in_epoch = 0
        self.val_step = -1              # the step of the latest validation
        self.best_val_accuracy = -1.0
        self.best_step = -1
        self.metrics_bytes: int | None = None  # metrics.jsonl's size at the resumed save

    def state_dict(self, with_optimizer: bool = True, metrics_bytes: int | None = None) -> dict:
        """The checkpoint dict; ``with_optimizer``: resumable (optimizer and the interval's
        metrics, reduced over ranks: collective under torchrun)."""
        s = {"model": self.model.state_dict(), "config": self.config, "step": self.step,
             "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
             "val_step": self.val_step, "best_val_accuracy": self.best_val_accuracy,
             "best_step": self.best_step, "rng": rng_state(self.device)}
        if self.class_names is not None:
            s["class_names"] = list(self.class_names)
        if with_optimizer:
            s["optimizer"] = self.opt.state_dict()
            s["log_accum"] = self.metrics.reduced()
        if metrics_bytes is not None:
            s["metrics_bytes"] = metrics_bytes
        return s

    def load_state_dict(self, state: dict, steps_per_epoch: int, source: Path,
                        main: bool = True, n_terms: int | None = None) -> None:
        """Resume from ``state`` (read from ``source``, named in errors): checks every field
        first (a one-line CheckpointError, nothing changed), then restores everything, the
        random generators included."""
        check_resumable(state, steps_per_epoch, source)
        check_tensors(state, self.model, self.opt, source, n_terms)
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"], self.device)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{source}: does not match the configured model "
                                  f"({str(e).splitlines()[0][:160]})") from None
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.val_step = val_step_of(state, steps_per_epoch)
        self.best_val_accuracy, self.best_step = state["best_val_accuracy"], state["best_step"]
        self.metrics.load(state.get("log_accum") or {}, main)
        self.metrics_bytes = state.get("metrics_bytes")


def val_step_of(state: dict, steps_per_epoch: int) -> int:
    """The stored ``val_step``; for older checkpoints: pending at an epoch's end, else done."""
    if "val_step" in state:
        return state["val_step"]
    return -1 if state["batch_in_epoch"] == steps_per_epoch else state["step"]


def _bad(source: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: corrupt training state ({what})")


def check_resumable(state: dict, steps_per_epoch: int, source: Path) -> None:
    """Raise CheckpointError unless ``state``'s plain fields (position, best result,
    metrics_bytes, class_names) are present, of their types and consistent."""
    missing = [k for k in RESUME_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{source}: not a resumable checkpoint (no {', '.join(missing)}; "
                              "it holds weights only) - start a new run instead")
    ints = ("step", "epoch", "batch_in_epoch", "best_step") + (
        ("val_step",) if "val_step" in state else ())
    invalid = [k for k in ints if type(state[k]) is not int or state[k] < -1]
    acc = state["best_val_accuracy"]
    if type(acc) not in (int, float) or not (math.isfinite(acc) and -1 <= acc <= 1):
        invalid.append("best_val_accuracy")
    if invalid:
        raise _bad(source, f"{', '.join(invalid)} out of range or of the wrong type")
    step, epoch, k = state["step"], state["epoch"], state["batch_in_epoch"]
    if not 0 <= k <= steps_per_epoch or epoch < 0 or step != epoch * steps_per_epoch + k:
        raise _bad(source, f"step {step} is not epoch {epoch} x {steps_per_epoch} steps + "
                           f"batch_in_epoch {k}")
    if not -1 <= state["best_step"] <= step or not -1 <= val_step_of(state, steps_per_epoch) \
            <= step:
        raise _bad(source, "best_step or val_step after step")
    mb = state.get("metrics_bytes")
    if mb is not None and (type(mb) is not int or mb < 0):
        raise _bad(source, "metrics_bytes is not a size")
    names = state.get("class_names")
    if names is not None and (not isinstance(names, list)
                              or not all(isinstance(n, str) for n in names)):
        raise _bad(source, "class_names is not a list of names")


def _tensor_like(v, shape, dtype_kind: str | None = None) -> bool:
    """Whether ``v`` is a tensor of ``shape`` (and floating point when asked)."""
    return (isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(shape)
            and (dtype_kind != "float" or v.is_floating_point()))


def check_tensors(state: dict, model: torch.nn.Module, opt, source: Path,
                  n_terms: int | None = None) -> None:
    """Raise CheckpointError unless the weights, the optimizer state, the rng state and the
    logging sums (``n_terms`` loss terms, when known) are tensors of the shapes this model and
    optimizer use."""
    weights, own = state["model"], model.state_dict()
    if not isinstance(weights, dict) or set(weights) != set(own) or not all(
            _tensor_like(weights[n], t.shape) for n, t in own.items()):
        raise CheckpointError(f"{source}: does not match the configured model (the weights' "
                              "names or shapes differ)")
    _check_optimizer(state["optimizer"], opt, source)
    rng = state["rng"]
    if not isinstance(rng, dict) or not _tensor_like(rng.get("cpu"), torch.get_rng_state().shape) \
            or rng["cpu"].dtype != torch.uint8:
        raise _bad(source, "rng is not a generator state")
    if "cuda" in rng and (not isinstance(rng["cuda"], torch.Tensor)
                          or rng["cuda"].dtype != torch.uint8 or rng["cuda"].dim() != 1):
        raise _bad(source, "rng cuda is not a generator state")
    _check_log_accum(state.get("log_accum"), source, n_terms)


def _check_optimizer(sd, opt, source: Path) -> None:
    """The optimizer state: one group of this model's parameters, each state entry a float
    ``step`` scalar and two moments of its parameter's shape, finite hyperparameters."""
    params = [p for g in opt.param_groups for p in g["params"]]
    groups = sd.get("param_groups") if isinstance(sd, dict) else None
    states = sd.get("state") if isinstance(sd, dict) else None
    if (not isinstance(groups, list) or not isinstance(states, dict)
            or len(groups) != len(opt.param_groups)
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                       and all(type(i) is int for i in g["params"]) for g in groups)
            or sorted(i for g in groups for i in g["params"]) != list(range(len(params)))):
        raise _bad(source, "the optimizer state does not list this model's parameters")
    for g in groups:
        for key in ("lr", "eps", "weight_decay"):
            v = g.get(key)
            if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
                raise _bad(source, f"optimizer {key} {v!r}")
        betas = g.get("betas")
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(type(b) in (int, float) and 0 <= b < 1 for b in betas)):
            raise _bad(source, "optimizer betas")
    for i, s in states.items():
        if type(i) is not int or not 0 <= i < len(params) or not isinstance(s, dict):
            raise _bad(source, f"optimizer state {i!r}")
        shape = params[i].shape
        if not (_tensor_like(s.get("step"), (), "float") and _tensor_like(
                s.get("exp_avg"), shape, "float") and _tensor_like(s.get("exp_avg_sq"), shape,
                                                                     "float")):
            raise _bad(source, f"optimizer state {i}: not a step and two moments of shape "
                               f"{tuple(shape)}")


LOG_SHAPES = {"correct": (), "count": (), "steps": (), "skipped": (), "bad_step": ()}


def _check_log_accum(acc, source: Path, n_terms: int | None) -> None:
    """The interval's sums: empty, or the Metrics accumulators (sum and bad_terms of one
    length, the counters scalars)."""
    if acc is None or acc == {}:
        return
    keys = set(LOG_SHAPES) | {"sum", "bad_terms"}
    if not isinstance(acc, dict) or set(acc) != keys or not all(
            isinstance(v, torch.Tensor) for v in acc.values()):
        raise _bad(source, "log_accum is not the metrics accumulators")
    t = acc["sum"].shape
    if (acc["sum"].dim() != 1 or acc["bad_terms"].shape != t
            or not acc["sum"].is_floating_point() or not acc["bad_terms"].is_floating_point()
            or any(acc[k].shape != () or acc[k].is_floating_point() for k in LOG_SHAPES)
            or n_terms is not None and t[0] != n_terms):
        raise _bad(source, "log_accum holds tensors of the wrong shape or type")
