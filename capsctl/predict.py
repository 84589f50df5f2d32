"""`capsctl predict`: a trained model on your own files - PNG, JPEG, BMP (any format the
``folder`` dataset reads) and ``.npy`` arrays, any size, grey or colour.

A file becomes the model's input exactly as the test images of the dataset the checkpoint was
trained on do (``preprocessing_of`` / ``model_input``):

1. decoded to the dataset's stored image (``Preprocessing.side`` x ``side``, ``channels``) by
   ``capsctl.data.folder.decode_image``, the decoder of the ``folder`` dataset: converted to
   grey or RGB, its centre square resized (bilinear, antialiased). The stored side is the
   model's input for digit-like sets (MNIST 28, expanded MNIST's 40 canvas, MultiMNIST's
   canvas), the whole image for natural images (32 for CIFAR/SVHN, ``data.image_size`` for a
   folder) and smallNORB's downsampled 48;
2. on the device, batched: the test-time centre ``crop`` x ``crop`` window and the dataset's
   normalisation (``unit``: pixel / 255; ``standardised``: smallNORB's per-image standardising,
   before the crop), the same primitives (``data/augment.py``, ``data/smallnorb.py``) the
   evaluation sources apply.

So a test image exported as a PNG of its stored image predicts exactly what `capsctl eval`
scores for it (tests/test_predict.py).

Shape legend: N files, B batch, C channels, S stored side, J classes, D capsule dimension.
"""

from __future__ import annotations

import dataclasses
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from capsctl.paths import nearest_existing
from capsctl.data import image_sets_config as isc
from capsctl.data.augment import centre_crop, unit_float
from capsctl.data.files import open_file
from capsctl.data.folder import IMAGE_EXTS, decode_image
from capsctl.data.registry import DATASETS, STANDARDISED
from capsctl.data.smallnorb import DOWNSAMPLED, standardise
from capsctl.data.smallnorb_config import SmallNORBConfig
from capsctl.errors import CapsctlError, DataError

ARRAY_EXT = ".npy"
INPUT_EXTS = IMAGE_EXTS | {ARRAY_EXT}
MAX_ARRAY_BYTES = 1 << 28     # a .npy input larger than 256 MB is refused before it is read
NATURAL = (isc.CIFAR10Config, isc.SVHNConfig, isc.FolderConfig)
SCORE_NAMES = {"v": "|v|", "pose": "activation"}   # by the model's capsule_key; else "score"
ONNX_SUFFIX = ".onnx"   # a model exported by `capsctl export` (run by onnxruntime)


# --- the dataset's test-time preprocessing ------------------------------------------------------

@dataclass(frozen=True)
class Preprocessing:
    """How a test image of a dataset becomes the model's input: the stored image (``side`` x
    ``side``, ``channels``), its centre ``crop`` x ``crop`` window and its ``normalisation``
    (``data/registry.py``'s NORMALISATIONS)."""

    side: int
    channels: int
    crop: int
    normalisation: str


def preprocessing_of(cfg) -> Preprocessing:
    """The test-time view of the dataset ``cfg`` trained on (its model's input side and
    channels)."""
    o, crop = cfg.data, cfg.model.input_size
    if isinstance(o, SmallNORBConfig):       # 96x96 pairs downsampled to 48x48 when read
        side = DOWNSAMPLED
    elif isinstance(o, NATURAL):              # the whole image; the test crop is the centre
        side = isc.natural_side(dataclasses.replace(o, crop=0))
    else:                                     # digits: the image (or canvas) is the input
        side = crop
    return Preprocessing(side, cfg.model.in_channels, crop, DATASETS[o.name].normalisation)


def model_input(images_BCSS: torch.Tensor, view: Preprocessing) -> torch.Tensor:
    """uint8 stored images (B, C, S, S) -> the model's float input (B, C, crop, crop), as the
    dataset's evaluation source makes it."""
    if view.normalisation == STANDARDISED:
        return centre_crop(standardise(images_BCSS.float()), view.crop)
    return unit_float(centre_crop(images_BCSS, view.crop))


# --- finding and reading the files ----------------------------------------------------------------

