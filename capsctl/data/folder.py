"""``folder``: a folder of your images, one subfolder per class.

Layout: ``ROOT/train/<class>/...`` and ``ROOT/test/<class>/...`` (any depth below the class
folder), optionally ``ROOT/val/<class>/...``; files ending in .png, .jpg, .jpeg, .bmp, .gif,
.webp, .tif or .tiff (any case) are images, hidden files and other files are ignored. The classes
are the subfolders of ``ROOT/train``, sorted by name (label 0 = the first); ``val`` and ``test``
may use a subset of them. ROOT is ``--data-root``, else ``data.root``.

Every image (any size, grey, RGB, palette, with alpha ...) is converted to ``data.channels``
(1: grey, 3: RGB), its centre square is resized to ``data.image_size`` (bilinear, antialiased),
all in parallel processes (``data.workers``), once: the result, one uint8 tensor per split, is
cached in capsctl's cache folder (``$CAPSCTL_CACHE``, else ``$XDG_CACHE_HOME/capsctl`` or
``~/.cache/capsctl``; ``folders/<key>.pt``, written atomically), never in ROOT. The key is a
hash of every image's relative path, size and modification time, the image size and the channel
count: a later run with unchanged files reads the cache (the files are only listed); any change
decodes again.

An image that cannot be decoded stops the build with a DataError naming it; with
``data.skip_bad_images: true`` such images are left out and counted (a warning says how many).
The validation set is ROOT/val when it exists, else ``data.val_size`` training images held out
at random (a fixed seed, so every run holds out the same ones).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import warnings
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capsctl.data.files import open_file
from capsctl.errors import DataError
from capsctl.paths import cache_root

IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
CACHE_VERSION = 1     # bump when the decoding changes: old cache files are then not found
VAL_SEED = 0
CHUNK = 256           # images per task handed to a decoding process
PROCESS_MIN = 2000    # fewer images than this are decoded by threads of this process


# --- listing ----------------------------------------------------------------------------------

def folder_root(options, root_flag: str | None = None) -> Path | None:
    """ROOT: ``--data-root`` > ``data.root``; None when neither is given."""
    chosen = root_flag or options.root
    return Path(chosen).expanduser() if chosen else None


def _subfolders(path: Path) -> list[str]:
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"{path}: cannot list ({e.strerror or e})") from None


def folder_classes(options, root_flag: str | None = None) -> tuple[str, ...] | None:
    """The class names (subfolders of ROOT/train, sorted); None when ROOT is not given or has
    no ``train`` folder yet (the builder then says what is wrong)."""
    root = folder_root(options, root_flag)
    if root is None or not (root / "train").is_dir():
        return None
    return tuple(_subfolders(root / "train"))


@dataclass
class Split:
    """The images of one split: paths relative to ROOT, sizes, mtimes and labels, sorted."""

    paths: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


def _walk(folder: str, rel: str, label: int, out: Split) -> None:
    """Append the images below ``folder`` (``rel``: its path relative to ROOT), sorted."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{folder}: cannot list ({e.strerror or e})") from None
    for e in entries:
        if e.name.startswith("."):
            continue
        if e.is_dir(follow_symlinks=False):  # linked folders are not followed (no loops)
            _walk(e.path, f"{rel}/{e.name}", label, out)
        elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTS:
            try:
                st = e.stat()
            except OSError as err:
                raise DataError(f"{e.path}: cannot read ({err.strerror or err})") from None
            out.paths.append(f"{rel}/{e.name}")
            out.sizes.append(st.st_size)
            out.mtimes.append(st.st_mtime_ns)
            out.labels.append(label)


def scan(root: Path) -> tuple[tuple[str, ...], dict[str, Split]]:
    """(classes, {split: Split}) of ROOT; ``val`` only when ROOT/val exists."""
    if not root.is_dir():
        raise DataError(f"folder dataset: {root} is not a folder; pass --data-root ROOT or set "
                        "data.root (ROOT/train/<class>/ and ROOT/test/<class>/ hold the images)")
    for needed in ("train", "test"):
        if not (root / needed).is_dir():
            raise DataError(f"folder dataset: {root / needed} is missing; ROOT must hold "
                            "train/<class>/ and test/<class>/ folders of images")
    classes = tuple(_subfolders(root / "train"))
    if len(classes) < 2:
        raise DataError(f"folder dataset: {root / 'train'} has {len(classes)} class folder(s); "
                        "a classifier needs at least 2 (one subfolder per class)")
    splits = {}
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        names = _subfolders(root / split)
        extra = sorted(set(names) - set(classes))
        if extra:
            raise DataError(f"folder dataset: {root / split / extra[0]} is not a class of "
                            f"{root / 'train'} (classes: {', '.join(classes)[:200]})")
        s = splits[split] = Split()
        for name in names:
            _walk(str(root / split / name), f"{split}/{name}", classes.index(name), s)
    present = set(splits["train"].labels)
    for c, name in enumerate(classes):
        if c not in present:
            raise DataError(f"folder dataset: {root / 'train' / name} holds no images "
                            f"({', '.join(sorted(IMAGE_EXTS))})")
    if not splits["test"].paths:
        raise DataError(f"folder dataset: {root / 'test'} holds no images")
    return classes, splits


