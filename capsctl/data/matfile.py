"""MATLAB ``.mat`` files, read safely: the one way every reader of ``.mat`` files (affNIST,
SVHN) opens them.

scipy's reader is compiled code that trusts the file: a variable with the complex flag but no
imaginary part makes it read the next variable as one and crash (SIGSEGV), cells nested 100,000
deep overflow its C stack, and a cell's declared element count is allocated up front. So before
scipy sees a MATLAB v5 file its element structure is walked without loading data (compressed
variables inflated in chunks, never into memory): every element of the type its place needs and
inside its parent, at least two dimensions, no nesting deeper than ``MAT_MAX_DEPTH``, no more
cells or struct elements than the bytes can hold, no compressed variable declaring more than its
bytes can inflate to or going on after it. Anything else is one DataError naming the file.

The file is opened once (``files.open_file``: regular files only, a FIFO refused without
blocking), walked, and the same open file is handed to scipy (``load``, ``variables``).
"""

from __future__ import annotations

import math
import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

from capsctl.data.files import open_file
from capsctl.data.idx import GZIP_RATIO
from capsctl.errors import DataError

MAT_MAX_DEPTH = 4     # affNIST: affNISTdata (struct) > its fields; SVHN: X, y; room beyond
_MI_MATRIX, _MI_COMPRESSED = 14, 15
_CONTAINERS = {1: "cell", 2: "struct", 3: "object"}
_REFUSED = {16: "function handle", 17: "MATLAB class object"}
_INT8, _INT32, _UINT32 = frozenset({1}), frozenset({5}), frozenset({6})
_DATA = frozenset({1, 2, 3, 4, 5, 6, 7, 9, 12, 13, 16, 17, 18})  # numbers and UTF-8/16/32 text


class _Malformed(Exception):
    """The .mat element structure is one that scipy must not be given."""


