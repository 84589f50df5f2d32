"""Checkpoints: a plain dict of tensors and plain values, written atomically, loaded safely.

Written to a temporary file in the same folder, fsynced, then renamed over the old one, so a
crash at any moment leaves either the old or the new checkpoint, never a torn one. Loaded with
``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain containers only and can
never execute code.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from capsctl import config as config_mod
from capsctl.atomic import write_atomically
from capsctl.migrate import config_v1_to_v2
from capsctl.errors import CheckpointError, TrainingError
from capsctl.runfolder import RunFolder

FORMAT_VERSION = 2  # 2: per-family/per-dataset config sections (capsctl 0.2); 1 is migrated
REQUIRED = ("format_version", "model", "config")


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` (plus the format version) to ``path``; a full disk or a
    refused write is one TrainingError line naming the file and the free space."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomically(path, {"format_version": FORMAT_VERSION, **state})
    except OSError as e:
        raise TrainingError(f"cannot write checkpoint {path}: {e.strerror or e}; the previous "
                            f"checkpoint is intact - free space ({free_space(path.parent)} "
                            "there) or fix permissions, then --resume") from None


def free_space(folder: Path) -> str:
    """How much space the file system of ``folder`` has left, in words ("1.2 MB free")."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{free / 1e6:,.1f} MB free" if free < 10 ** 9 else f"{free / 1e9:,.1f} GB free"


def resolve_file(path: str | Path) -> Path:
    """The checkpoint file a path names: itself, or a run folder's best.pt, or a pretrained
    model folder's model.pt; a one-line CheckpointError when there is none."""
    path = Path(path)
    if path.is_dir():
        for candidate in (RunFolder(path).best, path / RunFolder.BEST,
                          path / "model.pt"):  # a run folder, or a pretrained model's
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path} is a folder without checkpoints/best.pt (a run) or "
                              "model.pt (a pretrained model); pass a .pt file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def add_entry(path: str | Path, key: str, value: Any) -> Path:
    """Store ``value`` (plain data) under ``key`` in the checkpoint ``path`` names, rewriting it
    atomically with everything else exactly as it was (its format version, packed weights and
    all): what the trainer and `capsctl calibrate` add after the fact. Returns the file."""
    file = resolve_file(path)
    load(file)                                   # every check a load makes, first
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = torch.load(file, map_location="cpu", weights_only=True)
    if key in REQUIRED:
        raise ValueError(f"add_entry: {key!r} is part of the checkpoint itself")
    save(file, {**raw, key: value})
    return file


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint; every failure is a one-line CheckpointError."""
    path = resolve_file(path)
    _check_records(path)
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles; the error says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        foreign = _foreign_callables(path)
        if foreign or "GLOBAL" in str(e):  # names a callable: refused before anything ran
            named = f" (it names {', '.join(foreign[:3])})" if foreign else ""
            raise CheckpointError(f"{path}: refused to load (weights_only=True) - the file "
                                  f"references Python callables{named} and could run code; "
                                  "nothing was executed; only capsctl checkpoints are accepted") \
                from None
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch checkpoint "
                              "file, or corrupt)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: "
                              f"{_reason(e)}); use an intact copy of it or another "
                              "checkpoint") from None
    except Exception as e:  # any other unpickling failure is still a bad file, not a bug
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a capsctl checkpoint (missing {', '.join(missing)})")
    version = state["format_version"]
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: not a capsctl checkpoint (format_version {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is newer than this "
                              f"capsctl understands ({FORMAT_VERSION}); upgrade capsctl")
    if version == 1:  # capsctl 0.1: migrated in memory, the file is left as it is
        state = {**state, "format_version": 2, "config": config_v1_to_v2(state["config"])}
    if "packed" in state:  # a pretrained model's reduced-precision weights, expanded to fp32
        from capsctl.packing import unpack

        state = unpack(state, path)
    return state


def _reason(e: BaseException, limit: int = 160) -> str:
    """The first sentence of an error, whole ("PytorchStreamReader failed reading zip archive:
    failed finding central directory"), never cut mid-word; an OSError's own words."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    text = text.split("\n")[0].split(". ")[0].rstrip(".") or type(e).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text


def _check_records(path: Path) -> None:
    """A torch checkpoint is a zip archive of *stored* records (torch.save never compresses):
    a compressed record, or records that add up to more than the file, is refused before
    torch.load inflates anything (a small file cannot make capsctl allocate gigabytes)."""
    try:
        if not zipfile.is_zipfile(path):
            return  # a legacy or foreign file: torch.load refuses it with its own error
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return
    size = path.stat().st_size
    if any(i.compress_type != zipfile.ZIP_STORED for i in infos) or \
            sum(i.file_size for i in infos) > size:
        raise CheckpointError(f"{path}: not a capsctl checkpoint (its records are compressed "
                              "or larger than the file); nothing was loaded")


_SAFE_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset")


def _foreign_callables(path: Path, limit: int = 16 << 20) -> list[str]:
    """Callables a pickle file names (GLOBAL / STACK_GLOBAL) outside what a checkpoint needs.

    Only parses the opcodes (``pickletools.genops``) - nothing is imported or called.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist() if n.endswith("data.pkl")]
                raw = z.read(names[0])[:limit] if names else b""
        else:
            with open(path, "rb") as f:
                raw = f.read(limit)
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return []
    found, strings, stream = [], [], io.BytesIO(raw)
    try:
        while stream.tell() < len(raw):  # a legacy file holds several pickles in a row
            for op, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # garbage after (or instead of) a pickle: keep what was parsed
        pass
    return [n for n in dict.fromkeys(found) if not n.startswith(_SAFE_PREFIXES)]


def config_of(state: dict, path: str | Path = "checkpoint") -> config_mod.Config:
    try:
        return config_mod.from_dict(state["config"], source=f"{path} (config)")
    except Exception as e:
        raise CheckpointError(f"{path}: the config stored in the checkpoint is invalid: {e}") \
            from None


def check_weights(model_cfg, weights: Any, path: str | Path) -> None:
    """The stored weights must be exactly the tensors the stored config's model has: checked on
    the meta device (no memory allocated), so a stranger's config cannot make capsctl allocate
    a model its file does not hold."""
    from capsctl.models import build_model

    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor)
                                                for v in weights.values()):
        raise CheckpointError(f"{path}: the weights are not a mapping of tensors")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(model_cfg).state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in weights.items()}
    if stored != expected:
        wrong = sorted(set(stored) ^ set(expected)) or sorted(
            k for k in stored if stored[k] != expected[k])
        raise CheckpointError(f"{path}: the weights do not match the model its config describes "
                              f"({len(wrong)} tensor(s) differ, e.g. {wrong[0]})")


def load_model(path: str | Path, device: torch.device):
    """(model in eval mode on ``device``, config, state) from a checkpoint alone. The data
    location and download switch are never taken from the file (``data.root`` null,
    ``data.download`` false): the flag --data-root and $CAPSCTL_DATA say where data is."""
    from capsctl.models import build_model

    state = load(path)
    cfg = config_of(state, path)
    cfg.data.root, cfg.data.download = None, False
    check_weights(cfg.model, state["model"], path)
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).split("\n")[0][:200]
        raise CheckpointError(f"{path}: the weights do not match the model its config describes "
                              f"({first})") from None
    return model.to(device).eval(), cfg, state
