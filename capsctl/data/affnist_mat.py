"""affNIST's .mat layout: reading and writing the MATLAB v5 files that hold one struct
``affNISTdata`` with ``image`` (1600 x N uint8, one picture per column; a column read in
row-major order is the 40x40 picture, pinned by a test that round-trips MNIST padded by 6 px),
``label_int`` (1 x N) and, in the official files, ``label_one_of_n`` and the applied
transforms. Files made by ``capsctl data affnist-synth`` carry a top-level ``capsctl_synth``
marker (``is_synthetic``). Every file is read through ``data/matfile.py`` (the structure checked
before scipy sees it). Torch-free; see data/affnist.py for the dataset as a whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from capsctl.data import matfile
from capsctl.errors import DataError

SIDE = 40
STRUCT = "affNISTdata"
SYNTH_MARKER = "capsctl_synth"


def load_struct(path: Path) -> dict[str, np.ndarray]:
    """Every field of the ``affNISTdata`` struct of ``path``; a one-line DataError otherwise.
    Read through ``matfile.load`` (the structure checked before scipy sees the file)."""
    mat, caught = matfile.load(path, (STRUCT,), "re-download or regenerate it")
    if STRUCT not in mat:
        try:
            names = [v[0] for v in matfile.variables(path, "")]
        except DataError:
            names = []
        raise DataError(f"{path}: no '{STRUCT}' struct in this .mat file (variables: "
                        f"{', '.join(names) or 'none'}); expected an affNIST-format file")
    s = mat[STRUCT]
    if not isinstance(s, np.ndarray) or s.dtype.names is None or s.size != 1:
        why = f"is unreadable ({caught[0]})" if caught else "is not a struct"
        raise DataError(f"{path}: '{STRUCT}' {why}; expected an affNIST-format file")
    return {name: np.asarray(s[name].flat[0]) for name in s.dtype.names}


def _number(v) -> str:
    """A label or pixel value as the file holds it: 12, 9.5, nan."""
    return str(int(v)) if np.issubdtype(type(v), np.integer) else f"{float(v):g}"


def _numeric(path: Path, name: str, a: np.ndarray) -> None:
    if a.dtype.kind not in "uif":
        raise DataError(f"{path}: {STRUCT}.{name} holds {a.dtype} values ({a.dtype.kind!r} kind), "
                        "not numbers; expected an affNIST-format file")
    if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
        bad = a[~np.isfinite(a)].flat[0]
        raise DataError(f"{path}: {STRUCT}.{name} holds {_number(bad)}; expected finite numbers")


def check_labels(path: Path, labels: np.ndarray) -> np.ndarray:
    """``labels`` as int64 after checking they are whole numbers 0-9 (one-line DataError)."""
    if labels.dtype.kind == "f" and (labels != np.round(labels)).any():
        bad = labels[labels != np.round(labels)][0]
        raise DataError(f"{path}: label {_number(bad)} is not a whole number; labels are 0-9")
    out = (labels < 0) | (labels > 9)
    if out.any():
        raise DataError(f"{path}: label {_number(labels[out][0])} out of range 0-9")
    return labels.astype(np.int64)


def read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 40, 40) and labels (N,) int64 of one affNIST-format ``.mat`` file. Pixels are
    0-255: uint8 as in the official files (float pixels from other generators stay float32)."""
    fields = load_struct(path)
    for key in ("image", "label_int"):
        if key not in fields:
            raise DataError(f"{path}: the '{STRUCT}' struct has no '{key}' field (fields: "
                            f"{', '.join(fields)}); expected an affNIST-format file")
    image, labels = fields["image"], fields["label_int"].reshape(-1)
    _numeric(path, "image", image)
    _numeric(path, "label_int", labels)
    if image.ndim != 2 or image.shape[0] != SIDE * SIDE:
        raise DataError(f"{path}: {STRUCT}.image has shape {image.shape}; expected 1600 x N "
                        "(one 40x40 picture per column)")
    if image.shape[1] != labels.size:
        raise DataError(f"{path}: {image.shape[1]} images but {labels.size} labels")
    if labels.size == 0:
        raise DataError(f"{path}: holds no images; re-download or regenerate it")
    if image.min() < 0 or image.max() > 255:
        bad = image.min() if image.min() < 0 else image.max()
        raise DataError(f"{path}: pixel value {_number(bad)} outside 0-255")
    labels = check_labels(path, labels)
    dtype = np.float32 if image.dtype.kind == "f" else np.uint8
    images = np.ascontiguousarray(image.T).astype(dtype).reshape(-1, SIDE, SIDE)
    return images, labels


def write_mat(path: Path, images: np.ndarray, labels: np.ndarray,
              extra: dict[str, np.ndarray] | None = None, marker: dict | None = None) -> None:
    """Write (N, 40, 40) uint8 ``images`` and ``labels`` in the affNIST layout (plus ``extra``
    struct fields and, for generated sets, a top-level ``capsctl_synth`` marker)."""
    import scipy.io

    n = len(labels)
    struct = {"image": np.ascontiguousarray(images.reshape(n, SIDE * SIDE).T, dtype=np.uint8),
              "label_int": np.asarray(labels, dtype=np.uint8).reshape(1, n),
              "label_one_of_n": np.eye(10, dtype=np.uint8)[np.asarray(labels, dtype=np.int64)].T}
    struct.update(extra or {})
    variables = {STRUCT: struct}
    if marker is not None:
        variables[SYNTH_MARKER] = marker
    scipy.io.savemat(str(path), variables, do_compression=False)


def is_synthetic(path: Path) -> bool:
    try:
        return any(v[0] == SYNTH_MARKER for v in matfile.variables(path, ""))
    except DataError:
        return False  # unreadable: load_struct reports it properly later
