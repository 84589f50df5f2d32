"""The training stream and evaluation source of the image sets beyond MNIST (``fashion-mnist``,
``kmnist``, ``emnist``, ``cifar10``, ``cifar100``, ``svhn``, ``folder``), and the steps their
builders share.

Images are uint8 (N, C, H, W) on the training device. A training batch is cut by indexing and
augmented there in one gather (``augment.crop_flip``): a random ``crop`` x ``crop`` window of the
image zero-padded by ``pad`` px, mirrored left-right at random when ``flip``. The digit shift of
MNIST is the case ``crop = side, pad = shift``. The batch order is TrainStream's (seeded by
(seed, epoch)) and the windows and flips of step ``t`` come from a generator seeded by (seed, t),
so ``batch(epoch, k, step)`` is a pure function of (seed, epoch, step): resume is exact.
Evaluation takes the centre ``crop`` x ``crop`` window of the unpadded image, never flipped.
Pixels are scaled to [0, 1] (the registry's ``unit`` normalisation).
"""

from __future__ import annotations

import numpy as np
import torch

from capsctl.data.augment import centre_crop, crop_flip, generator, random_flips, \
    random_windows, unit_float
from capsctl.data.datasets import DataBundle, ImageSet, IndexedSource, TrainStream
from capsctl.errors import DataError
from capsctl.tasks import SINGLE

STREAM_WINDOW = 31  # generator stream of the windows and flips (datasets.py uses 1-3)


class ImageStream(TrainStream):
    """Shuffled training batches of random (padded) crops, optionally flipped:
    ``batch(epoch, k, step)``; drops the last partial batch."""

    def __init__(self, data: ImageSet, batch_size: int, seed: int, pad: int = 0,
                 crop: int | None = None, flip: bool = False):
        super().__init__(data, batch_size, seed)
        side = int(data.images.shape[-1])
        self.pad, self.crop, self.flip = pad, crop or side, flip
        self.room = side + 2 * pad - self.crop   # window offsets are drawn in [0, room]

    def batch(self, epoch: int, k: int, step: int) -> dict[str, torch.Tensor]:
        idx = self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        images = self.data.images[idx]
        if self.room or self.flip:
            dev = self.data.device
            g = generator(dev, self.seed, STREAM_WINDOW, step)
            offsets = random_windows(len(idx), self.room, g, dev)
            flips = random_flips(len(idx), g, dev) if self.flip else None
            images = crop_flip(images, offsets, flips, self.pad, self.crop)
        return {"x": unit_float(images), "y": self.data.labels[idx]}


class CropSource(IndexedSource):
    """Fixed, unshuffled evaluation batches: the centre ``crop`` x ``crop`` window of each image.

    Declares what every evaluation source does: ``task``, ``name``, ``default_limit`` (None = all
    examples), ``len()``, ``batches(batch_size, limit)`` and ``get(idx)``."""

    def __init__(self, data: ImageSet, name: str, crop: int | None = None):
        self.data, self.name = data, name
        self.crop = crop or int(data.images.shape[-1])


    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at ``idx`` as evaluation sees them: {"x": (B, C, S, S), "y": (B,)}."""
        images = centre_crop(self.data.images[idx], self.crop)
        return {"x": unit_float(images), "y": self.data.labels[idx]}


def to_set(images_NCHW: np.ndarray, labels_N: np.ndarray, device: torch.device) -> ImageSet:
    """An ImageSet of uint8 (N, C, H, W) images and int64 labels on ``device``."""
    images = torch.from_numpy(np.ascontiguousarray(images_NCHW, dtype=np.uint8))
    labels = torch.from_numpy(np.ascontiguousarray(labels_N, dtype=np.int64))
    return ImageSet(images.to(device), labels.to(device))


def hold_out_tail(images: np.ndarray, labels: np.ndarray, n_val: int, what: str):
    """(train images, train labels, val images or None, val labels or None): the last ``n_val``
    examples held out for validation (the MNIST convention)."""
    if n_val >= len(labels):
        raise DataError(f"data.val_size={n_val} leaves no {what} training images (the training "
                        f"set has {len(labels)}); lower data.val_size")
    cut = len(labels) - n_val
    if not n_val:
        return images, labels, None, None
    return images[:cut], labels[:cut], images[cut:], labels[cut:]


def image_bundle(cfg, device: torch.device, train: tuple, val: tuple | None, test: tuple, *,
                 pad: int, crop: int, flip: bool) -> DataBundle:
    """The DataBundle of numpy (images (N, C, H, W), labels) splits: an ImageStream over
    ``train`` and centre-crop sources over ``val`` (None: no validation) and ``test``."""
    side = crop or int(train[0].shape[-1])
    stream = ImageStream(to_set(*train, device), cfg.train.batch_size, cfg.train.seed,
                         pad=pad, crop=side, flip=flip)
    val_src = CropSource(to_set(*val, device), "val", side) if val is not None else None
    return DataBundle(stream, val_src, CropSource(to_set(*test, device), "test", side), side,
                      SINGLE)
