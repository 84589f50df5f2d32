"""``cifar10`` and ``cifar100``: the official "python version" batches (Krizhevsky 2009).

Files: ``cifar-10-batches-py/`` holds ``data_batch_1`` ... ``data_batch_5`` and ``test_batch``;
``cifar-100-python/`` holds ``train`` and ``test``. Each is a pickled dict: ``data``, a uint8
array (N, 3072) (1024 red, 1024 green, 1024 blue values of a 32x32 image, row-major), and
``labels`` (CIFAR-10) or ``fine_labels`` and ``coarse_labels`` (CIFAR-100), lists of N ints.
They are looked for in ``ROOT/cifar-10-batches-py/`` (torchvision's layout) or ROOT itself, and
``ROOT/cifar-100-python/`` (or ROOT when it is that folder), ROOT being the data root
(``--data-root`` > ``data.root`` > ``$CAPSCTL_DATA`` > ``~/.cache/capsctl``).

A pickle can run code when loaded, so these files are never given to ``pickle.load``: a
restricted unpickler builds only plain containers, numbers, strings and numpy arrays of numbers
(the few numpy functions an array's pickle calls, each checked) and refuses everything else with
a DataError naming the file. Files over ``MAX_FILE`` bytes are refused before being read.
"""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from capsctl.data.idx import open_data
from capsctl.data.image_sets_config import CIFAR10_CLASSES, CIFAR100_COARSE, CIFAR100_FINE
from capsctl.data.mnist import resolve_root
from capsctl.errors import DataError

if TYPE_CHECKING:  # the readers are torch-free (their fuzz forks a child per case)
    import torch

MAX_FILE = 512 << 20   # CIFAR-100's training file, the largest, has 161 MB
PIXELS = 3 * 32 * 32
CIFAR10_DIR, CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR100_FILES = {"train": ("train",), "test": ("test",)}


# --- the restricted unpickler -------------------------------------------------------------------

def _numpy_parts():
    try:
        from numpy._core import multiarray, numeric   # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def _plain_dtype(*args) -> np.dtype:
    d = np.dtype(*args)
    if d.kind not in "biuf" or d.fields is not None:
        raise pickle.UnpicklingError(f"refusing a numpy array of dtype {d} (numbers only)")
    return d


def _count(shape, what: str) -> int:
    """The element count of a pickled ``shape`` (an int or a tuple of ints >= 0)."""
    dims = (shape,) if isinstance(shape, int) else shape
    if not isinstance(dims, tuple) or len(dims) > 32 or \
            not all(type(d) is int and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"refusing {what} of shape {str(shape)[:80]}")
    return math.prod(dims)


def _exact_buffer(buf, n: int, dtype: np.dtype, what: str) -> None:
    """``buf`` must be bytes holding exactly ``n`` elements of ``dtype``: an array never views
    a buffer smaller than it claims (a 1-byte buffer with zero strides claiming 2,000,000 images
    would cost gigabytes as soon as it is copied)."""
    if not isinstance(buf, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"refusing {what} without a bytes buffer")
    if len(buf) != n * dtype.itemsize:
        raise pickle.UnpicklingError(f"refusing {what} of {n} x {dtype.itemsize} bytes over a "
                                     f"{len(buf)}-byte buffer")


def _ndarray(shape, dtype=float, buffer=None, offset=0, strides=None, order=None):
    """``numpy.ndarray(...)`` called by a pickle: only a C-contiguous array over a buffer of
    exactly its size (offset 0, the default or C strides), checked before anything exists.
    (Also the ``subtype`` that ``_reconstruct`` expects.)"""
    d = _plain_dtype(dtype)
    n = _count(shape, "numpy.ndarray")
    dims = (shape,) if isinstance(shape, int) else shape
    c_strides = tuple(d.itemsize * math.prod(dims[i + 1:]) for i in range(len(dims)))
    if offset != 0 or order not in (None, "C") or \
            (strides is not None and tuple(strides) != c_strides):
        raise pickle.UnpicklingError("refusing numpy.ndarray with an offset, strides or an "
                                     "order other than C-contiguous")
    _exact_buffer(buffer, n, d, "numpy.ndarray")
    return np.frombuffer(buffer, dtype=d).reshape(dims)


