"""Hostile and clumsy input on the readers added since tests/test_hostile_files.py: SVHN `.mat`
files, CIFAR pickles, FIFOs among images, a full disk, a picture too large to draw at the end of
a run, `predict --recon` over existing pictures, a truncated `last.pt`. Each class goes through
the command line (in-process; in a forked child where the old behaviour was a crash or a hang,
so that it fails this test instead of ending or blocking the session) and must end in one line
and its exit code, or in the correct answer. The counts are the ones docs/reliability.md
reports."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from capsctl.cli import app
from conftest import write_fake_mnist
from test_hostile_files import MAT_HEADER, in_child, mat_element, mat_matrix_head

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(exit_code: int, output: str, needle: str, code: int = 2) -> str:
    """The one line of ``output`` (a command that ended with ``exit_code``), checked; the
    folder dataset's note that it decodes the images is not counted."""
    lines = [line for line in output.splitlines()
             if line.strip() and not line.startswith("capsctl: decoding ")]
    assert exit_code == code, f"exit {exit_code}: {output[-2000:]}"
    assert len(lines) == 1 and needle in lines[0], output[-2000:]
    assert "Traceback" not in output
    return lines[0]


def cli_in_child(*args, timeout: float = 60) -> tuple[int, float, float, tuple | None]:
    """``capsctl ARGS`` in-process in a forked child: (wait status, seconds, peak RSS in MB,
    (exit code, output))."""
    def run():
        r = cli(*args)
        return r.exit_code, r.output
    return in_child(run, timeout)


def child_one_line(args: list, needle: str, timeout: float = 60) -> str:
    status, seconds, _, result = cli_in_child(*args, timeout=timeout)
    assert status == 0, f"the command was killed or crashed (wait status {status}, " \
        f"{seconds:.1f} s): {result}"
    return one_line(*result, needle)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_CNN = "model: {name: cnn, channels: [4], hidden: [8], dropout: 0.0}\n"
TINY_TRAIN = ("train: {epochs: 1, max_steps: 2, batch_size: 4, eval_batch_size: 64, log_every: 1,"
              " checkpoint_every: 0, checkpoint_minutes: 0.0, images_every_epoch: false}\n")


# --- 1, 2: SVHN .mat files ------------------------------------------------------------------------

def mat_var(cls: int, name: str, dims: tuple, data: bytes, mtype: int, flags: int = 0) -> bytes:
    """A whole miMATRIX variable holding ``data`` as one element of type ``mtype``."""
    body = mat_element(mtype, data)
    return mat_matrix_head(cls, name, len(body), dims=dims, flags=flags) + body


def svhn_x(n: int = 1) -> bytes:
    """A valid ``X``: uint8 32x32x3xN."""
    return mat_var(9, "X", (32, 32, 3, n), bytes(range(256)) * (12 * n), 2)


def nested_cell_var(name: str, depth: int) -> bytes:
    """A compressed variable ``name``: a cell in a cell ... ``depth`` deep, around a double."""
    innermost = mat_var(6, "", (1, 1), struct.pack("<d", 1.0), 9)
    heads, size = [], len(innermost)
    for level in range(depth + 1):  # inside out; the outermost one is the named variable
        heads.append(mat_matrix_head(1, name if level == depth else "", size))
        size += len(heads[-1])
    packed = zlib.compress(b"".join(reversed(heads)) + innermost)
    return struct.pack("<II", 15, len(packed)) + packed


def hostile_svhn() -> dict[str, bytes]:
    """SVHN files written byte by byte that crash scipy's reader (SIGSEGV before the fix)."""
    double = struct.pack("<d", 3.0)
    complex_y = mat_var(6, "y", (1, 1), double, 9, flags=0x800)  # no imaginary part follows
    other = mat_var(6, "other", (1, 1), double, 9)
    return {"complex-flag-without-imaginary": MAT_HEADER + svhn_x() + complex_y + other,
            "y-nested-100000-deep": MAT_HEADER + svhn_x() + nested_cell_var("y", 100_000)}


def svhn_root(tmp_path: Path, train: bytes) -> tuple[Path, Path]:
    """(data root holding train_32x32.mat = ``train`` and a valid test file, config)."""
    import scipy.io

    root = tmp_path / "svhn"
    root.mkdir()
    (root / "train_32x32.mat").write_bytes(train)
    scipy.io.savemat(root / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 4), np.uint8),
                                               "y": np.array([[1], [2], [3], [10]], np.uint8)})
    cfg = write_yaml(tmp_path / "svhn.yaml", TINY_CNN + "data: {name: svhn, val_size: 0}\n"
                     + TINY_TRAIN)
    return root, cfg