class _FileRegion:
    """Sequential reads of an uncompressed file (``take`` exact bytes, ``skip`` by seeking)."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size, self.pos = f, size, f.tell()

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) < n:
            raise _Malformed("the file ends inside an element")
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Malformed("the file ends inside an element")
        self.f.seek(n, 1)
        self.pos += n


class _Inflated:
    """Sequential reads of a zlib stream of ``nbytes`` compressed bytes, inflated on demand (so
    memory stays at one chunk whatever the stream inflates to)."""

    def __init__(self, f: BinaryIO, nbytes: int):
        self.f, self.left, self.pos = f, nbytes, 0
        self.z, self.buf = zlib.decompressobj(), bytearray()

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            data = self.z.unconsumed_tail
            if not data:
                data = self.f.read(min(1 << 16, self.left))
                self.left -= len(data)
            if not data or self.z.eof:
                raise _Malformed("the compressed data ends inside an element")
            self.buf += self.z.decompress(data, max(n - len(self.buf), 1 << 16))

    def take(self, n: int) -> bytes:
        self._fill(n)
        data = bytes(self.buf[:n])
        del self.buf[:n]
        self.pos += n
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            n -= len(self.take(min(n, 1 << 20)))

    def at_end(self) -> bool:
        """Whether the stream inflates to nothing more (reads at most one more byte)."""
        try:
            self._fill(1)
        except _Malformed:
            return True
        return False


def _element(src, order: str, end: int, types: frozenset, cap: int | None = None) -> bytes:
    """The next sub-element of a matrix ending at ``end``: its type must be one of ``types``
    (scipy indexes tables with it unchecked) and it must fit; its data is returned when ``cap``
    is given (at most ``cap`` bytes), skipped otherwise."""
    if end - src.pos < 8:
        raise _Malformed("a matrix ends before its last element")
    raw = src.take(8)
    mtype, n = struct.unpack(order + "II", raw)
    small = mtype >> 16  # small element: up to 4 bytes of data in the tag's second half
    if small:
        mtype, n = mtype & 0xFFFF, small
    if mtype not in types or (small and n > 4):
        raise _Malformed(f"an element of type {mtype} where {sorted(types)} belong")
    if small:
        return raw[4:4 + n]
    padded = n + (-n) % 8
    if padded > end - src.pos or (cap is not None and n > cap):
        raise _Malformed(f"a {n}-byte element where {end - src.pos} bytes are left")
    if cap is None:
        src.skip(padded)
        return b""
    data = src.take(n)
    src.skip(padded - n)
    return data


def _int(data: bytes, order: str, fmt: str) -> int:
    """The first 4-byte integer of ``data`` (zero-padded when shorter)."""
    return struct.unpack(order + fmt, data[:4].ljust(4, b"\0"))[0]


def _walk_matrix(src, order: str, nbytes: int, depth: int) -> None:
    """Checks one miMATRIX element of ``nbytes`` (after its tag) and what it contains, so that
    scipy can read it safely: every sub-element of the type its place needs and inside the
    matrix (scipy reads a missing imaginary part from the next variable and crashes), no nesting
    beyond MAT_MAX_DEPTH (scipy recurses in C and crashes on deep nesting), no more cells or
    struct elements than the bytes can hold (scipy allocates them up front), no function handles
    or class objects."""
    end = src.pos + nbytes
    if nbytes == 0:
        return
    flags = _element(src, order, end, _UINT32, 8)
    if len(flags) != 8:
        raise _Malformed(f"array flags of {len(flags)} bytes")
    word = _int(flags, order, "I")
    cls, is_complex = word & 0xFF, bool(word & 0x800)
    if cls in _REFUSED or not 1 <= cls <= 15:
        raise _Malformed(f"it holds a {_REFUSED.get(cls, f'class {cls} array')}")
    raw = _element(src, order, end, _INT32, 256)
    if len(raw) < 8 or len(raw) % 4:  # scipy crashes on a char array without dimensions
        raise _Malformed(f"array dimensions of {len(raw)} bytes")
    dims = struct.unpack(f"{order}{len(raw) // 4}i", raw)
    if any(d < 0 for d in dims):
        raise _Malformed(f"negative array dimensions {dims}")
    _element(src, order, end, _INT8, 1 << 16)  # the name
    if cls not in _CONTAINERS:  # numeric, char, sparse: their data elements
        parts = (3 if cls == 5 else 1) + is_complex
        for _ in range(parts):
            _element(src, order, end, _DATA)
    else:
        if depth >= MAT_MAX_DEPTH:
            raise _Malformed(f"cells or structs nested more than {MAT_MAX_DEPTH} deep")
        nfields = 1
        if cls == 3:
            _element(src, order, end, _INT8, 1 << 16)  # the class name
        if cls in (2, 3):
            raw = _element(src, order, end, _INT32, 4)
            if len(raw) != 4:
                raise _Malformed(f"a field name length of {len(raw)} bytes")
            width = _int(raw, order, "i")
            names = _element(src, order, end, _INT8, 1 << 20)
            nfields = len(names) // width if width > 0 else 0
        count = math.prod(dims)
        if count > 1 and count * max(nfields, 1) * 8 > end - src.pos:
            raise _Malformed(f"a {_CONTAINERS[cls]} of {count} elements in {nbytes} bytes")
        for _ in range(count * nfields):
            if end - src.pos < 8:
                raise _Malformed(f"a {_CONTAINERS[cls]} ends before its elements")
            mtype, n = struct.unpack(order + "II", src.take(8))
            if mtype != _MI_MATRIX or n > end - src.pos:
                raise _Malformed(f"a malformed {_CONTAINERS[cls]} element")
            _walk_matrix(src, order, n, depth + 1)
    src.skip(end - src.pos)  # what is left


def check_structure(f: BinaryIO, path: Path, hint: str) -> None:
    """A one-line DataError when the MATLAB v5 file open as ``f`` has an element structure that
    would make scipy crash or allocate far more memory than the file holds (see
    ``_walk_matrix``). Other formats (v4, v7.3, not MATLAB at all) are left to scipy, whose
    errors are bounded. ``hint`` ends the message (what to do)."""
    try:
        f.seek(0)
        size = os.fstat(f.fileno()).st_size
        head = f.read(128)
        if len(head) < 128 or 0 in head[:4] or head[125 if head[126:127] == b"I" else 124] != 1:
            return  # not version 5: v4 and v7.3 are read without recursion
        order = "<" if head[126:128] == b"IM" else ">"
        while f.tell() + 8 <= size:
            mtype, n = struct.unpack(order + "II", f.read(8))
            if n > size - f.tell():
                raise _Malformed(f"a variable of {n} bytes in a {size}-byte file")
            start = f.tell()
            if mtype == _MI_COMPRESSED:
                src = _Inflated(f, n)
                inner_type, inner = struct.unpack(order + "II", src.take(8))
                if inner > GZIP_RATIO * n + 4096:
                    raise _Malformed(f"{n} compressed bytes declaring {inner}")
                if inner_type == _MI_MATRIX:
                    _walk_matrix(src, order, inner, 1)
                    if not src.at_end():  # scipy would inflate all of it, then refuse
                        raise _Malformed("the compressed data goes on after its variable")
            elif mtype == _MI_MATRIX:
                _walk_matrix(_FileRegion(f, size), order, n, 1)
            f.seek(start + n)
    except (_Malformed, zlib.error, struct.error) as e:
        raise DataError(f"{path}: not a readable MATLAB .mat file ({e}); {hint}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    finally:
        f.seek(0)


def check_mat_structure(path: Path, hint: str = "re-download or regenerate it") -> None:
    """``check_structure`` of the file at ``path`` (opened with ``files.open_file``)."""
    with open_file(path) as f:
        check_structure(f, path, hint)


def _short(e: BaseException) -> str:
    first = str(e).split("\n")[0][:160]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load(path: Path, names: tuple[str, ...], hint: str) -> tuple[dict, list[str]]:
    """(the variables ``names`` of the .mat file ``path`` as scipy reads them, the first line of
    each warning scipy gave), after ``check_structure``; any failure is one DataError."""
    import scipy.io

    with open_file(path) as f:
        check_structure(f, path, hint)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                mat = scipy.io.loadmat(f, variable_names=names)
        except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, zlib ...
            raise DataError(f"{path}: not a readable MATLAB .mat file ({_short(e)}); "
                            f"{hint}") from None
    return mat, [str(w.message).splitlines()[0][:160] for w in caught if str(w.message)]


def variables(path: Path, hint: str) -> list[tuple[str, tuple[int, ...], str]]:
    """[(name, shape, MATLAB class)] of the variables of ``path`` from their headers (scipy's
    ``whosmat``), after ``check_structure``; any failure is one DataError."""
    import scipy.io

    with open_file(path) as f:
        check_structure(f, path, hint)
        try:
            return [(name, tuple(shape), cls) for name, shape, cls in scipy.io.whosmat(f)]
        except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, zlib ...
            raise DataError(f"{path}: not a readable MATLAB .mat file ({_short(e)}); "
                            f"{hint}") from None
