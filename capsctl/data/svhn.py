"""``svhn``: Street View House Numbers, format 2 (cropped 32x32 digits), the official ``.mat``
files (Netzer et al. 2011).

Files: ``train_32x32.mat``, ``test_32x32.mat`` and, with ``data.extra``, ``extra_32x32.mat``;
each holds ``X``, uint8 (32, 32, 3, N) (row, column, RGB, example), and ``y``, (N, 1) labels 1-10
where 10 is the digit 0 (0 here). Looked for in ROOT, ``ROOT/svhn/`` and ``ROOT/SVHN/``, ROOT
being the data root (``--data-root`` > ``data.root`` > ``$CAPSCTL_DATA`` > ``~/.cache/capsctl``);
torchvision's downloader (``data.download: true``) writes them into ROOT.

A file's element structure is checked before scipy sees it (``matfile``: a hostile ``.mat`` would
crash scipy), its variables are listed from their headers and their declared sizes checked
against the file (at most ``idx.MAX_BYTES`` of data, no more than the file can hold compressed)
before anything is read; labels must be real numbers (not a cell, text, a struct or complex
numbers), integers 1-10. Any reading error is one DataError naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from capsctl.data import matfile
from capsctl.data.idx import GZIP_RATIO, MAX_BYTES
from capsctl.data.mnist import resolve_root
from capsctl.errors import DataError

if TYPE_CHECKING:  # the readers are torch-free (their fuzz forks a child per case)
    import torch

HINT = "fetch it again"
NUMERIC = frozenset({"double", "single", "int8", "uint8", "int16", "uint16", "int32", "uint32",
                     "int64", "uint64"})
LABEL_KINDS = {"c": "complex numbers", "O": "a cell (or objects)", "U": "text", "S": "text",
               "V": "a struct", "b": "logical values"}
FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
SUBFOLDERS = ("svhn", "SVHN")


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _declared(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{variable: (shape, MATLAB class)} from the headers of ``path`` (its structure checked
    first: ``matfile``)."""
    return {name: (shape, cls) for name, shape, cls in matfile.variables(path, HINT)}


def _check_declared(path: Path, found: dict) -> int:
    """The example count N the headers declare; a DataError unless X is uint8 32x32x3xN, y
    holds N labels and the file can hold that much."""
    if "X" not in found or "y" not in found:
        raise DataError(f"{path}: variables {', '.join(found) or 'none'}; expected X and y "
                        "(an SVHN cropped-digits file)")
    (x_shape, x_cls), (y_shape, y_cls) = found["X"], found["y"]
    if len(x_shape) != 4 or x_shape[:3] != (32, 32, 3) or x_cls != "uint8":
        raise DataError(f"{path}: X is {x_cls} {'x'.join(map(str, x_shape))}; expected uint8 "
                        "32x32x3xN")
    if y_cls not in NUMERIC:
        raise DataError(f"{path}: y is a MATLAB {y_cls} {'x'.join(map(str, y_shape))}; expected "
                        "numeric labels 1-10 (10 = digit 0), N x 1")
    n = x_shape[3]
    if int(np.prod(y_shape)) != n:
        raise DataError(f"{path}: {n} images but y holds {int(np.prod(y_shape))} labels")
    nbytes, size = 32 * 32 * 3 * n + 8 * n, path.stat().st_size
    if nbytes > MAX_BYTES or nbytes > GZIP_RATIO * size + 4096:
        raise DataError(f"{path}: headers declare {n} images ({nbytes} bytes), more than the "
                        f"{size}-byte file can hold or the {MAX_BYTES}-byte limit; the file is "
                        "corrupt, fetch it again")
    return n


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 in 0-9 of one SVHN .mat file."""
    n = _check_declared(path, _declared(path))
    mat, _ = matfile.load(path, ("X", "y"), HINT)
    x, y = mat["X"], np.asarray(mat["y"])
    if y.dtype.kind not in "uif":
        what = LABEL_KINDS.get(y.dtype.kind, f"{y.dtype} values")
        raise DataError(f"{path}: y holds {what}, not label numbers; expected integers 1-10 "
                        "(10 = digit 0)")
    y = y.reshape(-1)
    if x.shape != (32, 32, 3, n) or x.dtype != np.uint8 or y.size != n:
        raise DataError(f"{path}: X {x.dtype} {x.shape} and {y.size} labels do not match the "
                        "headers; the file is corrupt, fetch it again")
    if y.size and (not np.all(np.isfinite(y)) or y.min() < 1 or y.max() > 10
                   or np.any(y != np.round(y))):
        raise DataError(f"{path}: labels must be integers 1-10 (10 = digit 0); found values "
                        f"from {y.min()} to {y.max()}")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, y.astype(np.int64) % 10


def _find(root: Path, part: str, download: bool) -> Path:
    dirs = [root] + [root / s for s in SUBFOLDERS]
    for attempt in range(2):
        for folder in dirs:
            if (folder / FILES[part]).is_file():
                return folder / FILES[part]
        if attempt or not download:
            break
        try:
            from torchvision.datasets import SVHN

            SVHN(str(root), split=part, download=True)
        except Exception as e:  # network errors come in many types
            raise DataError(f"downloading SVHN {part} into {root} failed ({_short(e)}); copy "
                            f"{FILES[part]} there by hand") from None
    raise DataError(f"SVHN {part} file missing: {FILES[part]} not found in "
                    f"{', '.join(map(str, dirs))}; pass --data-root DIR or set CAPSCTL_DATA, or "
                    "add --set data.download=true to fetch it")


def build_svhn(cfg, device: torch.device, root_flag: str | None = None):
    """``svhn``: train less its last data.val_size (plus all of extra with data.extra), val,
    test."""
    from capsctl.data.natural import hold_out_tail, image_bundle

    o = cfg.data
    root = resolve_root(root_flag, o.root)
    tr_images, tr_labels = read_mat(_find(root, "train", o.download))
    te_images, te_labels = read_mat(_find(root, "test", o.download))
    tr_i, tr_l, va_i, va_l = hold_out_tail(tr_images, tr_labels, o.val_size, "SVHN")
    if o.extra:  # validation stays a slice of the official training set
        ex_images, ex_labels = read_mat(_find(root, "extra", o.download))
        tr_i, tr_l = np.concatenate([tr_i, ex_images]), np.concatenate([tr_l, ex_labels])
    val = (va_i, va_l) if va_i is not None else None
    return image_bundle(cfg, device, (tr_i, tr_l), val, (te_images, te_labels), pad=o.pad,
                        crop=o.crop, flip=False)
