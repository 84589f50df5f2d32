"""The ``single`` kind: one label per example (batches ``{"x", "y"}``): top-1 accuracy; the
trainer's picture is the inputs above their reconstructions."""

from __future__ import annotations

import torch

from capsctl.device import autocast
from capsctl.tasks.base import Task


class SingleTask(Task):
    name = "single"

    def model_labels(self, batch: dict) -> torch.Tensor:
        return batch["y"]

    def count_correct(self, scores_BJ: torch.Tensor, batch: dict) -> torch.Tensor:
        """Top-1 = y."""
        return (scores_BJ.argmax(dim=1) == batch["y"]).sum()

    def picture(self, model, batch: dict, device: torch.device,
                precision: str) -> torch.Tensor:
        """Inputs above the reconstructions from the predicted class capsules."""
        from capsctl.inspection.figures import pair_grid

        with autocast(device, precision):
            out = model(batch["x"])
        return pair_grid(batch["x"], out["recon"])


TASK = SingleTask()
