"""Datasets by name: ``build(cfg, device, root_flag)`` gives the training stream and the
validation and test sources; ``build_eval(name, split, ...)`` one evaluation source."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capsctl.config import Config
from capsctl.data import mnist, multimnist
from capsctl.data.datasets import EvalSource, ImageSet, TrainStream
from capsctl.errors import DataError


@dataclass
class DataBundle:
    train: TrainStream
    val: EvalSource | None
    test: EvalSource
    input_size: int


def _to_device(images, labels, device) -> ImageSet:
    return ImageSet(torch.from_numpy(images.copy()).to(device),
                    torch.from_numpy(labels).to(device))


def load_mnist_sets(cfg: Config, device: torch.device, root_flag: str | None = None):
    root = mnist.resolve_root(root_flag, cfg.data.root)
    tr_images, tr_labels = mnist.load_split(root, "train", cfg.data.download)
    te_images, te_labels = mnist.load_split(root, "test", cfg.data.download)
    n_val = cfg.data.val_size
    if n_val >= len(tr_labels):
        raise DataError(f"data.val_size={n_val} leaves no training images "
                        f"(the training set has {len(tr_labels)})")
    cut = len(tr_labels) - n_val
    train = _to_device(tr_images[:cut], tr_labels[:cut], device)
    val = _to_device(tr_images[cut:], tr_labels[cut:], device) if n_val else None
    test = _to_device(te_images, te_labels, device)
    return train, val, test


def _mnist(cfg: Config, device, root_flag) -> DataBundle:
    train, val, test = load_mnist_sets(cfg, device, root_flag)
    stream = TrainStream(train, cfg.train.batch_size, cfg.train.seed, shift=cfg.data.shift)
    return DataBundle(stream, EvalSource(val, "val") if val is not None else None,
                      EvalSource(test, "test"), 28)


# dataset name -> builder(cfg, device, root_flag) -> DataBundle
DATASETS = {"mnist": _mnist, "multimnist": multimnist.build_bundle}


def build(cfg: Config, device: torch.device, root_flag: str | None = None) -> DataBundle:
    return DATASETS[cfg.data.dataset](cfg, device, root_flag)


def build_eval(name: str, split: str, cfg: Config, device: torch.device,
               root_flag: str | None = None) -> EvalSource:
    """One evaluation source by dataset name and split (``test`` or ``val``)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    bundle = DATASETS[name](cfg, device, root_flag)
    source = bundle.val if split == "val" else bundle.test
    if source is None:
        raise DataError(f"dataset '{name}' has no '{split}' split (data.val_size is 0 in the "
                        "checkpoint's config)")
    return source
