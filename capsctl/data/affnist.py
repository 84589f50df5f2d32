"""affNIST (T. Tieleman): MNIST digits under random affine transforms on a 40x40 canvas.

Files and layout
  MATLAB v5 ``.mat`` files holding one struct ``affNISTdata`` with ``image`` (1600 x N uint8,
  one picture per column; a column read in row-major order is the 40x40 picture, pinned by a test
  that round-trips MNIST padded by 6 px), ``label_int`` (1 x N) and, in the official files,
  ``label_one_of_n`` and the applied transforms. The test set comes as ``test_batches/1.mat`` ...
  ``32.mat`` (10,000 images each, the k-th transform of every MNIST test digit) or as one
  ``test.mat``; the validation set as ``validation_batches/`` or ``validation.mat``.

Where they are looked for: ``<data root>/affnist/`` for the official files and
``<data root>/affnist-synth/`` for the set made by ``capsctl data affnist-synth``; the data root is
the one MNIST uses (``--data-root`` > ``data.root`` > ``$CAPSCTL_DATA`` > ``~/.cache/capsctl``).
A downloaded ``test_batches.zip`` lying there is unpacked on first use.

Evaluation streams the files one at a time (``MatSource``): memory stays flat in N.

The synthetic set (``generate_round`` / ``write_synth``) follows the creator's recipe for machines
without the real files: every MNIST test digit, ``per_digit`` random affine versions, rotation
within +-20 degrees, shear within +-0.2, horizontal and vertical scale each in [0.8, 1.2], then a
random translation that keeps the whole digit inside the frame. It is written in the same layout
plus the applied transforms and a ``capsctl_synth`` marker, and is always reported as
"affnist-synth", never as affNIST.
"""

from __future__ import annotations

import math
import os
import shutil
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from capsctl.data.augment import generator
from capsctl.data import matfile
from capsctl.data.matfile import MAT_MAX_DEPTH, check_mat_structure  # noqa: F401 (re-exported)
from capsctl.errors import DataError

SIDE = 40
STRUCT = "affNISTdata"
SYNTH_MARKER = "capsctl_synth"
SYNTH_STREAM = 21
BASE_URL = "https://www.cs.toronto.edu/~tijmen/affNIST/32x/transformed/"
BATCH_DIRS = {"test": "test_batches", "val": "validation_batches"}
SINGLE_FILES = {"test": "test.mat", "val": "validation.mat"}


class MissingDataError(DataError):
    """The files of a dataset are not there (as opposed to being there but unreadable)."""


# --- reading and writing the .mat layout ----------------------------------------------------------

MAX_UNPACKED = 8 << 30  # a downloaded batches zip (the official test_batches: about 0.6 GB)


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


# --- finding (and fetching) the files -------------------------------------------------------------

def _numbered(folder: Path) -> list[Path]:
    """The ``1.mat .. K.mat`` of a batches folder in order; a DataError naming any other
    ``.mat`` file there (``notes.mat``, ``01.mat``) or a gap in the numbers."""
    files = [p for p in folder.glob("*.mat") if p.is_file()]
    stray = sorted(p.name for p in files
                   if not (p.stem.isascii() and p.stem.isdigit() and str(int(p.stem)) == p.stem))
    if stray:
        raise DataError(f"{folder}: {stray[0]} is not a numbered batch (the folder holds 1.mat "
                        "... K.mat only); move it out")
    files.sort(key=lambda p: int(p.stem))
    got = [int(p.stem) for p in files]
    gap = next((k for k, g in zip(range(1, len(files) + 1), got) if k != g), None)
    if gap is not None:
        raise DataError(f"{folder}: {gap}.mat is missing (found {len(files)} numbered "
                        "batches, not 1..K); restore it or unpack the zip again")
    return files


