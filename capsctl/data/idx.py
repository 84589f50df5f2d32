"""Reader for the IDX format of the original MNIST files (optionally gzipped), and the bounded
binary-file reading it shares with the smallNORB reader.

Layout: a big-endian magic number 0x0000TTNN (TT = 0x08 for uint8, NN = number of dimensions),
then NN big-endian uint32 sizes, then the data. Images are magic 2051 (3 dims), labels 2049 (1 dim).

Hostile files end in one DataError naming the file, in bounded time and memory: the header is read
first, the size it declares is checked (at most ``MAX_BYTES``, and no more than the file can hold:
its own size raw, ``GZIP_RATIO`` times it gzipped) before anything is allocated, and the data is
then read (inflated) in chunks into a buffer of exactly that size, so a gzip stream that inflates
to gigabytes costs at most the declared size plus one byte.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from capsctl.data.files import open_file
from capsctl.errors import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
MAX_BYTES = 2 ** 31      # no dataset file capsctl reads declares more data than this
GZIP_RATIO = 1032        # deflate cannot inflate more than ~1032 bytes per compressed byte
CHUNK = 4 << 20          # bytes inflated or read per call
READ_ERRORS = (OSError, EOFError, zlib.error, struct.error, ValueError)  # BadGzipFile is OSError


@contextlib.contextmanager
def open_data(path: Path) -> Iterator[tuple[BinaryIO, int, bool]]:
    """Yields (stream, size of the file on disk, gzipped?) for a regular file; the stream inflates
    a gzipped file (recognised by its first two bytes, whatever its name). FIFOs and devices are
    refused without blocking (``files.open_file``). OS and gzip errors inside the block become
    one DataError."""
    with open_file(path, "; delete it and fetch it again") as f:
        st = os.fstat(f.fileno())
        try:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if gz:
                with gzip.GzipFile(fileobj=f, mode="rb") as g:
                    yield g, st.st_size, True
            else:
                yield f, st.st_size, False
        except READ_ERRORS as e:
            first = str(e).split("\n")[0][:160]
            raise DataError(f"{path}: cannot read ({type(e).__name__}: {first}); the file is "
                            "corrupt, delete it and fetch it again") from None


def read_header(stream: BinaryIO, n: int, path: Path, what: str) -> bytes:
    """Exactly ``n`` bytes of a header, or a DataError saying the file is truncated."""
    raw = stream.read(n)
    if len(raw) < n:
        raise DataError(f"{path}: truncated {what} ({len(raw)} of {n} header bytes); the file is "
                        "truncated or corrupt, fetch it again")
    return raw


def check_declared(path: Path, shape: tuple[int, ...], nbytes: int, header: int, size: int,
                   gz: bool) -> None:
    """Refuses a declared data size the file cannot hold, before anything is allocated."""
    dims = "x".join(map(str, shape))
    dims = dims if len(dims) <= 80 else dims[:77] + "..."
    if nbytes > MAX_BYTES:
        shown = nbytes if nbytes < 10 ** 15 else f"about 2^{nbytes.bit_length() - 1}"
        raise DataError(f"{path}: header says {dims} = {shown} bytes of data, more than the "
                        f"{MAX_BYTES} byte limit; the file is corrupt, fetch it again")
    room = GZIP_RATIO * size + 4096 if gz else size - header
    if nbytes > room or (not gz and nbytes != room):
        held = f"a {size}-byte gzip file inflates to at most {room}" if gz else \
            f"file has {room}"
        raise DataError(f"{path}: size mismatch: header says {dims} = {nbytes} bytes of data, "
                        f"{held}; the file is truncated or corrupt, fetch it again")


def read_exact(stream: BinaryIO, nbytes: int, path: Path, dims: str) -> np.ndarray:
    """The next ``nbytes`` bytes as a uint8 array, read in chunks; a DataError when the stream
    holds fewer or more (at most one byte beyond ``nbytes`` is ever read)."""
    out = np.empty(nbytes, dtype=np.uint8)
    view, got = memoryview(out), 0
    while got < nbytes:
        n = stream.readinto(view[got:got + min(CHUNK, nbytes - got)])
        if not n:
            break
        got += n
    extra = stream.read(1) if got == nbytes else b""
    if got != nbytes or extra:
        held = f"{got}" if got < nbytes else f"more than {nbytes}"
        raise DataError(f"{path}: size mismatch: header says {dims} = {nbytes} bytes of data, "
                        f"file has {held}; the file is truncated or corrupt, fetch it again")
    return out


def read_idx(path: str | Path, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (gzipped or raw) into a uint8 numpy array, checking header and size."""
    path = Path(path)
    with open_data(path) as (stream, size, gz):
        head = stream.read(4)
        if len(head) < 4:
            raise DataError(f"{path}: truncated IDX file ({len(head)} bytes); fetch it again")
        magic = struct.unpack(">I", head)[0]
        dtype_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
        if magic >> 16 != 0 or dtype_code != 0x08 or ndim == 0:
            raise DataError(f"{path}: not an IDX uint8 file (magic number {magic}); expected "
                            f"{expect_magic or '2049 or 2051'}")
        if expect_magic is not None and magic != expect_magic:
            raise DataError(f"{path}: wrong magic number {magic}, expected {expect_magic} "
                            f"({'images' if expect_magic == IMAGES_MAGIC else 'labels'})")
        shape = struct.unpack(f">{ndim}I", read_header(stream, 4 * ndim, path, "IDX header"))
        nbytes = 1
        for d in shape:  # Python ints: no overflow
            nbytes *= d
        check_declared(path, shape, nbytes, 4 + 4 * ndim, size, gz)
        data = read_exact(stream, nbytes, path, "x".join(map(str, shape))[:80])
    return data.reshape(shape)