@pytest.mark.parametrize("case", sorted(hostile_svhn()))
def test_a_hostile_svhn_mat_is_one_line_not_a_crash(tmp_path, case):
    root, cfg = svhn_root(tmp_path, hostile_svhn()[case])
    line = child_one_line(["train", cfg, "--data-root", root, "--run-dir", tmp_path / "runs"],
                          "train_32x32.mat: not a readable MATLAB .mat file")
    assert line.startswith("error: ")
    assert not (tmp_path / "runs").exists()


def svhn_with_y(y) -> bytes:
    import scipy.io

    b = io.BytesIO()
    scipy.io.savemat(b, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": y})
    return b.getvalue()


BAD_LABELS = {
    "cell": (lambda: np.array([[1.0], [2.0]], dtype=object), "y is a MATLAB cell"),
    "cell-of-strings": (lambda: np.array([["1"], ["2"]], dtype=object), "y is a MATLAB cell"),
    "char": (lambda: "12", "y is a MATLAB char"),
    "struct": (lambda: {"a": 1.0, "b": 2.0}, "y is a MATLAB struct"),
    "complex": (lambda: np.array([[1 + 2j], [3 + 0j]]), "y holds complex numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_svhn_labels_that_are_not_numbers_are_one_line(tmp_path, case):
    make, needle = BAD_LABELS[case]
    root, cfg = svhn_root(tmp_path, svhn_with_y(make()))
    r = cli("train", cfg, "--data-root", root, "--run-dir", tmp_path / "runs")
    line = one_line(r.exit_code, r.output, needle)
    assert str(root / "train_32x32.mat") in line
    assert "Warning" not in r.output and not (tmp_path / "runs").exists()


# --- 3: a FIFO where a file should be ------------------------------------------------------------

def tiny_folder(root: Path) -> Path:
    for split in ("train", "test"):
        for c, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * c + i, np.uint8)).save(
                    root / split / name / f"{i}.png")
    return root


def test_a_fifo_in_an_image_folder_is_one_line_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSCTL_CACHE", str(tmp_path / "cache"))
    root = tiny_folder(tmp_path / "pics")
    os.mkfifo(root / "train" / "b" / "pipe.png")
    cfg = write_yaml(tmp_path / "folder.yaml", TINY_CNN + "data: {name: folder, image_size: 8, "
                     "val_size: 0, pad: 0, workers: 1}\n" + TINY_TRAIN)
    line = child_one_line(["train", cfg, "--data-root", root, "--run-dir", tmp_path / "runs"],
                          "pipe.png", timeout=30)
    assert "a FIFO (named pipe), not a data file" in line


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny CapsNet run on synthetic MNIST: (run folder, data root)."""
    base = tmp_path_factory.mktemp("run")
    root = write_fake_mnist(base / "mnist", n_train=64, n_test=32)
    cfg = write_yaml(base / "tiny.yaml", "model: {conv1_channels: 8, primary_types: 2, "
                     "primary_dim: 4, class_dim: 6, decoder_hidden: [16, 32]}\n"
                     "data: {val_size: 16}\n" + TINY_TRAIN)
    r = cli("train", cfg, "--data-root", root, "--run-dir", base / "runs", "--name", "tiny",
            "--no-progress")
    assert r.exit_code == 0, r.output
    return base / "runs" / "tiny", root


def test_predict_refuses_a_fifo_without_waiting(tmp_path, run):
    """A FIFO named as an image or an array, given itself or found in a folder: one line (exit
    2) by default, an error row each with --keep-going; never a wait."""
    folder, _ = run
    for sub, name in (("a", "pipe.png"), ("b", "pipe.png"), ("c", "pipe.npy")):
        (tmp_path / sub).mkdir()
        os.mkfifo(tmp_path / sub / name)
    pipes = [tmp_path / "a" / "pipe.png", tmp_path / "b" / "pipe.png", tmp_path / "c" / "pipe.npy"]
    line = child_one_line(["predict", folder, tmp_path / "b"], str(pipes[1]), timeout=30)
    assert "a FIFO (named pipe), not a data file" in line
    status, _, _, result = cli_in_child("predict", folder, pipes[0], tmp_path / "b", pipes[2],
                                        "--keep-going", "--json", timeout=30)
    assert status == 0 and result[0] == 0, result
    rows = [json.loads(line) for line in result[1].splitlines() if line.startswith("{")]
    assert [r["file"] for r in rows] == [str(p) for p in pipes]
    assert all("a FIFO (named pipe), not a data file" in r["error"] for r in rows), rows


# --- 4: CIFAR pickles -----------------------------------------------------------------------------

class Call:
    """Pickles as a call of ``fn(*args)`` (what a hostile pickle can ask of the allowed names)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def zero_labels(n: int) -> Call:
    """n labels 0 in a few bytes: an int64 array of zero stride over one 8-byte buffer."""
    return Call(np.ndarray, (n,), np.dtype("<i8"), bytes(8), 0, (0,))


def zero_stride_batch(n: int) -> bytes:
    """The issue's batch: ``numpy.ndarray((n, 3072), uint8, b"\\x07", 0, (0, 0))``, an array
    of n images over a 1-byte buffer, and n labels the same way: a file of a few hundred
    bytes."""
    data = Call(np.ndarray, (n, 3072), np.dtype("u1"), b"\x07", 0, (0, 0))
    return pickle.dumps({b"data": data, b"labels": zero_labels(n), b"batch_label": b"x"},
                        protocol=2)


def cifar_root(tmp_path: Path, first_batch: bytes) -> tuple[Path, Path]:
    from test_datasets_more import write_cifar10

    root = write_cifar10(tmp_path / "data", per_batch=4, n_test=4)
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(first_batch)
    cfg = write_yaml(tmp_path / "cifar.yaml", TINY_CNN + "data: {name: cifar10, val_size: 0}\n"
                     + TINY_TRAIN)
    return root, cfg


def good_batch(change: dict) -> bytes:
    d = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], **change}
    return pickle.dumps(d, protocol=2)