def _unpack(zip_path: Path, folder: Path, dirname: str) -> None:
    """Unpack the ``.mat`` members of ``zip_path`` into ``folder/dirname`` (via a temp folder).
    The sizes the archive declares are checked first (at most MAX_UNPACKED, and no more than the
    free disk space): a zip bomb is refused before anything is written, and zipfile never
    inflates a member past its declared size."""
    tmp = folder / f".{dirname}.unpacking"
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith(".mat") and not i.is_dir()]
            total = sum(i.file_size for i in members)
            free = shutil.disk_usage(folder).free
            if total > min(MAX_UNPACKED, free):
                raise DataError(f"{zip_path}: its .mat files would take {total} bytes unpacked, "
                                f"more than {'the limit' if free > MAX_UNPACKED else 'is free'} "
                                f"({min(MAX_UNPACKED, free)}); delete it and download it again")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for member in members:
                with zf.open(member) as src, open(tmp / Path(member.filename).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError,
            RuntimeError, ValueError) as e:  # corrupt, unsupported or encrypted members
        shutil.rmtree(tmp, ignore_errors=True)
        first = str(e).split("\n")[0][:160]
        raise DataError(f"{zip_path}: cannot unpack ({type(e).__name__}: {first}); delete it and "
                        "download it again") from None
    os.replace(tmp, folder / dirname)


def split_files(folder: Path, split: str) -> list[Path] | None:
    """The ``.mat`` files of ``split`` in ``folder`` in order, or None when there are none."""
    batches = folder / BATCH_DIRS[split]
    if not batches.is_dir() and (folder / f"{BATCH_DIRS[split]}.zip").is_file():
        _unpack(folder / f"{BATCH_DIRS[split]}.zip", folder, BATCH_DIRS[split])
    if batches.is_dir():
        files = _numbered(batches)
        if files:
            return files
    single = folder / SINGLE_FILES[split]
    return [single] if single.is_file() else None


def download(root: Path, split: str = "test") -> Path:
    """Fetch and unpack the official ``test_batches.zip`` (or validation) into ``root/affnist``."""
    folder = root / "affnist"
    name = f"{BATCH_DIRS[split]}.zip"
    url = BASE_URL + name
    target = folder / name
    part = target.with_name(name + ".part")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        urllib.request.urlretrieve(url, part)
        os.replace(part, target)
    except Exception as e:  # network errors come in many types
        part.unlink(missing_ok=True)
        raise MissingDataError(f"downloading {url} failed ({type(e).__name__}: {e}); download "
                               f"it by hand and unzip it into {folder}") from None
    _unpack(target, folder, BATCH_DIRS[split])
    return folder / BATCH_DIRS[split]


def _missing(name: str, folder: Path, split: str, root: Path) -> MissingDataError:
    batch1, single = folder / BATCH_DIRS[split] / "1.mat", folder / SINGLE_FILES[split]
    looked = f"{batch1} (... K.mat) nor {single}"
    if name == "affnist-synth":
        return MissingDataError(f"affnist-synth files not found: no {looked}; make them with "
                                f"capsctl data affnist-synth --data-root {root}")
    return MissingDataError(f"affNIST {split} files not found: no {looked}; download "
                            f"{BASE_URL}{BATCH_DIRS[split]}.zip and unzip it into {folder}, or run "
                            f"capsctl data affnist-download --data-root {root}")


# --- the evaluation source ------------------------------------------------------------------------

def _as_input(images_BHW: torch.Tensor) -> torch.Tensor:
    """0-255 pixels (uint8 or float) -> float32 (B, 1, H, W) in [0, 1], never in place."""
    return images_BHW.unsqueeze(1).float() / 255.0


