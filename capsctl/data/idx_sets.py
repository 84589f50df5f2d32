"""``fashion-mnist``, ``kmnist`` and ``emnist``: 28x28 grey images in MNIST's IDX files (raw or
gzipped), read with ``data/idx.py``'s bounded reader.

Where the files are looked for, in the data root (``--data-root`` > ``data.root`` >
``$CAPSCTL_DATA`` > ``~/.cache/capsctl``, as for MNIST):

- fashion-mnist: ``ROOT/FashionMNIST/raw/`` (torchvision's layout), ``ROOT/fashion-mnist/``, and
  ROOT itself only when ROOT is named so (``fashion-mnist``, ``FashionMNIST/raw``): its files
  have MNIST's names, and a data root holding MNIST must never be read as Fashion-MNIST.
- kmnist: ``ROOT/KMNIST/raw/``, ``ROOT/kmnist/``, ROOT itself when named so (same reason).
- emnist: ``ROOT/``, ``ROOT/EMNIST/raw/``, ``ROOT/emnist/``, ``ROOT/gzip/`` (the official zip
  unpacked) - ``emnist-<split>-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]``.

With ``data.download: true`` missing files are fetched by torchvision into its layout. EMNIST's
images are stored transposed in the files; they are turned upright here. The ``letters`` split's
labels are 1-26 in the files and 0-25 here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capsctl.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from capsctl.data.image_sets_config import EMNIST_CLASSES, FASHION_CLASSES, KMNIST_CLASSES
from capsctl.data.mnist import FILES as MNIST_FILES, resolve_root
from capsctl.data.natural import hold_out_tail, image_bundle
from capsctl.errors import DataError

SIDE = 28


@dataclass(frozen=True)
class IdxSet:
    """Where one dataset's IDX files are and how to read them."""

    key: str                   # the folder name that marks ROOT itself as this set's folder
    title: str
    folders: tuple[str, ...]   # subfolders of the data root looked in, torchvision's first
    in_root: bool              # file names unique to the set: look in the data root itself
    torchvision: str           # torchvision.datasets class that downloads it


FASHION = IdxSet("fashionmnist", "Fashion-MNIST", ("FashionMNIST/raw", "fashion-mnist"), False,
                 "FashionMNIST")
KMNIST = IdxSet("kmnist", "Kuzushiji-MNIST", ("KMNIST/raw", "kmnist"), False, "KMNIST")
EMNIST = IdxSet("emnist", "EMNIST", ("EMNIST/raw", "emnist", "gzip"), True, "EMNIST")


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def folders(root: Path, s: IdxSet) -> list[Path]:
    """The folders looked in for ``s``'s files, in order."""
    subs = [root / f for f in s.folders]
    if s.in_root:
        return [root] + subs
    named = _norm(root.name) == s.key or (root.name == "raw" and _norm(root.parent.name) == s.key)
    return subs + ([root] if named else [])


def stems(s: IdxSet, split: str, emnist_split: str | None) -> tuple[str, str]:
    """(images file, labels file) names without ``.gz``."""
    if s is EMNIST:
        part = "train" if split == "train" else "test"
        return (f"emnist-{emnist_split}-{part}-images-idx3-ubyte",
                f"emnist-{emnist_split}-{part}-labels-idx1-ubyte")
    return MNIST_FILES[split]


def _find(dirs: list[Path], stem: str) -> Path | None:
    for folder in dirs:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _download(root: Path, s: IdxSet, emnist_split: str | None) -> None:
    try:
        from torchvision import datasets
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise DataError(f"cannot download {s.title}: torchvision is not importable ({e})") \
            from None
    extra = {"split": emnist_split} if s is EMNIST else {}
    try:
        for train in (True, False):
            getattr(datasets, s.torchvision)(str(root), train=train, download=True, **extra)
    except Exception as e:  # network errors come in many types
        raise DataError(f"downloading {s.title} into {root} failed ({type(e).__name__}: {e}); "
                        f"copy the IDX files into {root / s.folders[0]} by hand") from None


def _paths(root: Path, s: IdxSet, split: str, o) -> tuple[Path, Path]:
    names = stems(s, split, getattr(o, "split", None))
    dirs = folders(root, s)
    paths = [_find(dirs, n) for n in names]
    if any(p is None for p in paths) and o.download:
        _download(root, s, getattr(o, "split", None))
        paths = [_find(dirs, n) for n in names]
    missing = [n for n, p in zip(names, paths) if p is None]
    if missing:
        raise DataError(
            f"{s.title} {split} files missing: {', '.join(m + '[.gz]' for m in missing)} not "
            f"found in {', '.join(map(str, dirs))}; pass --data-root DIR (a folder holding "
            f"{s.folders[0]}/) or set CAPSCTL_DATA, or add --set data.download=true to fetch "
            "them")
    return paths[0], paths[1]


def load_split(root: Path, s: IdxSet, split: str, o, n_classes: int, first_label: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 (upright) and labels (N,) int64 in [0, n_classes) of ``split``
    (``train`` or ``test``); a one-line DataError naming the file otherwise."""
    img_path, lab_path = _paths(root, s, split, o)
    images = read_idx(img_path, IMAGES_MAGIC)
    labels = read_idx(lab_path, LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise DataError(f"{img_path}: expected N x 28 x 28 images, got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{lab_path}: expected a 1-D label file, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{s.title} {split}: {len(images)} images but {len(labels)} labels "
                        f"({img_path.name} vs {lab_path.name}); the files do not belong "
                        "together")
    last = first_label + n_classes - 1
    if labels.size and (labels.min() < first_label or labels.max() > last):
        bad = int(labels.max()) if labels.max() > last else int(labels.min())
        raise DataError(f"{lab_path}: label {bad} out of range {first_label}-{last}")
    if s is EMNIST:
        images = images.transpose(0, 2, 1)
    return images, labels.astype(np.int64) - first_label


def _bundle(cfg, device: torch.device, root_flag: str | None, s: IdxSet, n_classes: int,
            first_label: int = 0, flip: bool = False):
    o = cfg.data
    root = resolve_root(root_flag, o.root)
    tr_images, tr_labels = load_split(root, s, "train", o, n_classes, first_label)
    te_images, te_labels = load_split(root, s, "test", o, n_classes, first_label)
    tr_i, tr_l, va_i, va_l = hold_out_tail(tr_images, tr_labels, o.val_size, s.title)
    val = (va_i[:, None], va_l) if va_i is not None else None
    return image_bundle(cfg, device, (tr_i[:, None], tr_l), val, (te_images[:, None], te_labels),
                        pad=o.shift, crop=SIDE, flip=flip)


def build_fashion(cfg, device: torch.device, root_flag: str | None = None):
    """``fashion-mnist``: train (less the last data.val_size), val and the official test set."""
    return _bundle(cfg, device, root_flag, FASHION, len(FASHION_CLASSES), flip=cfg.data.flip)


def build_kmnist(cfg, device: torch.device, root_flag: str | None = None):
    """``kmnist``: train (less the last data.val_size), val and the official test set."""
    return _bundle(cfg, device, root_flag, KMNIST, len(KMNIST_CLASSES))


def build_emnist(cfg, device: torch.device, root_flag: str | None = None):
    """``emnist`` (split ``data.split``): train (less the last data.val_size), val, test."""
    split = cfg.data.split
    return _bundle(cfg, device, root_flag, EMNIST, len(EMNIST_CLASSES[split]),
                   first_label=1 if split == "letters" else 0)