CIFAR_CASES = {
    "zero-strides-2000000-images": (zero_stride_batch(2_000_000), "C-contiguous"),
    "float-label-1.7": (good_batch({b"labels": [0, 1.7, 2, 3]}),
                        "label 1.7 in 'labels' is not a whole number"),
    "buffer-shorter-than-declared": (pickle.dumps({b"data": Call(
        np.ndarray, (4, 3072), np.dtype("u1"), b"\0" * 100), b"labels": [0, 1, 2, 3]},
        protocol=2), "100-byte buffer"),
    "no-buffer-10^6-images": (pickle.dumps({b"data": Call(np.ndarray, (10 ** 6, 3072),
                                                          np.dtype("u1")),
                                            b"labels": zero_labels(10 ** 6)}, protocol=2),
                              "without a bytes buffer"),
    "fortran-order": (good_batch({b"data": np.asfortranarray(np.zeros((4, 3072), np.uint8))}),
                      "not C-contiguous"),
}


@pytest.mark.parametrize("case", sorted(CIFAR_CASES))
def test_a_hostile_cifar_pickle_is_one_line_before_any_allocation(tmp_path, case):
    batch, needle = CIFAR_CASES[case]
    root, cfg = cifar_root(tmp_path, batch)
    _, _, base, _ = in_child(lambda: None)
    status, seconds, rss, result = cli_in_child("train", cfg, "--data-root", root, "--run-dir",
                                                tmp_path / "runs", timeout=60)
    assert status == 0, f"wait status {status}: {result}"
    line = one_line(*result, needle)
    assert "data_batch_1" in line
    assert rss - base < 100, f"{rss - base:.0f} MB to refuse a {len(batch)}-byte batch"


# --- 5: a full disk -------------------------------------------------------------------------------

class FillingDisk(io.RawIOBase):
    """A file on a disk with ``free`` bytes left: the writes fill it, then fail with ENOSPC,
    as on a real full file system (torch.save then raises its RuntimeError)."""

    def __init__(self, fd: int, free: int):
        self.fd, self.free = fd, free

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, b) -> int:
        n = min(len(b), self.free)
        if len(b) and not n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= n
        return os.write(self.fd, bytes(b)[:n])

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def full_disk_for(which, monkeypatch, free: int = 4096) -> None:
    """The temporary files of capsctl.atomic for which ``which(path)`` is true are written
    to a disk with ``free`` bytes left (``FillingDisk``)."""
    from capsctl import atomic

    real_mkstemp, real_fdopen, doomed = tempfile.mkstemp, os.fdopen, set()

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if which(Path(name)):
            doomed.add(fd)
        return fd, name

    def fdopen(fd, mode="r", *args, **kwargs):
        if fd in doomed and "w" in mode:
            doomed.discard(fd)
            return io.BufferedWriter(FillingDisk(fd, free))
        return real_fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


