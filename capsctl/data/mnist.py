"""Locating, checking and (when allowed) downloading the MNIST IDX files.

Data root precedence: ``--data-root`` flag > ``data.root`` in the config > ``CAPSCTL_DATA`` >
the default cache folder (``$XDG_CACHE_HOME/capsctl`` or ``~/.cache/capsctl``). In a root, the files
are looked for directly and in ``MNIST/raw/`` (torchvision's layout), raw or gzipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from capsctl.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from capsctl.errors import DataError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EXPECTED_COUNT = {"train": 60000, "test": 10000}


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "capsctl"


def resolve_root(flag: str | None = None, config_root: str | None = None) -> Path:
    """The data root by precedence: flag > config > $CAPSCTL_DATA > cache folder."""
    for candidate in (flag, config_root, os.environ.get("CAPSCTL_DATA")):
        if candidate:
            return Path(candidate).expanduser()
    return default_cache()


def _find(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _download(root: Path) -> None:
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise DataError(f"cannot download MNIST: torchvision is not importable ({e})") from None
    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(f"downloading MNIST into {root} failed ({type(e).__name__}: {e}); "
                        "copy the four IDX files there by hand") from None


def load_split(root: Path, split: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the MNIST ``train`` or ``test`` split."""
    stems = FILES[split]
    paths = [_find(root, s) for s in stems]
    if any(p is None for p in paths) and download:
        _download(root)
        paths = [_find(root, s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise DataError(
            f"MNIST {split} files missing: {', '.join(m + '[.gz]' for m in missing)} not found in "
            f"{root} or {root / 'MNIST' / 'raw'}; pass --data-root DIR or set CAPSCTL_DATA to a "
            "folder with the IDX files, or add --set data.download=true to fetch them")
    images = read_idx(paths[0], IMAGES_MAGIC)
    labels = read_idx(paths[1], LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]}: expected N x 28 x 28 images, got shape {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{paths[1]}: expected a 1-D label file, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"MNIST {split}: {len(images)} images but {len(labels)} labels "
                        f"({paths[0].name} vs {paths[1].name}); the files do not belong together")
    if labels.size and labels.max() > 9:
        raise DataError(f"{paths[1]}: label {int(labels.max())} out of range 0-9")
    return images, labels.astype(np.int64)
