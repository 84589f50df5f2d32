"""A seeded mutation fuzz of the SVHN `.mat` reader and the CIFAR pickle reader, each case in its
own forked child, timed and measured: every case ends in a one-line DataError or a valid read,
within 1 s and 100 MB above a child that does nothing, and no case kills its child by a signal
(scipy's reader is compiled code: before the shared `.mat` pre-scan a hostile SVHN file crashed
it). The counts are the ones docs/reliability.md reports.

The mutated files are written here (``test_hostile_files.mutate``); the children are forked by a
separate torch-free Python process (``zygote``): the readers do not need torch, and a fork of a
process that has imported torch costs about 40 ms, 20 times more."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from capsctl.errors import CapsctlError

SEED = 2024
N_SVHN = 100        # per layout: plain, compressed, mutated inside a valid zlib stream
N_CIFAR = 100       # per layout: protocol 2, protocol 5, gzipped protocol 4, numpy calls
MAX_SECONDS, MAX_MB = 1.0, 100


def svhn_bytes(layout: str) -> tuple[bytes, list[tuple[int, int]]]:
    """A valid 3-image SVHN file (``y`` as doubles 1-10, N x 1) and the byte ranges outside its
    pixels, where half of the mutations go. "inner": the plain file's ``y`` variable alone."""
    import scipy.io

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
    b = io.BytesIO()
    scipy.io.savemat(b, {"X": x, "y": np.array([[1.0], [10.0], [5.0]])},
                     do_compression=layout == "compressed")
    data = b.getvalue()
    if layout == "inner":  # the file with its last variable (y) deflated after the mutation
        return data, [(len(data) - 80, len(data))]
    start = data.find(x.tobytes(order="F"))
    zones = [(0, len(data))] if start < 0 else [(0, start), (start + x.size, len(data))]
    return data, zones


def deflate_last(data: bytes) -> bytes:
    """The plain SVHN file (possibly mutated) with everything after X's variable deflated into
    one compressed variable, so the mutation sits inside a valid zlib stream."""
    x_end = 128 + 8 + struct.unpack("<I", data[132:136])[0]
    packed = zlib.compress(data[x_end:])
    return data[:x_end] + struct.pack("<II", 15, len(packed)) + packed


