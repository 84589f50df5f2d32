"""Shared fixtures: tiny model configs, small synthetic IDX files, and the real MNIST copy."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from capsctl.config import Config, from_dict

# The convolution formulation is chosen by measuring (capsctl/models/conv.py); the suite pins
# torch's own convolution so that its numbers never depend on a timing. tests/test_conv.py
# covers the other formulations and the choice itself.
os.environ.setdefault("CAPSCTL_CONV", "onednn")

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "datasets" / "mnist"


def cpu_kind() -> str:
    """The CPU's vendor and family ("GenuineIntel family 6", "AuthenticAMD family 26"): fp32
    results of the same code and torch build are bitwise equal within one kind, and differ in
    the last bits between kinds (oneDNN picks other kernels). Fixtures record, per kind, the
    numbers the release that made them gave there."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
    except OSError:
        pass
    return f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')}"


def find_real_mnist() -> Path | None:
    candidates = [os.environ.get("CAPSCTL_DATA"), str(SHARED_MNIST)]
    for c in candidates:
        if c and (Path(c) / "train-images-idx3-ubyte.gz").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The real MNIST IDX files: $CAPSCTL_DATA or ../shared/datasets/mnist; elsewhere (not in
    CI) downloaded once into the cache folder. Missing is a failure, never a skip."""
    root = find_real_mnist()
    if root is not None:
        return root
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail("real MNIST not found in CI: set CAPSCTL_DATA to a folder with the four IDX "
                    f".gz files or provide {SHARED_MNIST}")
    from capsctl.data import mnist
    from capsctl.errors import DataError

    cache = mnist.default_cache()
    try:
        for split in ("train", "test"):
            mnist.load_split(cache, split, download=True)
    except DataError as e:
        pytest.fail(f"real MNIST not found and could not be downloaded: {e}")
    return cache


TINY_CAPSNET = {"conv1_channels": 8, "primary_types": 2, "primary_dim": 4, "class_dim": 6,
                "decoder_hidden": [16, 32]}


def tiny_config(**sections) -> Config:
    """The paper architecture at tiny widths: runs a step in milliseconds on a CPU. Keyword
    arguments are sections of keys (``model={"routing_iterations": 1}``); a ``model`` or
    ``data`` section may pick another family or dataset by ``name`` (the tiny CapsNet widths
    then do not apply)."""
    model = dict(sections.pop("model", {}))
    base_model = TINY_CAPSNET if model.get("name", "capsnet") == "capsnet" else {}
    data = {"val_size": 32, **sections.pop("data", {})}
    train = {"batch_size": 16, "eval_batch_size": 64, "log_every": 2, "checkpoint_every": 0,
             "checkpoint_minutes": 0.0, "images_every_epoch": False, **sections.pop("train", {})}
    raw = {"model": {**base_model, **model}, "data": data, "train": train, **sections}
    return from_dict(raw, source="tiny_config")


@pytest.fixture
def tiny_cfg() -> Config:
    return tiny_config()


def write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file; ``magic`` overrides the header's magic number."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = magic if magic is not None else (0x0800 | array.ndim)
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fake_mnist(root: Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Path:
    """A small MNIST-shaped dataset: each class is a bright bar at its own row (learnable)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, 4 + 2 * y: 6 + 2 * y, 6:22] = 255
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def fake_mnist(tmp_path) -> Path:
    return write_fake_mnist(tmp_path / "mnist")


# The compiled CPU kernel goes into a folder of this test session, never the user's cache.
os.environ.setdefault("CAPSCTL_CACHE", str(Path(__import__("tempfile").mkdtemp(
    prefix="capsctl-test-cache-"))))


def cli(*args):
    """``capsctl ARGS...`` run in this process (typer's CliRunner): its Result."""
    from typer.testing import CliRunner

    from capsctl.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(r, needle: str) -> str:
    """Assert that a CliRunner result is exit code 2 with one line holding ``needle`` (no
    traceback); returns the line."""
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.output
    assert "Traceback" not in r.output
    return lines[0]
