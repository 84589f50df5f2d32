"""Datasets by name: ``build(cfg, device, root_flag)`` gives the training stream and the
validation and test sources; ``build_eval(name, split, ...)`` one evaluation source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from capsctl.config import Config
from capsctl.data import affnist, mnist, multimnist, smallnorb
from capsctl.data.affnist import MissingDataError  # noqa: F401  (files absent: callers may skip)
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


EXPANDED_PAD, EXPANDED_EVAL_SHIFT, EXPANDED_EVAL_SEED = 6, 6, 0


def _expanded_mnist(cfg: Config, device, root_flag) -> DataBundle:
    """Expanded MNIST (paper 5.2): each digit on a 40x40 black canvas. Training offsets are drawn
    afresh for every draw on the device, up to ``data.shift`` px each way (6 = anywhere it fits);
    validation and test offsets come from a fixed seed (up to 6 px), the same for every run."""
    train, val, test = load_mnist_sets(cfg, device, root_flag)
    stream = TrainStream(train, cfg.train.batch_size, cfg.train.seed, shift=cfg.data.shift,
                         canvas_pad=EXPANDED_PAD)

    def fixed(data: ImageSet, name: str) -> EvalSource:
        return EvalSource(data, name, canvas_pad=EXPANDED_PAD, shift=EXPANDED_EVAL_SHIFT,
                          seed=EXPANDED_EVAL_SEED)

    return DataBundle(stream, fixed(val, "val") if val is not None else None, fixed(test, "test"),
                      28 + 2 * EXPANDED_PAD)


# dataset name -> builder(cfg, device, root_flag) -> DataBundle
DATASETS = {"mnist": _mnist, "multimnist": multimnist.build_bundle,
            "expanded-mnist": _expanded_mnist, "smallnorb": smallnorb.build_bundle}


def build(cfg: Config, device: torch.device, root_flag: str | None = None) -> DataBundle:
    bundle = DATASETS[cfg.data.dataset](cfg, device, root_flag)
    if bundle.input_size != cfg.model.input_size:
        raise DataError(f"data.dataset={cfg.data.dataset} makes {bundle.input_size}x"
                        f"{bundle.input_size} images but model.input_size is "
                        f"{cfg.model.input_size}; set model.input_size={bundle.input_size}")
    return bundle


@dataclass(frozen=True)
class EvalSpec:
    """An evaluation-only dataset: its image side and ``build(split, cfg, device, root_flag)``
    giving a source with ``batches(batch_size, limit)``, ``get(idx)``, ``len()`` and ``name``."""

    input_size: int
    build: Callable


def _bundle_split(name: str, split: str, cfg: Config, device, root_flag):
    bundle = DATASETS[name](cfg, device, root_flag)
    source = bundle.val if split == "val" else bundle.test
    if source is None:
        raise DataError(f"dataset '{name}' has no '{split}' split (data.val_size is 0 in the "
                        "checkpoint's config)")
    return bundle, source


def _from_bundle(name: str) -> Callable:
    return lambda split, cfg, device, root_flag: _bundle_split(name, split, cfg, device,
                                                               root_flag)[1]


def _mat_files(name: str) -> Callable:
    def build(split, cfg, device, root_flag):
        root = mnist.resolve_root(root_flag, cfg.data.root)
        return affnist.open_source(name, split, root, device, cfg.data.download)
    return build


# dataset name -> EvalSpec, for ``capsctl eval --dataset`` and ``train.final_eval``; a name only in
# DATASETS is evaluated on its bundle's val/test split
EVAL_SOURCES: dict[str, EvalSpec] = {
    "mnist": EvalSpec(28, _from_bundle("mnist")),
    "expanded-mnist": EvalSpec(28 + 2 * EXPANDED_PAD, _from_bundle("expanded-mnist")),
    "affnist": EvalSpec(affnist.SIDE, _mat_files("affnist")),
    "affnist-synth": EvalSpec(affnist.SIDE, _mat_files("affnist-synth")),
}


def _size_mismatch(name: str, side: int, cfg: Config) -> DataError:
    m = cfg.model.input_size
    fits = [n for n, s in EVAL_SOURCES.items() if s.input_size == m]
    return DataError(f"the model takes {m}x{m} images but dataset '{name}' is {side}x{side}; "
                     f"evaluate it on {', '.join(fits) or f'a {m}x{m} dataset'}")


def check_eval(name: str, cfg: Config) -> None:
    """Raise unless ``name`` is a known dataset whose images fit the model of ``cfg``."""
    names = list(dict.fromkeys([*EVAL_SOURCES, *DATASETS]))
    if name not in names:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(names)}")
    spec = EVAL_SOURCES.get(name)
    if spec is not None and spec.input_size != cfg.model.input_size:
        raise _size_mismatch(name, spec.input_size, cfg)


def build_eval(name: str, split: str, cfg: Config, device: torch.device,
               root_flag: str | None = None):
    """One evaluation source by dataset name and split (``test`` or ``val``)."""
    check_eval(name, cfg)
    if name in EVAL_SOURCES:
        return EVAL_SOURCES[name].build(split, cfg, device, root_flag)
    bundle, source = _bundle_split(name, split, cfg, device, root_flag)
    if bundle.input_size != cfg.model.input_size:
        raise _size_mismatch(name, bundle.input_size, cfg)
    return source
