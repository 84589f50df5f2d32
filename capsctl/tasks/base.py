"""What a task kind declares and does (see capsctl/tasks/__init__.py). Subclass ``Task`` in
``capsctl/tasks/<kind>.py`` and set ``TASK = <Subclass>()`` there.

Shape legend: B batch, J classes, L labels per example.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Task:
    """One task kind.

    ``name``: the kind (its module's name). ``label_keys``: the batch keys holding labels, in
    the order the model is given them. ``one_label``: every example has exactly one class
    (``"y"``): a confusion matrix means something and examples can be picked by class.
    ``metrics``: the task's own evaluation metrics beyond accuracy, the names ``evaluate``
    reports them under (summed by ``metric_sums``, divided by the examples seen).
    ``picture_tag``: the TensorBoard tag of the trainer's picture (``picture``);
    ``picture_mask``: which capsules it reconstructs from, in words."""

    name: str = ""
    label_keys: tuple[str, ...] = ("y",)
    one_label: bool = True
    metrics: tuple[str, ...] = ()
    picture_tag: str = "reconstructions"
    picture_mask: str = "predicted"

    def model_labels(self, batch: dict) -> torch.Tensor:
        """The labels the model is given in training: (B,) for one label, else (B, L)."""
        raise NotImplementedError

    def eval_labels(self, batch: dict, with_loss: bool) -> torch.Tensor | None:
        """The labels the model is given when evaluated (``with_loss``: the loss terms are
        measured too); None: it reconstructs from its own prediction."""
        return None

    def count_correct(self, scores_BJ: torch.Tensor, batch: dict) -> torch.Tensor:
        """Correct examples of a batch, a device scalar (no host sync)."""
        raise NotImplementedError

    def metric_sums(self, scores_BJ: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's sums of ``metrics`` (device scalars)."""
        return {}

    def targets(self, batch: dict, num_classes: int) -> torch.Tensor:
        """(B, J) int64: 1 for every class present in an example (its labels), else 0."""
        onehot = [F.one_hot(batch[k], num_classes) for k in self.label_keys]
        return sum(onehot[1:], onehot[0]).clamp(max=1)

    def picture(self, model, batch: dict, device: torch.device,
                precision: str) -> torch.Tensor:
        """What the model makes of ``batch`` as a (3, H, W) picture in [0, 1] (a model with a
        decoder, in eval mode)."""
        raise NotImplementedError

    def synthetic_batch(self, shape: tuple[int, ...], num_classes: int,
                        g: torch.Generator) -> dict[str, torch.Tensor]:
        """A random batch of images of ``shape`` (B, C, H, W) in [0, 1] and labels, on the CPU,
        drawn from ``g`` (``capsctl bench``)."""
        return {"x": torch.rand(shape, generator=g),
                "y": torch.randint(0, num_classes, (shape[0],), generator=g)}
