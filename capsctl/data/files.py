"""Opening a data file, the one way every reader does it (IDX and smallNORB, CIFAR batches,
``.mat`` files, the images of a folder dataset, ``capsctl predict``'s inputs).

Only a regular file is read. A FIFO (named pipe) would block its reader forever and a device
(``/dev/zero``) never ends, so anything else - a FIFO, a device, a socket, a folder - is refused
with one DataError naming the file, without blocking: the file is opened with ``O_NONBLOCK`` and
checked with ``fstat`` on that descriptor (no gap between a check and the open). Torch-free.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from capsctl.errors import DataError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words: "a FIFO (named pipe)", "a folder" ..."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_file(path: str | Path, hint: str = "") -> BinaryIO:
    """``path`` opened for binary reading (the caller closes it; a ``with`` block does), or a
    one-line DataError: it cannot be opened, or it is not a regular file. ``hint`` is appended
    to an open error (what to do, e.g. "; fetch it again")."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}){hint}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{path}: {kind(mode)}, not a data file; pass a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
