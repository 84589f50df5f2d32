"""Reader for the IDX format of the original MNIST files (optionally gzipped).

Layout: a big-endian magic number 0x0000TTNN (TT = 0x08 for uint8, NN = number of dimensions),
then NN big-endian uint32 sizes, then the data. Images are magic 2051 (3 dims), labels 2049 (1 dim).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from capsctl.errors import DataError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def read_idx(path: str | Path, expect_magic: int | None = None) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a uint8 numpy array, checking header and size."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read IDX file ({e}); delete it and fetch it again") \
            from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes); fetch it again")
    magic = struct.unpack(">I", raw[:4])[0]
    dtype_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or dtype_code != 0x08 or ndim == 0:
        raise DataError(f"{path}: not an IDX uint8 file (magic number {magic}); expected "
                        f"{expect_magic or '2049 or 2051'}")
    if expect_magic is not None and magic != expect_magic:
        raise DataError(f"{path}: wrong magic number {magic}, expected {expect_magic} "
                        f"({'images' if expect_magic == IMAGES_MAGIC else 'labels'})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; fetch the file again")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX size mismatch: header says {'x'.join(map(str, shape))} "
                        f"= {expected} bytes of data, file has {len(raw) - header}; the file is "
                        "truncated or corrupt, fetch it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