class MatSource:
    """Batches of affNIST-format files, one file in memory at a time.

    Same interface as ``EvalSource``: ``batches(batch_size, limit)``, ``get(idx)``, ``len()``,
    ``name``. Batches do not straddle files (the last batch of each file may be smaller).
    """

    task = "single"  # one label per image (capsctl/data/registry.py)
    default_limit = None

    def __init__(self, files: list[Path], name: str, device: torch.device):
        self.files, self.name, self.device = list(files), name, torch.device(device)
        self._counts: list[int] | None = None
        self._cached: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def counts(self) -> list[int]:
        """Images per file (reads every file once, checking it)."""
        if self._counts is None:
            self._counts = [len(read_mat(p)[1]) for p in self.files]
        return self._counts

    def __len__(self) -> int:
        return sum(self.counts())

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cached is None or self._cached[0] != i:
            self._cached = None  # free the previous file before reading the next
            images, labels = read_mat(self.files[i])
            self._cached = (i, torch.from_numpy(images).to(self.device),
                            torch.from_numpy(labels).to(self.device))
        return self._cached[1], self._cached[2]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict]:
        left = math.inf if limit is None else limit
        for i in range(len(self.files)):
            if left <= 0:
                return
            images, labels = self._load(i)
            for start in range(0, len(labels), batch_size):
                if left <= 0:
                    return
                stop = start + int(min(batch_size, left))
                left -= min(stop, len(labels)) - start
                yield {"x": _as_input(images[start:stop]), "y": labels[start:stop]}
        self._cached = None

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at global indices ``idx`` (files in order, concatenated)."""
        idx_np = torch.as_tensor(idx).cpu().numpy().astype(np.int64)
        ends = np.cumsum(self.counts())
        if idx_np.size and (idx_np.min() < 0 or idx_np.max() >= ends[-1]):
            raise IndexError(f"index out of range for {self.name} ({ends[-1]} images)")
        file_of = np.searchsorted(ends, idx_np, side="right")
        x = torch.empty((len(idx_np), SIDE, SIDE), dtype=torch.float32, device=self.device)
        y = torch.empty(len(idx_np), dtype=torch.long, device=self.device)
        for i in np.unique(file_of):
            rows = np.nonzero(file_of == i)[0]
            local = idx_np[rows] - (ends[i - 1] if i else 0)
            images, labels = self._load(int(i))
            rows_t = torch.from_numpy(rows).to(self.device)
            local_t = torch.from_numpy(local).to(self.device)
            x[rows_t], y[rows_t] = images[local_t].float(), labels[local_t]
        return {"x": _as_input(x), "y": y}


def open_source(name: str, split: str, root: Path, device: torch.device,
                download_missing: bool = False) -> MatSource:
    """The ``affnist`` or ``affnist-synth`` source of ``split`` under the data root ``root``."""
    if name == "affnist-synth" and split != "test":
        raise DataError("affnist-synth has only a test split (made from the MNIST test digits); "
                        "use --split test")
    folder = root / name
    files = split_files(folder, split)
    if files is None and name == "affnist" and download_missing:
        download(root, split)
        files = split_files(folder, split)
    if files is None:
        raise _missing(name, folder, split, root)
    if name == "affnist" and is_synthetic(files[0]):
        raise DataError(f"{files[0]} was made by capsctl data affnist-synth, not the official "
                        f"affNIST; move it to {root / 'affnist-synth'} and evaluate it as "
                        "--dataset affnist-synth")
    return MatSource(files, name, device)


# --- the synthetic set: the creator's recipe ------------------------------------------------------

@dataclass(frozen=True)
class SynthRanges:
    """Ranges of the random affine transform (uniform draws)."""

    rotation: float = 20.0   # degrees, +-
    shear: float = 0.2       # horizontal shear factor, +-
    scale_min: float = 0.8   # horizontal and vertical scale, each drawn on its own
    scale_max: float = 1.2

    def check(self) -> None:
        if not 0 <= self.rotation <= 180:
            raise DataError(f"--rotation {self.rotation}: expected 0 to 180 degrees")
        if not 0 <= self.shear <= 1:
            raise DataError(f"--shear {self.shear}: expected 0 to 1")
        if not 0 < self.scale_min <= self.scale_max <= 1.4:
            raise DataError(f"--scale-min {self.scale_min} / --scale-max {self.scale_max}: "
                            "expected 0 < min <= max <= 1.4 (larger digits cannot stay inside "
                            "the 40x40 frame)")


def linear_part(params_N6: torch.Tensor) -> torch.Tensor:
    """(N, 2, 2) matrices A = R(rotation) @ Shear(shear) @ Scale(scale_x, scale_y) acting on
    (x, y) = (column, row) pixel coordinates; positive rotation turns the digit counter-clockwise
    as displayed (y points down)."""
    th = torch.deg2rad(params_N6[:, 0])
    c, s = torch.cos(th), torch.sin(th)
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    rot = torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)
    shear = torch.stack([torch.stack([one, params_N6[:, 1]], -1),
                         torch.stack([zero, one], -1)], -2)
    scale = torch.diag_embed(params_N6[:, 2:4])
    return rot @ shear @ scale


def forward_matrix(params_N6: torch.Tensor, src_side: int = 28) -> torch.Tensor:
    """(N, 2, 3) maps a source pixel (x, y, 1) to canvas coordinates: q = A (p - c) + t, with c
    the source centre and t = params[:, 4:6] where that centre lands on the canvas."""
    a = linear_part(params_N6)
    c = torch.full((2,), (src_side - 1) / 2, dtype=params_N6.dtype)
    return torch.cat([a, (params_N6[:, 4:6] - a @ c)[:, :, None]], dim=2)


def _ink_box(digits_NHW: torch.Tensor) -> torch.Tensor:
    """(N, 4) x0, y0, x1, y1 of the nonzero pixels (the whole image when blank)."""
    side = digits_NHW.shape[-1]
    ink = digits_NHW > 0
    cols, rows = ink.any(1), ink.any(2)
    ar = torch.arange(side)
    big = torch.full_like(ar, side)
    x0 = torch.where(cols, ar, big).min(1).values
    x1 = torch.where(cols, ar, -1).max(1).values
    y0 = torch.where(rows, ar, big).min(1).values
    y1 = torch.where(rows, ar, -1).max(1).values
    box = torch.stack([x0, y0, x1, y1], 1)
    blank = ~ink.flatten(1).any(1)
    box[blank] = torch.tensor([0, 0, side - 1, side - 1])
    return box.double()


def draw_transforms(digits_NHW: torch.Tensor, ranges: SynthRanges, g: torch.Generator,
                    max_tries: int = 200) -> torch.Tensor:
    """(N, 6) float64 params (rotation_deg, shear, scale_x, scale_y, centre_x, centre_y).

    The translation is uniform over the positions where everything a bilinear resampling can
    light (the ink box grown by one source pixel, transformed) lies inside the 40x40 frame;
    transforms for which no such position exists are drawn again.
    """
    n, side = digits_NHW.shape[0], digits_NHW.shape[-1]
    box = _ink_box(digits_NHW)
    c = (side - 1) / 2
    corners_N42 = torch.stack([box[:, [0, 1]], box[:, [2, 1]], box[:, [0, 3]], box[:, [2, 3]]], 1)
    corners_N42 = corners_N42 + torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]],
                                             dtype=torch.float64) - c
    params = torch.zeros(n, 6, dtype=torch.float64)
    todo = torch.arange(n)
    for _ in range(max_tries):
        if len(todo) == 0:
            return params
        u = torch.rand(len(todo), 6, generator=g, dtype=torch.float64)
        p = torch.empty_like(u)
        p[:, 0] = (2 * u[:, 0] - 1) * ranges.rotation
        p[:, 1] = (2 * u[:, 1] - 1) * ranges.shear
        p[:, 2:4] = ranges.scale_min + u[:, 2:4] * (ranges.scale_max - ranges.scale_min)
        moved_N42 = corners_N42[todo] @ linear_part(p).transpose(1, 2)
        lo, hi = -moved_N42.min(1).values, (SIDE - 1) - moved_N42.max(1).values
        fits = (hi >= lo).all(1)
        p[:, 4:6] = lo + u[:, 4:6] * (hi - lo)
        params[todo[fits]] = p[fits]
        todo = todo[~fits]
    raise DataError(f"{len(todo)} digits do not fit the 40x40 frame after {max_tries} draws; "
                    "lower --scale-max or --shear")


def render(digits_NHW: torch.Tensor, params_N6: torch.Tensor, chunk: int = 2500) -> torch.Tensor:
    """uint8 (N, 40, 40): each digit warped by its transform (bilinear, zero outside)."""
    n, side = digits_NHW.shape[0], digits_NHW.shape[-1]
    a = linear_part(params_N6)
    a_inv = torch.linalg.inv(a)
    ys, xs = torch.meshgrid(torch.arange(SIDE, dtype=torch.float64),
                            torch.arange(SIDE, dtype=torch.float64), indexing="ij")
    q_P2 = torch.stack([xs.flatten(), ys.flatten()], 1)  # canvas pixel (x, y), P = 1600
    out = torch.empty(n, SIDE, SIDE, dtype=torch.uint8)
    c = (side - 1) / 2
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        # source position of every canvas pixel: p = A^-1 (q - t) + c
        p_NP2 = (q_P2[None] - params_N6[sl, None, 4:6]) @ a_inv[sl].transpose(1, 2) + c
        grid = (p_NP2 / (side - 1) * 2 - 1).float().view(-1, SIDE, SIDE, 2)
        src = digits_NHW[sl].float().unsqueeze(1)
        warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=True)
        out[sl] = warped[:, 0].round().clamp_(0, 255).to(torch.uint8)
    return out


def generate_round(digits_NHW: np.ndarray, ranges: SynthRanges, seed: int,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """Round ``k`` (0-based): one transformed version of every digit. Deterministic in
    (seed, k) and independent of the other rounds. Returns images (N, 40, 40) uint8 and the
    params (N, 6)."""
    digits = torch.from_numpy(np.array(digits_NHW, dtype=np.uint8))  # a writable copy
    g = generator(torch.device("cpu"), seed, SYNTH_STREAM, k)
    params = draw_transforms(digits, ranges, g)
    return render(digits, params).numpy(), params.numpy()


def write_synth(out: Path, digits_NHW: np.ndarray, labels: np.ndarray, per_digit: int,
                seed: int, ranges: SynthRanges, force: bool = False,
                progress: Callable[[int], None] | None = None) -> dict:
    """Write ``out/test_batches/1.mat .. per_digit.mat`` (round k = file k) and a README.txt.

    Besides ``image`` and ``label_int`` each file stores, per image, ``source_index`` (the MNIST
    test digit), ``transform_params`` (6 x N: rotation_deg, shear, scale_x, scale_y, centre_x,
    centre_y) and ``affine_transforms`` (6 x N: the rows of the 2x3 forward matrix in pixel
    coordinates, x' = a x + b y + c, y' = d x + e y + f).
    """
    ranges.check()
    if per_digit < 1:
        raise DataError(f"--per-digit {per_digit}: expected at least 1")
    target = out / BATCH_DIRS["test"]
    if target.exists() and any(target.iterdir()):
        if not force:
            raise DataError(f"{target} already holds files; choose another --out or pass --force "
                            "to move them aside")
        shutil.move(str(target), str(target.with_name(
            f"{target.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")))
    tmp = out / f".{target.name}.writing"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as e:
        raise DataError(f"cannot write to {out}: {e.strerror or e}; pick another --out") from None
    n = len(labels)
    index = np.arange(n, dtype=np.int32).reshape(1, n)
    for k in range(per_digit):
        images, params = generate_round(digits_NHW, ranges, seed, k)
        matrix = forward_matrix(torch.from_numpy(params)).numpy().reshape(n, 6)
        marker = {"seed": seed, "round": k + 1, "per_digit": per_digit, **asdict(ranges)}
        write_mat(tmp / f"{k + 1}.mat", images, labels,
                  extra={"source_index": index, "transform_params": params.T.copy(),
                         "affine_transforms": matrix.T.copy()},
                  marker=marker)
        if progress is not None:
            progress(k + 1)
    os.replace(tmp, target)
    (out / "README.txt").write_text(
        "affnist-synth: an affNIST-style test set made by `capsctl data affnist-synth` from the "
        "MNIST test digits\n(not the official affNIST; results on it are reported as "
        f"affnist-synth).\nseed {seed}, {per_digit} versions per digit, {n} digits, "
        f"rotation +-{ranges.rotation} deg, shear +-{ranges.shear}, "
        f"scale [{ranges.scale_min}, {ranges.scale_max}] per axis.\n")
    return {"folder": str(target), "files": per_digit, "images": n * per_digit, "digits": n}