@dataclass
class Input:
    """One file to predict: its path, a name relative to the argument it was found under (for
    --recon file names) and, when it cannot be used, why."""

    path: Path
    rel: Path
    error: str | None = None


def _walk(folder: Path) -> list[Path]:
    """The image and array files below ``folder`` (any depth; hidden ones skipped), sorted."""
    found = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / f for f in sorted(files)
                  if not f.startswith(".") and Path(f).suffix.lower() in INPUT_EXTS]
    return found


def list_inputs(args: list[str | Path]) -> list[Input]:
    """Every file of ``args`` in order: a file as given (any extension), a folder's image and
    ``.npy`` files (sorted, any depth); a missing path or an empty folder is an Input with an
    error."""
    inputs, seen = [], set()
    for arg in map(Path, args):
        if arg.is_dir():
            files = _walk(arg)
            if not files:
                inputs.append(Input(arg, Path(arg.name), "a folder without images ("
                                    + " ".join(sorted(INPUT_EXTS)) + ")"))
            new = [Input(f, f.relative_to(arg)) for f in files if f not in seen]
        elif arg.exists():  # a file, or a FIFO or device: the reader refuses those
            new = [Input(arg, Path(arg.name))] if arg not in seen else []
        else:
            new = [Input(arg, Path(arg.name), "no such file or folder")]
        seen |= {i.path for i in new}
        inputs += new
    return inputs


