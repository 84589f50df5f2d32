"""Pretrained models small enough for git: ``pretrained/NAME/``, made from a run's checkpoint by
``capsctl pretrained export``, listed by ``capsctl pretrained``, and accepted wherever a
checkpoint is (``capsctl eval|predict|reconstruct|perturb|routes pretrained/NAME``).

A folder holds:

- ``model.pt``: a capsctl checkpoint (format 2, read by ``checkpoint.load`` with
  ``weights_only=True`` and every check of any checkpoint) without the optimizer and random
  state, whose weights are stored in reduced precision. The classifier (every tensor outside
  ``decoder.``) is kept in fp32 by default - its test accuracy is then exactly the run's - or in
  bf16. The decoder's weight matrices are stored as symmetric integers with a float32 scale per
  group (``packed``: int8 with one scale per row, or int4 - two values a byte - with a scale per
  32 values); its biases stay fp32. Loading expands everything to fp32 before the model is built
  (``packing.unpack``). ``--decoder auto`` keeps the most precise storage that fits the size limit
  (2 MB): Efficient-CapsNet's 161,824 classifier parameters in fp32 (647 KB) plus its
  1,411,344-parameter decoder in int4 (790 KB) make about 1.45 MB; int8 would make 2.08 MB.
- ``card.json``: what the model is and how well it does, measured on the stored model itself at
  export: the test set's correct count and accuracy (through ``capsctl eval``'s own code, so
  ``capsctl eval pretrained/NAME`` prints the same number), the source checkpoint's accuracy
  (the effect of the reduced precision on it), how much the decoder's storage moves the
  reconstructions, the first test examples' accuracy (``slice.npz``), the data, epochs, size,
  storage, the exact training command and the config.
- ``slice.npz``: the first ``n`` test examples exactly as evaluation feeds them to the model
  (uint8 pixels, labels), so the recorded accuracy can be checked where the dataset is absent.

Torch-free at import: listing reads only the cards.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from capsctl.errors import CapsctlError
from capsctl.packing import DECODER_STORAGE, INT4_GROUP, pack

MODEL_FILE, CARD_FILE, SLICE_FILE = "model.pt", "card.json", "slice.npz"
CARD_VERSION = 1
MAX_BYTES = 2_000_000          # a committed model.pt is at most this (git-friendly)
SLICE_N = 200                  # test examples kept in slice.npz


def repo_folder() -> Path:
    """The repository's ``pretrained/`` folder: ``./pretrained`` when the current folder has
    one, else the one beside the capsctl package (an editable install from a clone)."""
    here = Path("pretrained")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[1] / "pretrained"


def model_state(state: dict, classifier: str, decoder: str) -> dict:
    """The model.pt dict of a checkpoint ``state``: its weights packed, its config, class names
    and position; no optimizer, random state or metrics."""
    plain, packed = pack(state["model"], classifier, decoder)
    keep = ("config", "class_names", "step", "epoch", "best_val_accuracy", "best_step")
    return {"format_version": 2, **{k: state[k] for k in keep if k in state},
            "model": plain, "packed": packed,
            "storage": {"classifier": classifier, "decoder": decoder,
                        "int4_group": INT4_GROUP}}


def serialized(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes (what model.pt will hold)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def choose_storage(state: dict, classifier: str, decoder: str, max_bytes: int
                   ) -> tuple[dict, bytes, str]:
    """(model.pt dict, its bytes, the decoder storage used): ``decoder`` "auto" tries
    fp32, bf16, int8, int4 in turn and keeps the first within ``max_bytes``."""
    tried = []
    for kind in (DECODER_STORAGE if decoder == "auto" else (decoder,)):
        s = model_state(state, classifier, kind)
        raw = serialized(s)
        if len(raw) <= max_bytes:
            return s, raw, kind
        tried.append(f"{kind} {len(raw) / 1e6:.2f} MB")
    raise CapsctlError(f"the model does not fit {max_bytes / 1e6:g} MB with the classifier in "
                       f"{classifier} (decoder {', '.join(tried)}); try --classifier bf16 or "
                       "raise --max-mb")


# --- the test slice ------------------------------------------------------------------------------

class SliceSource:
    """An evaluation source over slice.npz: uint8 (N, C, H, W) pixels fed as pixel / 255."""

    task = "single"
    default_limit = None
    name = "test-slice"

    def __init__(self, x_u8, y, device):
        import torch

        self.x = torch.from_numpy(x_u8).to(device)
        self.y = torch.from_numpy(y).to(device)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def get(self, idx) -> dict:
        return {"x": self.x[idx].float().div_(255.0), "y": self.y[idx]}

    def batches(self, batch_size: int, limit: int | None = None):
        import torch

        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield self.get(torch.arange(start, min(start + batch_size, n), device=self.x.device))


def slice_of(source, n: int) -> tuple[Any, Any]:
    """(uint8 pixels, int64 labels) of ``source``'s first ``n`` examples as evaluation sees
    them; refused when its pixels are not k / 255 (a standardised dataset)."""
    import numpy as np
    import torch

    batch = source.get(torch.arange(min(n, len(source)), device=source_device(source)))
    x, y = batch["x"].float().cpu(), batch["y"].cpu()
    u8 = torch.round(x * 255).clamp(0, 255).to(torch.uint8)
    if not torch.equal(u8.float().div(255.0), x) or y.dim() != 1:
        raise CapsctlError("the test examples are not pixel / 255 images with one label each; "
                           "no slice.npz can hold them (use --slice 0)")
    return u8.numpy(), y.to(torch.int64).numpy().astype(np.int64)


def source_device(source):
    data = getattr(source, "data", None)
    return getattr(getattr(data, "images", None), "device", "cpu")


def read_slice(folder: Path):
    """(uint8 pixels, labels) of ``folder``/slice.npz (no pickles allowed)."""
    import numpy as np

    path = Path(folder) / SLICE_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z["x"], z["y"]
    except (OSError, ValueError, KeyError) as e:
        raise CapsctlError(f"{path}: not a readable test slice ({e})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != (len(x),):
        raise CapsctlError(f"{path}: expected x uint8 (N, C, H, W) and y int64 (N,)")
    return x, y


def evaluate_slice(folder: Path, device_name: str | None = None) -> dict:
    """{"n", "correct", "accuracy"} of the model in ``folder`` on its slice.npz, evaluated as
    ``capsctl eval`` does (its eval batch size and precision)."""
    from capsctl.checkpoint import load_model
    from capsctl.device import resolve
    from capsctl.evaluate import evaluate

    device = resolve(device_name or "auto")
    model, cfg, _ = load_model(Path(folder), device)
    x, y = read_slice(folder)
    m = evaluate(model, SliceSource(x, y, device), cfg.train.eval_batch_size, device,
                 cfg.train.precision)
    return {"n": m["n"], "correct": m["correct"], "accuracy": m["accuracy"]}


# --- export ---------------------------------------------------------------------------------------

def _recon_change(source_model, packed_model, x_u8, device, precision: str) -> dict | None:
    """How the decoder's storage moves the reconstructions of the slice (each masked with the
    source model's prediction): mean and largest absolute pixel change, and each model's mean
    squared error to the input."""
    import torch

    from capsctl.device import autocast

    if not getattr(source_model, "has_decoder", False) or not len(x_u8):
        return None
    x = torch.from_numpy(x_u8[:64]).to(device).float().div_(255.0)
    with torch.no_grad(), autocast(device, precision):
        a = source_model(x)
        b = packed_model(x, a["scores"].argmax(1))
    ra, rb = a["recon"].float().reshape(len(x), -1), b["recon"].float().reshape(len(x), -1)
    target = x.reshape(len(x), -1)
    if ra.shape != target.shape:
        return None
    return {"n": len(x), "mean_abs_change": float((ra - rb).abs().mean()),
            "max_abs_change": float((ra - rb).abs().max()),
            "mse_source": float(((ra - target) ** 2).mean()),
            "mse_stored": float(((rb - target) ** 2).mean())}


def _check_name(name: str) -> None:
    ok = name and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name) \
        and name[0].isalnum()
    if not ok:
        raise CapsctlError(f"--name {name!r}: use letters, digits, '-', '_' and '.' (at most "
                           "64, starting with a letter or digit)")


def _test_result(folder: Path, device_name, data_root) -> dict:
    """The test-set row of ``capsctl eval FOLDER`` (its own code path)."""
    from capsctl.evaluate import evaluate_checkpoints

    r = evaluate_checkpoints([folder], [], "test", device_name, None, None, data_root)[0]
    return {k: r[k] for k in ("dataset", "split", "n", "correct", "accuracy", "error")}


def _write_card(folder: Path, card: dict) -> None:
    tmp = folder / f".{CARD_FILE}.tmp"
    tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CARD_FILE)


def export(checkpoint_path, name: str, root: Path | None = None, classifier: str = "fp32",
           decoder: str = "auto", max_bytes: int = MAX_BYTES, command: str | None = None,
           note: str | None = None, slice_n: int = SLICE_N, device_name: str | None = None,
           data_root: str | None = None, force: bool = False) -> dict:
    """Write ``root``/``name``/ (model.pt, slice.npz, card.json) from a run's checkpoint and
    return its card: the stored model is evaluated on the test set (and the slice) as
    ``capsctl eval`` evaluates it, and so is the source checkpoint, for the card."""
    import numpy as np

    from capsctl import checkpoint
    from capsctl.data.build import build_eval
    from capsctl.device import describe, resolve
    from capsctl.models import count_parameters

    _check_name(name)
    folder = Path(root if root is not None else repo_folder()) / name
    if folder.exists() and not force and any(folder.iterdir()):
        raise CapsctlError(f"{folder} exists and is not empty; pass --force to replace it")
    if slice_n < 0:
        raise CapsctlError(f"--slice {slice_n}: expected 0 or more")
    device = resolve(device_name or "auto")
    source_model, cfg, state = checkpoint.load_model(checkpoint_path, device)
    stored, raw, kind = choose_storage(state, classifier, decoder, max_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.write_atomically(folder / MODEL_FILE, stored)
    test = _test_result(folder, device_name, data_root)
    source_test = _test_result(Path(checkpoint_path), device_name, data_root)
    card: dict[str, Any] = {
        "card_version": CARD_VERSION, "name": name, "model": cfg.model.name,
        "parameters": count_parameters(source_model), "data": cfg.data.name,
        "classes": state.get("class_names"), "test": test,
        "source": {"checkpoint": str(checkpoint_path), "test_correct": source_test["correct"],
                   "test_accuracy": source_test["accuracy"]},
        "epochs": state.get("epoch"), "step": state.get("step"),
        "best_val_accuracy": state.get("best_val_accuracy"),
        "storage": {"classifier": classifier, "decoder": kind, "int4_group": INT4_GROUP,
                    "bytes": len(raw)},
        "command": command, "note": note, "evaluated_on": describe(device),
        "config": state["config"]}
    packed_model, _, _ = checkpoint.load_model(folder, device)
    if packed_model.has_decoder:    # the detector of the weights as stored, not the source's
        card["detector"] = _store_detector(packed_model, cfg, folder, device, data_root)
        card["storage"]["bytes"] = (folder / MODEL_FILE).stat().st_size
    (folder / SLICE_FILE).unlink(missing_ok=True)   # --force over an older export
    if slice_n:
        src = build_eval(cfg.data.name, "test", cfg, device, data_root)
        x, y = slice_of(src, slice_n)
        np.savez_compressed(folder / SLICE_FILE, x=x, y=y)
        card["slice"] = {"file": SLICE_FILE, **evaluate_slice(folder, device_name)}
        card["reconstruction"] = _recon_change(source_model, packed_model, x, device,
                                               cfg.train.precision)
    _write_card(folder, card)
    return card


def _store_detector(model, cfg, folder: Path, device, data_root) -> dict | None:
    """The reconstruction detector's threshold of the stored model from its validation
    images (capsctl/adversarial/detector.py), added to model.pt; None without a validation
    split of at least MIN_IMAGES images."""
    from capsctl.adversarial.detector import calibrate_into
    from capsctl.data.build import build_eval
    from capsctl.errors import DataError

    try:
        val = build_eval(cfg.data.name, "val", cfg, device, data_root)
    except DataError:
        return None
    return calibrate_into(folder / MODEL_FILE, model, val, cfg.data.name,
                          cfg.train.eval_batch_size, device, cfg.train.precision)


# --- reading cards (torch-free) ------------------------------------------------------------------

def read_card(folder: Path) -> dict:
    """``folder``/card.json as a mapping; a one-line CapsctlError when absent or not a card."""
    path = Path(folder) / CARD_FILE
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CapsctlError(f"{folder} is not a pretrained model (no {CARD_FILE})") from None
    except (OSError, ValueError) as e:
        raise CapsctlError(f"{path}: not a readable card ({e})") from None
    test = card.get("test") if isinstance(card, dict) else None
    if not isinstance(test, dict) or not isinstance(test.get("accuracy"), (int, float)):
        raise CapsctlError(f"{path}: not a pretrained model's card (no test accuracy)")
    return card


def listing(root: Path | None = None) -> list[dict]:
    """A row per pretrained model under ``root`` (default: the repository's pretrained/):
    name, model, data, test error, epochs, size of model.pt, storage and the command; a
    folder whose card cannot be read is a row with ``problem``."""
    root = Path(root if root is not None else repo_folder())
    if not root.is_dir():
        return []
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        model = folder / MODEL_FILE
        row: dict[str, Any] = {"name": folder.name, "path": str(folder),
                               "bytes": model.stat().st_size if model.is_file() else None}
        try:
            card = read_card(folder)
        except CapsctlError as e:
            rows.append({**row, "problem": str(e)})
            continue
        t = card["test"]
        train = (card.get("config") or {}).get("train") or {}
        row.update({"model": card.get("model"), "data": card.get("data"),
                    "test_error": t.get("error"), "test_n": t.get("n"),
                    "epochs": card.get("epochs"), "run_epochs": train.get("epochs"),
                    "storage": card.get("storage"),
                    "command": card.get("command")})
        if row["bytes"] is None:
            row["problem"] = f"no {MODEL_FILE}"
        rows.append(row)
    return rows


def verify(folder: Path, full: bool = False, device_name: str | None = None,
           data_root: str | None = None) -> list[tuple[str, Any, Any]]:
    """(what, recorded, measured now) for the model in ``folder``: the slice's correct count,
    and with ``full`` the test set's; equal pairs mean the card holds."""
    folder = Path(folder)
    card = read_card(folder)
    found = []
    if card.get("slice"):
        found.append(("slice correct", f"{card['slice']['correct']}/{card['slice']['n']}",
                      "{correct}/{n}".format(**evaluate_slice(folder, device_name))))
    if full or not card.get("slice"):
        now = _test_result(folder, device_name, data_root)
        t = card["test"]
        found.append((f"{t.get('dataset')} test correct", f"{t.get('correct')}/{t.get('n')}",
                      f"{now['correct']}/{now['n']}"))
    return found


def write_example(folder: Path, index: int, path: Path) -> dict:
    """Write test example ``index`` of ``folder``/slice.npz as a PNG at ``path`` (a real test
    image to try ``capsctl predict`` on); returns {"path", "index", "label"} (the class name).
    Torch-free."""
    from PIL import Image

    card = read_card(folder)
    x, y = read_slice(folder)
    if not 0 <= index < len(x):
        raise CapsctlError(f"--index {index}: the slice holds examples 0..{len(x) - 1}")
    if x.shape[1] not in (1, 3):
        raise CapsctlError(f"{folder}: {x.shape[1]}-channel examples cannot be a PNG")
    pixels = x[index, 0] if x.shape[1] == 1 else x[index].transpose(1, 2, 0)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, format="PNG")
    except (OSError, ValueError) as e:
        raise CapsctlError(f"--out {path}: cannot write ({e})") from None
    names = card.get("classes")
    k = int(y[index])
    label = names[k] if isinstance(names, list) and 0 <= k < len(names) else str(k)
    return {"path": str(path), "index": index, "label": str(label)}
