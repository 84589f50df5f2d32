"""Finding affNIST's files under the data root and fetching the official ones: the test set
comes as ``test_batches/1.mat`` ... ``32.mat`` (10,000 images each, the k-th transform of every
MNIST test digit) or as one ``test.mat``; the validation set as ``validation_batches/`` or
``validation.mat``. A downloaded ``test_batches.zip`` lying there is unpacked on first use (its
declared sizes checked first). Torch-free.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
import zipfile
import zlib
from pathlib import Path

from capsctl.errors import DataError

BASE_URL = "https://www.cs.toronto.edu/~tijmen/affNIST/32x/transformed/"
BATCH_DIRS = {"test": "test_batches", "val": "validation_batches"}
SINGLE_FILES = {"test": "test.mat", "val": "validation.mat"}
MAX_UNPACKED = 8 << 30  # a downloaded batches zip (the official test_batches: about 0.6 GB)


class MissingDataError(DataError):
    """The files of a dataset are not there (as opposed to being there but unreadable)."""


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


def missing(name: str, folder: Path, split: str, root: Path) -> MissingDataError:
    batch1, single = folder / BATCH_DIRS[split] / "1.mat", folder / SINGLE_FILES[split]
    looked = f"{batch1} (... K.mat) nor {single}"
    if name == "affnist-synth":
        return MissingDataError(f"affnist-synth files not found: no {looked}; make them with "
                                f"capsctl data affnist-synth --data-root {root}")
    return MissingDataError(f"affNIST {split} files not found: no {looked}; download "
                            f"{BASE_URL}{BATCH_DIRS[split]}.zip and unzip it into {folder}, or run "
                            f"capsctl data affnist-download --data-root {root}")
