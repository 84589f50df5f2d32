"""One training step, the one function both the training loop and ``capsctl bench`` run; and
the optimizer and learning-rate schedule it steps with."""

from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import record_function

from capsctl import optim
from capsctl.config import Config
from capsctl.device import autocast
from capsctl.tasks.base import Task


def build_optimizer(model: torch.nn.Module, cfg: Config):
    """Adam with the config's settings; the fused kernel (one pass over each parameter), see
    capsctl/optim.py. Returns the optimizer."""
    o = cfg.optim
    return optim.build(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                       weight_decay=o.weight_decay)


def lr_at(cfg: Config, step: int) -> float:
    """The authors' schedule: lr * decay^(step / decay_steps), smooth, floored at min_lr."""
    o = cfg.optim
    return max(o.lr * o.lr_decay ** (step / o.lr_decay_steps), o.min_lr)


def train_step(step_model: Callable, opt, batch: dict, task: Task, losses_of: Callable,
               lr: float, step: int, precision: str, device: torch.device,
               skip_nonfinite: bool = False) -> tuple[dict, dict, bool]:
    """Set the learning rate to ``lr``, run the (autocast) forward of ``step_model`` on
    ``batch`` with the labels ``task`` gives it, the loss at ``step``, backward and the
    optimizer step.

    ``skip_nonfinite`` (train.nonfinite=skip): a batch whose total loss is not finite takes no
    backward and no optimizer step (costs a host sync per step, paid only when asked for).
    Returns (the loss terms, the model output, whether the batch was skipped).
    """
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast(device, precision), record_function("capsctl forward"):
        out = step_model(batch["x"], task.model_labels(batch))  # (B, 2) labels for pairs
    with record_function("capsctl loss"):
        losses = losses_of(out, batch, step)
    opt.zero_grad(set_to_none=True)
    skipped = skip_nonfinite and not bool(torch.isfinite(losses["total"]))
    if not skipped:
        with record_function("capsctl backward"):
            losses["total"].backward()
        with record_function("capsctl optimizer"):
            opt.step()
    return losses, out, skipped
