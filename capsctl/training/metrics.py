"""The training metrics between two logged rows: sums kept on the device (no host sync per
step), summed over ranks when read, and the check that every loss was finite.

Accumulators (device tensors; T = the number of loss terms, in the loss function's order):
  sum        (T,) float  loss terms summed over the steps taken
  bad_terms  (T,) float  the loss terms of the first step whose total was not finite
  correct    ()   long   correctly classified examples
  count      ()   long   examples seen in the steps taken
  steps      ()   long   steps taken
  skipped    ()   long   batches dropped for a non-finite loss (train.nonfinite=skip)
  bad_step   ()   long   the first step with a non-finite total, -1 when none
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from capsctl.distributed import ONE_PROCESS, Group, all_max, all_sum
from capsctl.errors import TrainingError
from capsctl.tasks.base import Task


class Metrics:
    """Sums of the loss terms and accuracy counts of the current logging interval."""

    def __init__(self, device: torch.device, group: Group = ONE_PROCESS):
        self.device, self.group = device, group
        self.names: list[str] = []                # the loss terms, "total" last
        self.acc: dict[str, torch.Tensor] = {}
        self.images = 0                           # this rank's images since the last row
        self.clock = time.perf_counter()

    def load(self, saved: dict, main: bool) -> None:
        """Continue from a checkpoint's ``log_accum`` (the sums over all ranks): rank 0 carries
        them on, the others start from zero with the same keys (collectives need the same
        shapes)."""
        self.acc = {k: v.to(self.device) if main else (torch.full_like(v, -1) if k == "bad_step"
                                                       else torch.zeros_like(v)).to(self.device)
                    for k, v in saved.items()}

    def _start(self, terms_T: torch.Tensor) -> None:
        long = {"device": self.device, "dtype": torch.long}
        self.acc.update(sum=torch.zeros_like(terms_T), bad_terms=torch.zeros_like(terms_T),
                        correct=torch.zeros((), **long), count=torch.zeros((), **long),
                        steps=torch.zeros((), **long), skipped=torch.zeros((), **long),
                        bad_step=torch.full((), -1, **long))

    def add(self, losses: dict, scores_BJ: torch.Tensor, batch: dict, task: Task, step: int,
            skipped: bool) -> None:
        """Count step ``step`` (0-based): its loss terms and correct examples, or a skip."""
        self.names = self.names or list(losses)
        terms_T = torch.stack([losses[n].detach().float() for n in self.names])
        if "sum" not in self.acc:
            self._start(terms_T)
        a = self.acc
        if skipped:
            a["skipped"] += 1
        else:
            a["sum"] += terms_T
            a["correct"] += task.count_correct(scores_BJ.detach(), batch)  # a pair: exact
            a["count"] += batch["y"].shape[0]
            a["steps"] += 1
            first_bad = (a["bad_step"] < 0) & ~torch.isfinite(terms_T[-1])
            a["bad_step"] = torch.where(first_bad, step, a["bad_step"])
            a["bad_terms"] = torch.where(first_bad, terms_T, a["bad_terms"])
        self.images += batch["y"].shape[0]

    def reduced(self) -> dict:
        """Copies of the accumulators summed over ranks (bad_step: the max). Collective."""
        out = {k: v.detach().clone() for k, v in self.acc.items()}
        if self.group.enabled:
            for k, v in out.items():
                (all_max if k == "bad_step" else all_sum)(v, self.group)
        return out

    def check_finite(self, keep: Path) -> None:
        """Raise TrainingError naming the first step with a non-finite loss and its terms
        (``keep``: the checkpoint left in place). Collective under torchrun."""
        a = self.acc
        if self.group.enabled and "bad_step" in a:
            a.update({k: v for k, v in self.reduced().items() if k in ("bad_step", "bad_terms")})
        if "bad_step" in a and int(a["bad_step"]) >= 0:
            terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names,
                                                               a["bad_terms"].tolist()))
            raise TrainingError(f"non-finite loss at step {int(a['bad_step'])} ({terms}); "
                                f"stopped, the last good checkpoint {keep} is kept - "
                                "lower optim.lr or check the data")

    def row(self, lr: float, epoch: int) -> dict:
        """The logged values of the interval: mean loss terms over the steps taken, accuracy,
        ``lr``, images per second over all ranks, ``epoch``, and the skipped batches when there
        were any. Collective; restarts the throughput clock."""
        now = time.perf_counter()
        ips = self.images * self.group.world / max(now - self.clock, 1e-9)
        self.clock, self.images = now, 0
        a = self.reduced()
        means = (a["sum"] / a["steps"].clamp(min=1)).tolist()
        row = {f"train/loss_{n}": v for n, v in zip(self.names, means)}
        row.update({"train/accuracy": int(a["correct"]) / max(int(a["count"]), 1),
                    "lr": lr, "images_per_s": ips, "epoch": epoch})
        if int(a.get("skipped", 0)):
            row["train/skipped_nonfinite"] = int(a["skipped"])
        return row

    def clear(self) -> None:
        """Start the next interval."""
        self.acc.clear()