def _reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` for a plain ndarray of no more than one element (pickles make
    an empty array here and fill it from the file's bytes in ``__setstate__``, which numpy
    refuses unless the bytes are exactly the declared size)."""
    if subtype is not _ndarray or _count(shape, "an array reconstruction") > 1:
        raise pickle.UnpicklingError("refusing an array reconstruction other than numpy's own")
    return _numpy_parts()[0]._reconstruct(np.ndarray, shape, _plain_dtype(dtype))


def _frombuffer(buf, dtype, shape, order):
    d = _plain_dtype(dtype)
    if order != "C":
        raise pickle.UnpicklingError(f"refusing an array of order {str(order)[:8]!r} (C only)")
    _exact_buffer(buf, _count(shape, "numpy._frombuffer"), d, "numpy._frombuffer")
    return _numpy_parts()[1]._frombuffer(buf, d, shape, order)


def _encode(text, encoding="latin1"):
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _encode,   # bytes as pickled by Python 3 with protocol 2
}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds plain Python data and numeric numpy arrays only (``ALLOWED``)."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def read_batch(path: Path) -> dict:
    """The dict of one CIFAR python batch, keys as str; a one-line DataError otherwise."""
    with open_data(path) as (stream, size, gz):
        if size > MAX_FILE:
            raise DataError(f"{path}: {size} bytes, more than the {MAX_FILE}-byte limit of a "
                            "CIFAR batch; the file is not a CIFAR batch")
        raw = stream.read(MAX_FILE + 1)
    if len(raw) > MAX_FILE:
        raise DataError(f"{path}: inflates to more than {MAX_FILE} bytes; not a CIFAR batch")
    try:
        obj = RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as e:  # UnpicklingError, EOFError, ValueError, MemoryError, ...
        first = str(e).split("\n")[0][:160]
        raise DataError(f"{path}: not a readable CIFAR python batch ({type(e).__name__}: "
                        f"{first}); fetch it again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not a CIFAR batch dict")
    for value in obj.values():
        if isinstance(value, np.ndarray) and not (value.flags.c_contiguous
                                                  and all(st > 0 for st in value.strides)):
            raise DataError(f"{path}: holds an array that is not C-contiguous (strides "
                            f"{value.strides}); not a CIFAR batch, fetch it again")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _labels(path: Path, value, key: str, n_classes: int) -> np.ndarray:
    """The labels of a batch as int64 (N,) in 0 .. n_classes - 1: integers, or floats that are
    whole numbers (1.7 is refused, never truncated)."""
    try:
        labels = np.asarray(value).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        labels = None
    if labels is None or labels.dtype.kind not in "iuf":
        raise DataError(f"{path}: '{key}' is not a list of integers")
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            raise DataError(f"{path}: label {labels[bad][0]:g} in '{key}' is not a whole "
                            "number; labels are integers")
    out = (labels < 0) | (labels >= n_classes)
    if out.any():
        bad = labels[out][0]
        shown = f"{bad:g}" if labels.dtype.kind == "f" else str(int(bad))
        raise DataError(f"{path}: label {shown} out of range 0-{n_classes - 1}")
    return labels.astype(np.int64)


def batch_arrays(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one batch file, checked."""
    d = read_batch(path)
    for key in ("data", label_key):
        if key not in d:
            raise DataError(f"{path}: no '{key}' entry (entries: "
                            f"{', '.join(map(str, d))[:160]}); not a CIFAR batch of this set")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != PIXELS:
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else \
            type(data).__name__
        raise DataError(f"{path}: 'data' is {what}; expected a uint8 array N x {PIXELS}")
    labels = _labels(path, d[label_key], label_key, n_classes)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


# --- locating, downloading, building ------------------------------------------------------------

def _folders(root: Path, sub: str, in_root: bool) -> list[Path]:
    return [root / sub] + ([root] if in_root or root.name == sub else [])


def _download(root: Path, cls: str) -> None:
    try:
        from torchvision import datasets

        getattr(datasets, cls)(str(root), train=True, download=True)
    except Exception as e:  # network errors come in many types
        raise DataError(f"downloading {cls} into {root} failed ({type(e).__name__}: {e}); "
                        "unpack the python version's archive there by hand") from None


def find_files(root: Path, hundred: bool, download: bool) -> dict[str, list[Path]]:
    """{"train": [...], "test": [...]}: the batch files, fetched by torchvision if allowed."""
    sub, names = (CIFAR100_DIR, CIFAR100_FILES) if hundred else (CIFAR10_DIR, CIFAR10_FILES)
    dirs = _folders(root, sub, in_root=not hundred)
    for attempt in range(2):
        for folder in dirs:
            if all((folder / n).is_file() for split in names.values() for n in split):
                return {split: [folder / n for n in files] for split, files in names.items()}
        if attempt or not download:
            break
        _download(root, "CIFAR100" if hundred else "CIFAR10")
    wanted = ", ".join(n for split in names.values() for n in split)
    raise DataError(f"CIFAR-{'100' if hundred else '10'} files missing: {wanted} not all found "
                    f"in {' or '.join(map(str, dirs))}; pass --data-root DIR (a folder holding "
                    f"{sub}/) or set CAPSCTL_DATA, or add --set data.download=true to fetch them")


def load_split(files: list[Path], label_key: str, n_classes: int):
    """Images (N, 3, 32, 32) and labels (N,) of the batch files of one split, concatenated."""
    parts = [batch_arrays(p, label_key, n_classes) for p in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _bundle(cfg, device: torch.device, root_flag: str | None, hundred: bool, label_key: str,
            n_classes: int):
    from capsctl.data.natural import hold_out_tail, image_bundle

    o = cfg.data
    files = find_files(resolve_root(root_flag, o.root), hundred, o.download)
    tr_images, tr_labels = load_split(files["train"], label_key, n_classes)
    te_images, te_labels = load_split(files["test"], label_key, n_classes)
    tr_i, tr_l, va_i, va_l = hold_out_tail(tr_images, tr_labels, o.val_size,
                                           f"CIFAR-{100 if hundred else 10}")
    val = (va_i, va_l) if va_i is not None else None
    return image_bundle(cfg, device, (tr_i, tr_l), val, (te_images, te_labels), pad=o.pad,
                        crop=o.crop, flip=o.flip)


def build_cifar10(cfg, device: torch.device, root_flag: str | None = None):
    """``cifar10``: the 50,000 training images less the last data.val_size, val, test."""
    return _bundle(cfg, device, root_flag, False, "labels", len(CIFAR10_CLASSES))


def build_cifar100(cfg, device: torch.device, root_flag: str | None = None):
    """``cifar100``: fine (100) or coarse (20) labels by data.labels; train, val, test."""
    coarse = cfg.data.labels == "coarse"
    return _bundle(cfg, device, root_flag, True, "coarse_labels" if coarse else "fine_labels",
                   len(CIFAR100_COARSE if coarse else CIFAR100_FINE))