def cache_key(classes, splits: dict[str, Split], image_size: int, channels: int) -> str:
    """Hash of every image's relative path, size and mtime, the classes and the decoding."""
    h = hashlib.sha256(f"capsctl-folder {CACHE_VERSION} {image_size} {channels}\n".encode())
    h.update(("\0".join(classes) + "\n").encode())
    for split, s in sorted(splits.items()):
        h.update(f"[{split}]\n".encode())
        for p, size, mtime, label in zip(s.paths, s.sizes, s.mtimes, s.labels):
            h.update(f"{p}\0{size}\0{mtime}\0{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:40]


# --- decoding ----------------------------------------------------------------------------------

def _to_8bit(img):
    """A 16/32-bit integer or float grey image as 8-bit grey: 16-bit (and 32-bit integer, as
    16-bit PNGs open) values scaled by 255/65535, floats clipped to 0-255."""
    from PIL import Image

    a = np.asarray(img)
    if img.mode == "F":
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return Image.fromarray((np.clip(a.astype(np.int64), 0, 65535) // 257).astype(np.uint8))


def decode_image(path, size: int, channels: int) -> np.ndarray:
    """uint8 (channels, size, size): the image's centre square, resized, in grey or RGB.
    ``path``: a file name (only a regular file is opened: a FIFO is refused, never waited on)
    or an open binary file."""
    from PIL import Image

    with contextlib.ExitStack() as stack:   # a path: opened as every data file is (files.py)
        f = path if hasattr(path, "read") else stack.enter_context(open_file(path))
        return _decode_open(Image.open(f), size, channels)


def _decode_open(img, size: int, channels: int) -> np.ndarray:
    """``decode_image`` of an image PIL has opened (closed here)."""
    from PIL import Image, ImageOps

    with img:
        mode = "L" if channels == 1 else "RGB"
        if img.format == "JPEG":
            img.draft(mode, (size, size))   # JPEG decodes at a reduced scale when it can
        if img.mode in ("P", "PA") and mode == "RGB":
            img = img.convert("RGBA")       # palette with transparency: through RGBA
        elif img.mode.startswith("I") or img.mode == "F":
            img = _to_8bit(img)             # PIL's own conversion would clip at 255
        if img.mode != mode:
            img = img.convert(mode)
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
        out = np.asarray(img, dtype=np.uint8)
    return out[None] if channels == 1 else out.transpose(2, 0, 1)


def decode_chunk(paths: list[str], size: int, channels: int) -> tuple[np.ndarray, list]:
    """(uint8 (n, channels, size, size), [(i, reason) of the images that failed])."""
    out = np.zeros((len(paths), channels, size, size), dtype=np.uint8)
    bad = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # PIL's palette/EXIF notes, per image
        for i, p in enumerate(paths):
            try:
                out[i] = decode_image(p, size, channels)
            except DataError as e:  # not a regular file (a FIFO, a device), unopenable
                bad.append((i, str(e).removeprefix(f"{p}: ")))
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, bombs ...
                first = str(e).splitlines()[0][:160] if str(e) else ""
                bad.append((i, f"{type(e).__name__}: {first}"))
    return out, bad


def _executor(n: int, workers: int) -> Executor:
    """Forked processes (as torch's DataLoader workers: the children run only PIL and numpy,
    never torch or CUDA; spawn would re-run the caller's main script); threads for small
    folders, with one worker, or where fork is not available."""
    import multiprocessing

    if n >= PROCESS_MIN and workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        try:
            return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        except (OSError, ValueError):  # no processes here
            pass
    return ThreadPoolExecutor(max(1, min(workers, 4)))


def decode_all(root: Path, paths: list[str], size: int, channels: int, workers: int
               ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """All images of ``paths`` (relative to ``root``) decoded in parallel, in order; and the
    (index, reason) of those that failed (left black in the array)."""
    n = len(paths)
    out = np.zeros((n, channels, size, size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    full = [str(root / p) for p in paths]
    starts = range(0, n, CHUNK)
    with _executor(n, workers) as pool:
        jobs = [pool.submit(decode_chunk, full[s:s + CHUNK], size, channels) for s in starts]
        for s, job in zip(starts, jobs):
            part, failed = job.result()
            out[s:s + len(part)] = part
            bad += [(s + i, why) for i, why in failed]
    return out, bad


# --- the cache -----------------------------------------------------------------------------------

def _load_cache(path: Path) -> dict | None:
    """The cached splits, or None when the file is absent or unusable (then decoded again)."""
    import torch

    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("version") != CACHE_VERSION or "train" not in data["splits"]:
            return None
        return data
    except Exception as e:  # a torn or foreign file: decode again
        warnings.warn(f"folder dataset: cache file {path} unreadable ({type(e).__name__}); "
                      "decoding the images again", stacklevel=3)
        return None


def _save_cache(path: Path, data: dict) -> None:
    """Write atomically (temporary file, then rename); a warning when the folder refuses."""
    from capsctl.atomic import write_atomically

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, data)
    except OSError as e:
        warnings.warn(f"folder dataset: cannot write the cache {path} ({e.strerror or e}); "
                      "the images will be decoded again next time", stacklevel=3)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _decode_splits(root: Path, classes, splits: dict[str, Split], o) -> dict:
    """The cache record: decoded splits (uint8 tensors), classes and the failed images."""
    import torch

    workers = o.workers or _cpus()
    total = sum(len(s.paths) for s in splits.values())
    print(f"capsctl: decoding {total:,} images of {root} to {o.image_size}x{o.image_size}x"
          f"{o.channels} with {workers} workers (once; then cached)", file=sys.stderr)
    record = {"version": CACHE_VERSION, "classes": list(classes), "splits": {}, "bad": []}
    for name, s in splits.items():
        images, bad = decode_all(root, s.paths, o.image_size, o.channels, workers)
        keep = np.ones(len(s.paths), dtype=bool)
        keep[[i for i, _ in bad]] = False
        record["bad"] += [[s.paths[i], why] for i, why in bad]
        record["splits"][name] = {
            "images": torch.from_numpy(images[keep]),
            "labels": torch.tensor(s.labels, dtype=torch.int64)[torch.from_numpy(keep)]}
    return record


def load_folder(root: Path, o) -> dict:
    """The decoded folder: {"classes", "splits": {split: {"images", "labels"}}, "bad"}, read
    from the cache when the files are unchanged, else decoded and cached."""
    classes, splits = scan(root)
    key = cache_key(classes, splits, o.image_size, o.channels)
    path = cache_root() / "folders" / f"{key}.pt"
    record = _load_cache(path)
    if record is None:
        record = _decode_splits(root, classes, splits, o)
        _save_cache(path, record)
    bad = record["bad"]
    if bad and not o.skip_bad_images:
        rel, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"folder dataset: cannot decode {root / rel} ({why}){more}; fix or "
                        "remove it, or set data.skip_bad_images=true to leave such images out")
    if bad:
        warnings.warn(f"folder dataset: skipped {len(bad)} unreadable image(s) of {root} "
                      f"(first: {bad[0][0]}: {bad[0][1]})", stacklevel=2)
    for name, s in record["splits"].items():
        if len(s["labels"]) == 0:
            raise DataError(f"folder dataset: no readable images in {root / name}")
    return record


# --- the dataset -------------------------------------------------------------------------------

def _check_classes(cfg, classes, root: Path) -> None:
    want = cfg.model.num_classes
    if want is None:
        raise DataError(f"folder dataset: model.num_classes is not set and {root} was not "
                        "known when the config was read; set model.num_classes="
                        f"{len(classes)} or data.root")
    if want != len(classes):
        raise DataError(f"folder dataset: {root / 'train'} has {len(classes)} classes but "
                        f"model.num_classes is {want}; set model.num_classes={len(classes)}")


def build_folder(cfg, device, root_flag: str | None = None):
    """``folder``: train (less a held-out slice when there is no ROOT/val), val, test."""
    from capsctl.data.natural import image_bundle

    o = cfg.data
    root = folder_root(o, root_flag)
    if root is None:
        raise DataError("folder dataset: no ROOT; pass --data-root ROOT or set data.root "
                        "(ROOT/train/<class>/ and ROOT/test/<class>/ hold the images)")
    record = load_folder(root, o)
    _check_classes(cfg, record["classes"], root)
    parts = {k: (v["images"].numpy(), v["labels"].numpy()) for k, v in record["splits"].items()}
    train, val = parts["train"], None
    if o.val_size and "val" in parts:
        val = parts["val"]
    elif o.val_size:
        n = len(train[1])
        if o.val_size >= n:
            raise DataError(f"data.val_size={o.val_size} leaves no training images "
                            f"({root / 'train'} has {n}); lower data.val_size or add "
                            "ROOT/val/")
        order = np.random.default_rng(VAL_SEED).permutation(n)
        v_idx, t_idx = np.sort(order[:o.val_size]), np.sort(order[o.val_size:])
        train, val = (train[0][t_idx], train[1][t_idx]), (train[0][v_idx], train[1][v_idx])
    return image_bundle(cfg, device, train, val, parts["test"], pad=o.pad, crop=o.crop,
                        flip=o.flip)
