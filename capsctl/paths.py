"""Folders capsctl itself uses: its cache folder, and where a path would be created. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """capsctl's cache folder (compiled kernels, decoded image folders): ``$CAPSCTL_CACHE``, else
    ``$XDG_CACHE_HOME/capsctl`` or ``~/.cache/capsctl``."""
    if os.environ.get("CAPSCTL_CACHE"):
        return Path(os.environ["CAPSCTL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "capsctl"


def nearest_existing(path: Path) -> Path:
    """``path`` itself when it exists, else its nearest existing ancestor: where creating it
    would start (the place to check for a folder and write permission)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_folder(path: Path) -> bool:
    """True when ``path`` is a folder this process may create entries in."""
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
