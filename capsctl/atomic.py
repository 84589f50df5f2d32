"""Writing a file atomically: ``torch.save`` to a temporary file beside the target, fsync,
rename. Checkpoints (checkpoint.py), pretrained models and the folder dataset's decoded cache
(data/folder.py) are written through it; it imports no other capsctl module, so every layer may
use it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class _Recorded:
    """A file whose write errors are kept: torch.save swallows the OSError (ENOSPC, EIO) that
    a write raised and raises ``RuntimeError: [enforce fail ...] unexpected pos`` instead."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def _os_error(e: BaseException, recorded: _Recorded, path: Path) -> OSError | None:
    """The OSError behind torch's RuntimeError ``e`` (as an OSError naming ``path``), if any."""
    cause = recorded.error or next((c for c in (e.__cause__, e.__context__)
                                    if isinstance(c, OSError)), None)
    if cause is None:
        return None
    return OSError(cause.errno, cause.strerror or str(cause), str(path))


def _mode_for(path: Path) -> int:
    """The permissions the new file gets: those of the file it replaces, else what a plain
    ``open(path, "w")`` would give (0666 less the umask), not mkstemp's 0600."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomically(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to a temporary file beside ``path``, fsync, rename over ``path``:
    a crash leaves the old file or the new one, never a torn one. Any failure leaves no
    temporary file behind; a failed write (a full disk) is an OSError naming ``path``, also
    when torch reports it as a RuntimeError. The file keeps the permissions of the one it
    replaces."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            recorded = _Recorded(f)
            try:
                torch.save(obj, recorded)
            except RuntimeError as e:
                error = _os_error(e, recorded, path)
                if error is None:
                    raise
                raise error from None
            f.flush()
            os.fchmod(f.fileno(), _mode_for(path))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
