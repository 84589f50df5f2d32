"""The MNIST-based training datasets: ``mnist`` and ``expanded-mnist`` (paper 5.2); the MNIST
splits also feed ``multimnist``. The validation set is the last ``data.val_size`` training
images."""

from __future__ import annotations

import torch

from capsctl.data import mnist
from capsctl.data.datasets import DataBundle, EvalSource, ImageSet, TrainStream
from capsctl.data.efficient_capsnet_augment import EfficientCapsNetAugment
from capsctl.data.registry import EXPANDED_SIDE
from capsctl.errors import DataError
from capsctl.tasks import SINGLE

EXPANDED_PAD, EXPANDED_EVAL_SHIFT, EXPANDED_EVAL_SEED = (EXPANDED_SIDE - 28) // 2, 6, 0


def _to_device(images, labels, device) -> ImageSet:
    return ImageSet(torch.from_numpy(images.copy()).to(device),
                    torch.from_numpy(labels).to(device))


def load_mnist_sets(d, device: torch.device, root_flag: str | None = None):
    """(train, val or None, test) ImageSets of MNIST on ``device``; ``d`` is the data options
    (root, download, val_size)."""
    root = mnist.resolve_root(root_flag, d.root)
    tr_images, tr_labels = mnist.load_split(root, "train", d.download)
    te_images, te_labels = mnist.load_split(root, "test", d.download)
    n_val = d.val_size
    if n_val >= len(tr_labels):
        raise DataError(f"data.val_size={n_val} leaves no training images "
                        f"(the training set has {len(tr_labels)})")
    cut = len(tr_labels) - n_val
    train = _to_device(tr_images[:cut], tr_labels[:cut], device)
    val = _to_device(tr_images[cut:], tr_labels[cut:], device) if n_val else None
    test = _to_device(te_images, te_labels, device)
    return train, val, test


def build_mnist(cfg, device, root_flag) -> DataBundle:
    """MNIST; training batches shifted by up to ``data.shift`` px, or augmented as
    Efficient-CapsNet's authors do (``data.augment``, efficient_capsnet_augment.py)."""
    train, val, test = load_mnist_sets(cfg.data, device, root_flag)
    augment = EfficientCapsNetAugment() if cfg.data.augment == "efficient-capsnet" else None
    stream = TrainStream(train, cfg.train.batch_size, cfg.train.seed, shift=cfg.data.shift,
                         augment=augment)
    return DataBundle(stream, EvalSource(val, "val") if val is not None else None,
                      EvalSource(test, "test"), 28, SINGLE)


def build_expanded(cfg, device, root_flag) -> DataBundle:
    """Expanded MNIST (paper 5.2): each digit on a 40x40 black canvas. Training offsets are drawn
    afresh for every draw on the device, up to ``data.shift`` px each way (6 = anywhere it fits);
    validation and test offsets come from a fixed seed (up to 6 px), the same for every run."""
    train, val, test = load_mnist_sets(cfg.data, device, root_flag)
    stream = TrainStream(train, cfg.train.batch_size, cfg.train.seed, shift=cfg.data.shift,
                         canvas_pad=EXPANDED_PAD)

    def fixed(data: ImageSet, name: str) -> EvalSource:
        return EvalSource(data, name, canvas_pad=EXPANDED_PAD, shift=EXPANDED_EVAL_SHIFT,
                          seed=EXPANDED_EVAL_SEED)

    return DataBundle(stream, fixed(val, "val") if val is not None else None, fixed(test, "test"),
                      EXPANDED_SIDE, SINGLE)