def _npy_header(f):
    """(shape, fortran order, dtype) of the .npy file open as ``f``, checked before its data is
    read; ``f`` is left at the start."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        raise ValueError(f".npy format version {version} is not read")
    data_at = f.tell()
    f.seek(0)
    if dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"holds {dtype} (Python objects or records), not pixels")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise ValueError(f"holds {nbytes:,} bytes (at most {MAX_ARRAY_BYTES:,})")
    if os.fstat(f.fileno()).st_size < data_at + nbytes:
        raise ValueError(f"is truncated (the header declares {shape} {dtype})")
    return shape, fortran, dtype


def _pixels(a: np.ndarray) -> np.ndarray:
    """An array of pixels -> uint8 (C, H, W): (H, W), (C, H, W) or (H, W, C) with 1-4
    channels; uint8 as is, other integers 0-255, floats in [0, 1] (x 255, rounded), bools 0 or
    255."""
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[0] > 4 and a.shape[2] <= 4:
        a = a.transpose(2, 0, 1)
    if a.ndim != 3 or not 1 <= a.shape[0] <= 4 or min(a.shape[1:]) < 1:
        raise ValueError(f"has shape {a.shape}; expected (H, W), (C, H, W) or (H, W, C) with "
                         "1 to 4 channels")
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"holds {a.dtype} values outside [0, 1] (float pixels are 0-1)")
        return np.rint(a * 255).astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"holds {a.dtype}, not pixels")
    if a.dtype != np.uint8 and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"holds {a.dtype} values outside 0-255")
    return a.astype(np.uint8)


def _decode_pixels(a_CHW: np.ndarray, side: int, channels: int) -> np.ndarray:
    """uint8 (C, H, W) -> (channels, side, side) through the folder dataset's decoder (the
    array written to a PNG in memory, decoded as an image file is)."""
    from PIL import Image

    c = a_CHW.shape[0]
    if c == channels and c not in (1, 3):      # smallNORB's two cameras: each one as grey
        return np.concatenate([_decode_pixels(a_CHW[k:k + 1], side, 1) for k in range(c)])
    if c == 2:
        raise ValueError(f"has 2 channels; this model takes {channels}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    image = Image.fromarray(np.ascontiguousarray(a_CHW[0] if c == 1 else a_CHW.transpose(1, 2, 0)),
                            mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    buf.seek(0)
    return decode_image(buf, side, channels)


def read_input(path: Path, view: Preprocessing) -> np.ndarray:
    """The stored image of one file, uint8 (channels, side, side); a one-line DataError naming
    the file when it cannot be read."""
    try:
        if path.suffix.lower() == ARRAY_EXT:
            with open_file(path) as f:   # a regular file only (a FIFO is refused at once)
                _npy_header(f)
                array = np.load(f, allow_pickle=False)
            return _decode_pixels(_pixels(array), view.side, view.channels)
        if view.channels not in (1, 3):
            raise DataError(f"{path}: this model takes {view.channels}-channel input "
                            f"(smallNORB's two cameras): give a .npy array ({view.channels}, "
                            "H, W) instead of an image file")
        return decode_image(str(path), view.side, view.channels)
    except DataError:
        raise
    except Exception as e:  # PIL: OSError, SyntaxError, ValueError, DecompressionBombError ...
        what = "array" if path.suffix.lower() == ARRAY_EXT else "image"
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read as an {what} ({first})") from None


def read_inputs(inputs: list[Input], view: Preprocessing, workers: int = 8) -> np.ndarray:
    """uint8 (N, C, S, S) of the readable inputs (in order); an unreadable one gets its
    ``error`` set and no row of the array."""
    todo = [i for i in inputs if i.error is None]

    def one(item: Input):
        try:
            return read_input(item.path, view)
        except DataError as e:
            item.error = str(e)
            return None

    with ThreadPoolExecutor(max(1, min(workers, len(todo)))) as pool:
        images = [a for a in pool.map(one, todo) if a is not None]
    shape = (0, view.channels, view.side, view.side)
    return np.stack(images) if images else np.zeros(shape, dtype=np.uint8)


# --- running the model ------------------------------------------------------------------------------

@torch.no_grad()
def run_model(model, images_NCSS: np.ndarray, view: Preprocessing, device: torch.device,
              batch_size: int, precision: str, recon: bool = False,
              distance: bool = False) -> dict:
    """The model on the stored images (N >= 1), in batches on ``device``: {"scores": (N, J)
    float on the CPU}; with ``recon``, "input" and "recon" (N, C, crop, crop): what the model
    saw and its reconstruction from the predicted class; with ``distance`` (a model with a
    decoder), "distance" (N,): the L2 distance between the two (the detector's,
    capsctl/adversarial/detector.py)."""
    from capsctl.adversarial.detector import l2_distance
    from capsctl.device import autocast
    from capsctl.inspection import probe

    parts: dict[str, list[torch.Tensor]] = {"scores": [], "input": [], "recon": [],
                                            "distance": []}
    for start in range(0, len(images_NCSS), batch_size):
        u8 = torch.from_numpy(images_NCSS[start:start + batch_size]).to(device)
        x = model_input(u8, view)
        with autocast(device, precision):
            out = model(x)      # with a decoder, recon is from the predicted class
        scores_BJ = out["scores"].float()
        parts["scores"].append(scores_BJ.cpu())
        if recon:
            recon_BN = probe.decode(model, probe.capsules(model, out), scores_BJ.argmax(1))
            parts["input"].append(x.float().cpu())
            parts["recon"].append(recon_BN.view_as(x).cpu())
        if distance:            # as the detector measured it (adversarial/detector.examine)
            parts["distance"].append(l2_distance(x, out["recon"]).cpu())
    return {k: torch.cat(v) for k, v in parts.items() if v}


# --- reconstructions ------------------------------------------------------------------------------

def check_recon_dir(folder: Path) -> None:
    """Raise a one-line CapsctlError unless ``--recon FOLDER`` is, or can be made, a folder
    this process may write into (checked before anything is read)."""
    at = nearest_existing(folder)
    if not at.is_dir():
        raise CapsctlError(f"--recon {folder}: {at} is not a folder")
    if not os.access(at, os.W_OK | os.X_OK):
        raise CapsctlError(f"--recon {folder}: cannot write into {at} (permission denied)")


def recon_paths(inputs: list[Input], folder: Path) -> list[Path]:
    """Where each input's reconstruction picture goes: ``folder/<its name>.recon.png`` (the
    subfolders of a folder argument kept), numbered when two inputs would share a name."""
    taken, paths = set(), []
    for item in inputs:
        base = folder / item.rel.parent / item.rel.stem
        path, k = Path(f"{base}.recon.png"), 2
        while path in taken:
            path, k = Path(f"{base}-{k}.recon.png"), k + 1
        taken.add(path)
        paths.append(path)
    return paths


def check_not_there(paths: list[Path], recon_dir) -> None:
    """A one-line CapsctlError when a reconstruction picture would replace a file (checked
    before the model runs: nothing is written)."""
    there = [p for p in paths if os.path.lexists(p)]
    if there:
        more = f" (and {len(there) - 1} more)" if len(there) > 1 else ""
        raise CapsctlError(f"--recon {recon_dir}: {there[0]} exists{more}; pass --force to "
                           "overwrite, or choose another folder")


def shown(x_CHW: torch.Tensor, view: Preprocessing) -> torch.Tensor:
    """An input as a picture in [0, 1]: as it is for pixel / 255 inputs, stretched from its
    minimum to its maximum for standardised ones."""
    if view.normalisation != STANDARDISED:
        return x_CHW
    lo, hi = x_CHW.min(), x_CHW.max()
    return (x_CHW - lo) / (hi - lo).clamp_min(1e-6)


def save_recon(x_CHW: torch.Tensor, recon_CHW: torch.Tensor, view: Preprocessing,
               path: Path) -> Path:
    """The input (as the model saw it) beside its reconstruction, upscaled to about 128 px,
    as a PNG at ``path``; returns it."""
    from capsctl.inspection.draw import LINE, canvas, save_png, tile, to_tensor

    scale = max(1, min(8, 128 // x_CHW.shape[-1]))
    left, right = tile(shown(x_CHW, view), scale), tile(recon_CHW, scale)
    page = canvas(left.width + right.width + 3, left.height + 2, LINE)
    page.paste(left, (1, 1))
    page.paste(right, (left.width + 2, 1))
    return save_png(to_tensor(page), path)


# --- predict ----------------------------------------------------------------------------------------

def rows_of(inputs: list[Input], scores_NJ: torch.Tensor, names: list[str],
            top_k: int, distance_N: torch.Tensor | None = None,
            threshold: float | None = None) -> list[dict]:
    """One row per input, in order: {"file", "class", "index", "score", "top_k": [{"class",
    "score"}], "scores": {class: score}}; or {"file", "error"} for an unreadable input. With
    ``distance_N`` rows also have "distance" (the reconstruction distance) and "unusual"
    (above ``threshold``)."""
    rows, n = [], 0
    k = min(top_k, len(names))
    for item in inputs:
        if item.error is not None:
            rows.append({"file": str(item.path), "error": item.error})
            continue
        s_J = scores_NJ[n]
        n += 1
        best = torch.topk(s_J, k)
        top = [{"class": names[j], "score": float(v)}
               for v, j in zip(best.values.tolist(), best.indices.tolist())]
        rows.append({"file": str(item.path), "class": top[0]["class"],
                     "index": int(best.indices[0]), "score": top[0]["score"], "top_k": top,
                     "scores": dict(zip(names, map(float, s_J.tolist())))})
        if distance_N is not None:
            d = float(distance_N[n - 1])
            rows[-1].update({"distance": d, "unusual": bool(d > threshold)})
    return rows


def _first_error(inputs: list[Input]) -> None:
    """Raise the first unreadable input's one-line DataError (with the count of the others)."""
    bad = [i for i in inputs if i.error is not None]
    if bad:
        more = f" (and {len(bad) - 1} more unreadable; --keep-going predicts the others)" \
            if len(bad) > 1 else ""
        message = bad[0].error
        if not message.startswith(str(bad[0].path)):
            message = f"{bad[0].path}: {message}"
        raise DataError(message + more)