def cifar_bytes(layout: str) -> tuple[bytes, list[tuple[int, int]]]:
    """A valid 3-image CIFAR-10 batch pickled as ``layout`` and the ranges outside the pixels."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    d = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 0, 9], b"data": images,
         b"filenames": [b"a.png", b"b.png", b"c.png"]}
    if layout == "protocol-2":
        data = pickle.dumps(d, protocol=2)
    elif layout == "protocol-5":
        data = pickle.dumps(d, protocol=5)
    else:
        return gzip.compress(pickle.dumps(d, protocol=4), mtime=0), [(0, 64)]
    start = data.find(images.tobytes())   # protocol 2 stores them as latin-1 text: not found
    return data, [(0, len(data))] if start < 0 else [(0, start), (start + images.size, len(data))]


class Call:
    """Pickles as ``fn(*args)``, with ``state`` applied by BUILD (``__setstate__``) if given."""

    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def zero_labels(n: int) -> Call:
    """n labels 0 in 8 bytes: an int64 array of zero stride."""
    return Call(np.ndarray, ((n,), np.dtype("<i8"), bytes(8), 0, (0,)))


def numpy_calls(rng: random.Random) -> bytes:
    """A batch whose ``data`` is built by one of the numpy calls a CIFAR pickle may name
    (``numpy.ndarray``, ``_frombuffer``, ``_reconstruct`` + ``__setstate__``) with random
    shapes, buffers, strides, offsets and orders; ``labels`` agree with the claimed count."""
    from numpy._core import multiarray, numeric

    n = rng.choice([0, 1, 3, 1000, 100_000])
    size = n * 3072
    buf = bytes(rng.choice([1, 1, 7, size, size, size + 1, max(size - 1, 1)]) % (1 << 20) or 1)
    strides = rng.choice([None, (0, 0), (0, 1), (3072, 0), (3072, 1), (-3072, 1), (1, 3072)])
    if rng.random() < 0.5:   # the family: N x 3072 bytes, offset 0, any strides
        data = Call(np.ndarray, ((n, 3072), np.dtype("u1"), buf, 0, strides))
        return pickle.dumps({b"data": data, b"labels": zero_labels(n)}, protocol=2)
    shape = rng.choice([(n, 3072), (n, 3072), (n * 3072,), (n, 3, 32, 32), (3072, n)])
    dtype = np.dtype(rng.choice(["u1", "u1", "<i8", "<f4"]))
    kind = rng.choice([0, 0, 1, 2])
    if kind == 0:
        args = [shape, dtype, buf, rng.choice([0, 0, 1, -1, 1 << 40]), strides,
                rng.choice([None, "C", "F"])]
        data = Call(np.ndarray, tuple(args[:rng.choice([2, 3, 5, 5, 6])]))
    elif kind == 1:
        data = Call(numeric._frombuffer, (buf, dtype, shape, rng.choice(["C", "F"])))
    else:
        state = (1, shape, dtype, rng.random() < 0.3, buf)
        data = Call(multiarray._reconstruct, (np.ndarray, (0,), b"b"), state)
    labels = [rng.choice([0, 3, 9, 9, 10, -1, 1.5]) for _ in range(n)] if n <= 5 else \
        zero_labels(n)
    return pickle.dumps({b"data": data, b"labels": labels}, protocol=rng.choice([2, 4, 5]))


def check_svhn(result, path: Path) -> str | None:
    images, labels = result
    if images.shape[1:] != (3, 32, 32) or len(images) != len(labels):
        return f"shapes {images.shape} {labels.shape}"
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        return "labels outside 0-9"
    return None


def check_cifar(result, path: Path) -> str | None:
    images, labels = result
    if images.nbytes > 1032 * path.stat().st_size:   # more than the file can hold, gzipped
        return f"{len(images)} images from a {path.stat().st_size}-byte file"
    if images.shape[1:] != (3, 32, 32) or len(images) != len(labels) or images.dtype != np.uint8:
        return f"shapes {images.shape} {labels.shape}"
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        return "labels outside 0-9"
    if not images.flags.c_contiguous:
        return "images not C-contiguous"
    return None


def one_case(reader, check, path: Path):
    """In the child: ("refused", message), ("read", None) or ("broke", why)."""
    try:
        result = reader(path)
    except CapsctlError as e:
        msg = str(e)
        if "\n" in msg or not msg or len(msg) > 600 or str(path) not in msg:
            return "broke", f"message not one short line naming the file: {msg[:200]!r}"
        return "refused", msg
    except BaseException as e:  # noqa: BLE001 - the point of the test
        return "broke", f"{type(e).__name__}: {str(e)[:200]}"
    problem = check(result, path)
    return ("broke", f"read, but {problem}") if problem else ("read", None)


READERS = {"svhn": ("capsctl.data.svhn", "read_mat", check_svhn),   # one file, as a build
           "cifar": ("capsctl.data.cifar", "load_split", check_cifar)}  # reads (and joins) it


def reader_of(name: str):
    import importlib

    module, fn, check = READERS[name]
    read = getattr(importlib.import_module(module), fn)
    return (lambda p: read([p], "labels", 10)) if name == "cifar" else read, check


def in_fork(fn, timeout: float = 30) -> tuple[int, float, float, object]:
    """``fn()`` in a forked child: (wait status, seconds, peak RSS in MB, what it returned)."""
    r, w = os.pipe()
    t = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(r)
        try:
            os.write(w, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.set_blocking(r, False)
    chunks = []
    while True:
        try:
            chunk = os.read(r, 1 << 16)
            if chunk:
                chunks.append(chunk)
        except BlockingIOError:
            pass
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t > timeout:
            os.kill(pid, 9)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.0005)
    seconds = time.monotonic() - t
    try:
        while chunk := os.read(r, 1 << 16):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    os.close(r)
    try:
        value = json.loads(b"".join(chunks))
    except ValueError:
        value = None
    return status, seconds, usage.ru_maxrss / 1024, value


def zygote(spec_file: str) -> None:
    """The torch-free process that forks a child per case: reads {"reader", "good", "cases",
    "out"} and writes [[case, wait status, seconds, extra MB, outcome], ...] to "out"."""
    spec = json.loads(Path(spec_file).read_text())
    reader, check = reader_of(spec["reader"])
    reader(Path(spec["good"]))   # the modules a read needs are imported before any fork
    base = max(in_fork(lambda: None)[2] for _ in range(3))
    rows = []
    for case in spec["cases"]:
        status, seconds, rss, out = in_fork(lambda: one_case(reader, check, Path(case)))
        rows.append([case, status, seconds, rss - base, out])
    Path(spec["out"]).write_text(json.dumps({"torch": "torch" in sys.modules, "rows": rows}))


def fuzz(tmp_path: Path, name: str, layouts: dict, n: int, good: bytes) -> dict:
    """``n`` mutations of each layout, each run in a forked child of ``zygote``; asserts each
    case's bounds and returns the outcome counts and the worst time and memory."""
    from test_hostile_files import mutate

    cases = []
    for k, (layout, (make, finish)) in enumerate(layouts.items()):
        rng = random.Random(SEED + k)
        data, zones = make(layout)
        for i in range(n):
            path = tmp_path / f"{name}-{layout}-{i}"
            path.write_bytes(finish(rng) if data is None else finish(mutate(data, rng, zones)))
            cases.append(str(path))
    (tmp_path / "good").write_bytes(good)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"reader": name, "good": str(tmp_path / "good"), "cases": cases,
                                "out": str(tmp_path / "out.json")}))
    here = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); "
                    "import test_fuzz_readers as t; t.zygote(sys.argv[1])", str(spec)],
                   check=True, timeout=240)
    result = json.loads((tmp_path / "out.json").read_text())
    counts, broke = {"refused": 0, "read": 0}, []
    for case, status, seconds, extra_mb, out in result["rows"]:
        case = f"{Path(case).name} (seed {SEED})"
        assert status == 0, f"{case}: the child ended by wait status {status}: {out}"
        assert seconds <= MAX_SECONDS, f"{case}: {seconds:.2f} s"
        assert extra_mb <= MAX_MB, f"{case}: {extra_mb:.0f} MB"
        if out[0] == "broke":
            broke.append(f"{case}: {out[1]}")
        else:
            counts[out[0]] += 1
    assert not broke, f"{len(broke)} cases broke: " + "; ".join(broke[:5])
    assert counts["refused"] > n // 2 and counts["read"] > 0, counts
    worst_s = max(r[2] for r in result["rows"])
    worst_mb = max(r[3] for r in result["rows"])
    print(f"{name}: {len(result['rows'])} cases {counts}, at most {worst_s:.3f} s and "
          f"{worst_mb:+.1f} MB (torch in the forking process: {result['torch']})")
    return counts


def same(data: bytes) -> bytes:
    return data


def test_svhn_mat_fuzz(tmp_path):
    layouts = {"plain": (svhn_bytes, same), "compressed": (svhn_bytes, same),
               "inner": (svhn_bytes, deflate_last)}
    fuzz(tmp_path, "svhn", layouts, N_SVHN, svhn_bytes("compressed")[0])


def test_cifar_pickle_fuzz(tmp_path):
    layouts = {"protocol-2": (cifar_bytes, same), "protocol-5": (cifar_bytes, same),
               "gzip-protocol-4": (cifar_bytes, same),
               "numpy-calls": (lambda _: (None, None), numpy_calls)}
    fuzz(tmp_path, "cifar", layouts, N_CIFAR, cifar_bytes("protocol-2")[0])
