"""Device-resident datasets: the whole split is a uint8 tensor on the training device and
batches are cut by indexing and shifted there.

A training stream is a pure function of (seed, epoch, step): the batch order of epoch ``e`` is a
permutation seeded by (seed, e) and the shifts of step ``t`` are drawn from a generator seeded by
(seed, t). Resuming at any step therefore replays exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from capsctl.data.augment import generator, place, random_offsets, to_float
from capsctl.tasks import SINGLE

STREAM_ORDER, STREAM_SHIFT, STREAM_EVAL, STREAM_AUGMENT = 1, 2, 3, 4


@dataclass
class ImageSet:
    """uint8 images (N, H, W) and int64 labels (N,) on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device


@dataclass
class DataBundle:
    """A training dataset as built: its stream, validation source (None when data.val_size is
    0) and test source, the image side, and the task kind (``data/registry.py``)."""

    train: "TrainStream"
    val: "EvalSource | None"
    test: "EvalSource"
    input_size: int
    task: str


class TrainStream:
    """Shuffled, shifted training batches: ``batch(epoch, k, step)``; drops the last partial batch.
    ``augment`` (instead of the shift): a callable ``(uint8 (B, H, W), generator) -> float32
    (B, 1, H, W)`` given a generator seeded by (seed, step), e.g.
    ``efficient_capsnet_augment.EfficientCapsNetAugment``."""

    task = SINGLE

    def __init__(self, data: ImageSet, batch_size: int, seed: int, shift: int = 0,
                 canvas_pad: int = 0, augment=None):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.shift, self.canvas_pad, self.augment = shift, canvas_pad, augment
        self._perm_epoch, self._perm = None, None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = generator(torch.device("cpu"), self.seed, STREAM_ORDER, epoch)
            self._perm = torch.randperm(len(self.data), generator=g).to(self.data.device)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, epoch: int, k: int, step: int) -> dict[str, torch.Tensor]:
        idx = self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        images = self.data.images[idx]
        if self.augment is not None:
            g = generator(self.data.device, self.seed, STREAM_AUGMENT, step)
            return {"x": self.augment(images, g), "y": self.data.labels[idx]}
        offsets = None
        if self.shift:
            g = generator(self.data.device, self.seed, STREAM_SHIFT, step)
            offsets = random_offsets(len(idx), self.shift, g, self.data.device)
        x = to_float(place(images, offsets, self.canvas_pad, self.shift))
        return {"x": x, "y": self.data.labels[idx]}


class IndexedSource:
    """An evaluation source over an ImageSet ``data``: fixed, unshuffled batches in index order;
    subclasses say what ``get(idx)`` makes of the stored images."""

    task = SINGLE
    default_limit = None
    data: ImageSet

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict]:
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield self.get(torch.arange(start, min(start + batch_size, n),
                                        device=self.data.device))

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class EvalSource(IndexedSource):
    """Fixed, unshuffled evaluation batches; optional placement drawn from a fixed seed.

    What every evaluation source declares (MultiMNIST's, smallNORB's, affNIST's too): ``task``,
    ``name``, ``default_limit`` (examples evaluated when no limit is given; None = all),
    ``len()``, ``batches(batch_size, limit)`` and ``get(idx)``."""

    def __init__(self, data: ImageSet, name: str, canvas_pad: int = 0, shift: int = 0,
                 seed: int = 0):
        self.data, self.name = data, name
        self.canvas_pad, self.shift, self.seed = canvas_pad, shift, seed
        self._offsets = None
        if shift:  # one fixed offset per example index, independent of the batch size
            g = generator(data.device, seed, STREAM_EVAL)
            self._offsets = random_offsets(len(data), shift, g, data.device)


    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at ``idx`` exactly as evaluation sees them (same placement every time)."""
        images = self.data.images[idx]
        offsets = self._offsets[idx] if self._offsets is not None else None
        return {"x": to_float(place(images, offsets, self.canvas_pad, self.shift)),
                "y": self.data.labels[idx]}