def predict(checkpoint, files: list, device_name: str | None = None,
            batch_size: int | None = None, top_k: int = 3, recon_dir: str | Path | None = None,
            keep_going: bool = False, data_root: str | None = None, force: bool = False) -> dict:
    """Predict the class of every file of ``files`` (files and folders) with the model of
    ``checkpoint``. Returns {"checkpoint", "dataset", "classes", "score_name", "rows"} (rows:
    see ``rows_of``; with ``recon_dir`` each row has "recon", its picture). An unreadable file
    is a one-line DataError, or with ``keep_going`` an error row. A reconstruction picture
    that exists already is a one-line error before the model runs, unless ``force``. A model
    whose checkpoint keeps a detector (capsctl/adversarial/detector.py) adds "distance" and
    "unusual" to every row, and the result says "threshold"."""
    from capsctl.adversarial.detector import Detector
    from capsctl.checkpoint import load_model
    from capsctl.classes import class_names_of
    from capsctl.device import resolve
    from capsctl.inspection import probe

    if top_k < 1:
        raise CapsctlError(f"--top-k {top_k}: expected 1 or more")
    if recon_dir is not None:
        check_recon_dir(Path(recon_dir))
    if Path(checkpoint).suffix.lower() == ONNX_SUFFIX:
        return predict_onnx(checkpoint, files, batch_size, top_k, recon_dir, keep_going, force)
    device = resolve(device_name or "auto")
    model, cfg, state = load_model(checkpoint, device)
    if recon_dir is not None:
        probe.require_decoder(model, "--recon")
    names = class_names_of(cfg, state, data_root)
    view = preprocessing_of(cfg)
    inputs, images, targets = _inputs(files, view, recon_dir, keep_going, force)
    detector = Detector.of(state) if model.has_decoder else None
    out = run_model(model, images, view, device, batch_size or cfg.train.eval_batch_size,
                    cfg.train.precision, recon_dir is not None, detector is not None) \
        if len(images) else {"scores": torch.zeros(0, len(names))}
    rows = rows_of(inputs, out["scores"], names, top_k, out.get("distance"),
                   detector.threshold if detector else None)
    if recon_dir is not None and len(images):
        ok_rows = [r for r in rows if "error" not in r]
        for b, (row, path) in enumerate(zip(ok_rows, targets)):
            row["recon"] = str(save_recon(out["input"][b], out["recon"][b], view, path))
    return {"checkpoint": str(checkpoint), "dataset": cfg.data.name, "classes": names,
            "score_name": SCORE_NAMES.get(model.capsule_key, "score"), "rows": rows,
            "threshold": detector.threshold if detector else None}


