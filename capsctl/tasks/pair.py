"""The ``pair`` kind: two overlapping digits per example (MultiMNIST; batches ``{"x", "y",
"y2", "x_a", "x_b"}``: the composite, the two labels, the two placed source digits).

Correct = the exact pair: the two highest scores (longest capsules) are the two labels (the
paper's metric). Its own metrics: at-least-one (one of the two highest is a label) and the
bounding-box overlap of the two digits (of the smaller box, and intersection over union). The
model is given both labels, (B, 2), so that each digit gets its own reconstruction; the
trainer's picture is the paper's Figure 5 (the segmentation picture).

Shape legend: B batch, J classes.
"""

from __future__ import annotations

import torch

from capsctl.tasks.base import Task


def pair_hits(scores_BJ: torch.Tensor, y_B: torch.Tensor, y2_B: torch.Tensor):
    """(B,) bools each: ``exact`` when the two highest scores are exactly the two labels,
    ``at_least_one`` when one of them is a label."""
    top2_B2 = scores_BJ.topk(2, dim=1).indices
    hit_B2 = (top2_B2 == y_B[:, None]) | (top2_B2 == y2_B[:, None])
    return hit_B2.all(1), hit_B2.any(1)


def bounding_boxes(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) or (B, H, W) -> (B, 4) int64 boxes (top, left, bottom, right), inclusive,
    of the non-zero pixels (an empty image gives an empty box of area 0)."""
    ink = images.reshape(images.shape[0], images.shape[-2], images.shape[-1]) > 0
    rows_BH, cols_BW = ink.any(2), ink.any(1)

    def first_last(m: torch.Tensor):
        ar = torch.arange(m.shape[1], device=m.device)
        first = torch.where(m, ar, m.shape[1]).min(1).values
        last = torch.where(m, ar, -1).max(1).values
        return first, last

    top, bottom = first_last(rows_BH)
    left, right = first_last(cols_BW)
    return torch.stack([top, left, bottom, right], 1)


def _area(top, left, bottom, right):
    return (bottom - top + 1).clamp(min=0) * (right - left + 1).clamp(min=0)


def bbox_overlap(x_a: torch.Tensor, x_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pair bounding-box overlap of the two placed digits, (B,) each:

    ``of_smaller`` = intersection / area of the smaller box (how much of one digit's box lies
    inside the other's), ``iou`` = intersection / union.
    """
    a, b = bounding_boxes(x_a), bounding_boxes(x_b)
    inter = _area(torch.maximum(a[:, 0], b[:, 0]), torch.maximum(a[:, 1], b[:, 1]),
                  torch.minimum(a[:, 2], b[:, 2]), torch.minimum(a[:, 3], b[:, 3])).double()
    area_a, area_b = _area(*a.unbind(1)).double(), _area(*b.unbind(1)).double()
    union = area_a + area_b - inter
    return {"of_smaller": inter / torch.minimum(area_a, area_b).clamp(min=1),
            "iou": inter / union.clamp(min=1)}


class PairTask(Task):
    name = "pair"
    label_keys = ("y", "y2")
    one_label = False
    metrics = ("at_least_one_accuracy", "bbox_overlap_of_smaller", "bbox_overlap_iou")
    picture_tag = "segmentation"
    picture_mask = "top-2 and labels"

    def model_labels(self, batch: dict) -> torch.Tensor:
        """(B, 2): ``[y, y2]``."""
        return torch.stack([batch["y"], batch["y2"]], 1)

    def eval_labels(self, batch: dict, with_loss: bool) -> torch.Tensor | None:
        """Both labels when the loss is measured: it compares each digit's reconstruction
        with that digit's own image."""
        return self.model_labels(batch) if with_loss else None

    def count_correct(self, scores_BJ: torch.Tensor, batch: dict) -> torch.Tensor:
        """The exact pair."""
        return pair_hits(scores_BJ, batch["y"], batch["y2"])[0].sum()

    def metric_sums(self, scores_BJ: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        one_B = pair_hits(scores_BJ, batch["y"], batch["y2"])[1]
        sums = {"at_least_one_accuracy": one_B.sum()}
        for k, v in bbox_overlap(batch["x_a"], batch["x_b"]).items():
            sums[f"bbox_overlap_{k}"] = v.sum()
        return sums

    def picture(self, model, batch: dict, device: torch.device,
                precision: str) -> torch.Tensor:
        """The segmentation picture (inspection/figures.py): the two digits reconstructed from
        the two longest capsules, overlaid in red and green (fp32)."""
        from capsctl.inspection.figures import segmentation_grid

        return segmentation_grid(model, batch["x"], self.model_labels(batch), device)

    def synthetic_batch(self, shape: tuple[int, ...], num_classes: int,
                        g: torch.Generator) -> dict[str, torch.Tensor]:
        """Two distinct labels and the two source images besides the composite."""
        b = super().synthetic_batch(shape, num_classes, g)
        b["y2"] = (b["y"] + torch.randint(1, num_classes, (shape[0],), generator=g)) % num_classes
        b["x_a"], b["x_b"] = torch.rand(shape, generator=g), torch.rand(shape, generator=g)
        return b


TASK = PairTask()