def test_a_full_disk_at_a_checkpoint_is_one_line_naming_the_file_and_free_space(
        tmp_path, run, monkeypatch):
    _, root = run
    full_disk_for(lambda p: p.name.startswith(".last.pt."), monkeypatch)
    cfg = write_yaml(tmp_path / "tiny.yaml", "model: {conv1_channels: 8, primary_types: 2, "
                     "primary_dim: 4, class_dim: 6, decoder_hidden: [16, 32]}\n"
                     "data: {val_size: 16}\n" + TINY_TRAIN.replace("checkpoint_every: 0",
                                                                   "checkpoint_every: 1"))
    r = cli("train", cfg, "--data-root", root, "--run-dir", tmp_path / "runs", "--name", "x",
            "--no-progress")
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 1 and len(lines) == 1, r.output
    last = tmp_path / "runs" / "x" / "checkpoints" / "last.pt"
    assert f"cannot write checkpoint {last}: No space left on device; the previous " \
        "checkpoint is intact - free space (" in lines[0]
    assert re.search(r"\(\d[\d,.]* [MG]B free there\)", lines[0]), lines[0]
    assert "Traceback" not in r.output
    assert not list(last.parent.glob(".last.pt.*"))   # the temporary file is removed


def test_a_full_cache_folder_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, recwarn):
    monkeypatch.setenv("CAPSCTL_CACHE", str(tmp_path / "cache"))
    full_disk_for(lambda p: p.parent.name == "folders", monkeypatch)   # the cache file only
    root = tiny_folder(tmp_path / "pics")   # 12 images of 3 x 32 x 32: a 36 KB cache record,
    cfg = write_yaml(tmp_path / "folder.yaml", TINY_CNN + "data: {name: folder, image_size: 32, "
                     "val_size: 0, pad: 0, workers: 1}\n" + TINY_TRAIN)  # beyond write buffers
    r = cli("train", cfg, "--data-root", root, "--run-dir", tmp_path / "runs", "--no-progress")
    assert r.exit_code == 0, r.output
    said = r.output + "".join(f"\n{w.message}" for w in recwarn)  # printed, or a warning
    assert said.count("cannot write the cache") == 1, said
    assert "No space left on device" in said and "Traceback" not in r.output
    assert (tmp_path / "runs" / "folder" / "checkpoints" / "best.pt").is_file()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


# --- 6: a picture that cannot be drawn at the end of a run ----------------------------------------

def test_a_run_of_1000_classes_ends_with_its_summary_not_the_picture(tmp_path, monkeypatch):
    """A folder of 1,000 classes: its confusion picture (16,000 px square) is skipped with one
    warning; the run ends with its summary (exit 0), and the per-class accuracies are logged."""
    monkeypatch.setenv("CAPSCTL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "pics"
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, format="PNG")
    for split in ("train", "test"):
        for c in range(1000):
            d = root / split / f"c{c:04d}"
            d.mkdir(parents=True)
            (d / "0.png").write_bytes(png.getvalue())
    cfg = write_yaml(tmp_path / "folder.yaml", TINY_CNN + "data: {name: folder, image_size: 8, "
                     "val_size: 0, pad: 0, workers: 1}\n" + TINY_TRAIN)
    r = cli("train", cfg, "--data-root", root, "--run-dir", tmp_path / "runs", "--name", "k",
            "--no-progress")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "confusion picture of 1,000 classes is not drawn" in \
        warnings[0], r.output
    assert "test accuracy" in r.output.lower()
    rows = (tmp_path / "runs" / "k" / "metrics.jsonl").read_text()
    assert "test/class_accuracy/c0999" in rows


# --- 13: predict --recon over existing pictures, a truncated last.pt ------------------------------

def test_recon_does_not_overwrite_a_picture_without_force(tmp_path, run):
    folder, _ = run
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    out = tmp_path / "recon"
    out.mkdir()
    (out / "digit.recon.png").write_bytes(b"mine")
    r = cli("predict", folder, image, "--recon", out)
    line = one_line(r.exit_code, r.output, f"{out / 'digit.recon.png'} exists")
    assert "--force" in line
    assert (out / "digit.recon.png").read_bytes() == b"mine"
    r = cli("predict", folder, image, "--recon", out, "--force", "--json")
    assert r.exit_code == 0, r.output
    with Image.open(out / "digit.recon.png") as im:
        assert im.format == "PNG"


def test_a_truncated_last_pt_is_one_whole_sentence(tmp_path, run):
    import shutil

    folder, _ = run
    copy = tmp_path / "tiny"
    shutil.copytree(folder, copy)
    last = copy / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])
    r = cli("train", "--resume", copy, "--no-progress")
    line = one_line(r.exit_code, r.output, f"{last}: not a readable checkpoint (truncated or "
                    "corrupt: PytorchStreamReader failed reading zip archive: failed finding "
                    "central directory)")
    assert "your checkpoint file is" not in line