def _inputs(files: list, view, recon_dir, keep_going: bool, force: bool):
    """The inputs (with their errors), their images, and the reconstruction pictures to write
    (refused when one exists and not ``force``); the first bad input is the error unless
    ``keep_going``."""
    inputs = list_inputs(files)
    images = read_inputs(inputs, view)
    if not keep_going:
        _first_error(inputs)
    good = [i for i in inputs if i.error is None]
    targets = recon_paths(good, Path(recon_dir)) if recon_dir is not None else []
    if not force:
        check_not_there(targets, recon_dir)
    return inputs, images, targets


def predict_onnx(path, files: list, batch_size: int | None = None, top_k: int = 3,
                 recon_dir: str | Path | None = None, keep_going: bool = False,
                 force: bool = False) -> dict:
    """``predict`` with a model exported by ``capsctl export`` to ONNX, run by onnxruntime on
    the CPU: the preprocessing and class names come from the file's metadata, the rows are
    ``predict``'s. ``recon_dir`` needs a file exported ``--with-decoder``."""
    from capsctl.export_runtime import onnx_session, run_onnx

    session, meta = onnx_session(path)
    if recon_dir is not None and "recon" not in meta["outputs"]:
        raise CapsctlError(f"--recon: {path} was exported without the decoder (capsctl export "
                           "--with-decoder)")
    i = meta["input"]
    view = Preprocessing(int(i["side"]), int(i["channels"]), int(i["crop"]),
                         str(i["normalisation"]))
    names = [str(n) for n in meta["classes"]]
    inputs, images, targets = _inputs(files, view, recon_dir, keep_going, force)
    fixed = meta["batch"] if isinstance(meta["batch"], int) else None
    scores = torch.zeros(0, len(names))
    if len(images):
        x = model_input(torch.from_numpy(images), view)
        outs = run_onnx(session, x.numpy(), fixed, batch_size or 100)
        scores = torch.from_numpy(outs["scores"]).float()
    rows = rows_of(inputs, scores, names, top_k)
    if recon_dir is not None and len(images):
        ok_rows = [r for r in rows if "error" not in r]
        recon = torch.from_numpy(outs["recon"]).view_as(x)
        for b, (row, target) in enumerate(zip(ok_rows, targets)):
            row["recon"] = str(save_recon(x[b], recon[b], view, target))
    return {"checkpoint": str(path), "dataset": meta["dataset"], "classes": names,
            "score_name": meta.get("score_name", "score"), "rows": rows}
