"""IDX parsing and MNIST discovery, including corrupt files."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from capsctl.data import mnist
from capsctl.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from capsctl.errors import DataError
from conftest import write_fake_mnist, write_idx


def test_round_trip_gz_and_raw(tmp_path):
    a = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    assert (read_idx(write_idx(tmp_path / "a.gz", a), IMAGES_MAGIC) == a).all()
    assert (read_idx(write_idx(tmp_path / "a", a, gz=False), IMAGES_MAGIC) == a).all()


def test_wrong_magic(tmp_path):
    p = write_idx(tmp_path / "l.gz", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="wrong magic number 2049, expected 2051"):
        read_idx(p, IMAGES_MAGIC)
    p = write_idx(tmp_path / "x.gz", np.zeros(5, np.uint8), magic=0x12345678)
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(p)


def test_truncated(tmp_path):
    p = write_idx(tmp_path / "t", np.zeros((3, 28, 28), np.uint8), gz=False)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(p, IMAGES_MAGIC)
    g = tmp_path / "t.gz"
    g.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20)[:-6])
    with pytest.raises(DataError):
        read_idx(g, IMAGES_MAGIC)
    (tmp_path / "short").write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")


def test_find_in_torchvision_layout(tmp_path):
    write_fake_mnist(tmp_path / "MNIST" / "raw", n_train=20, n_test=10)
    images, labels = mnist.load_split(tmp_path, "test")
    assert images.shape == (10, 28, 28) and labels.shape == (10,)


def test_missing_files_message(tmp_path):
    with pytest.raises(DataError) as e:
        mnist.load_split(tmp_path, "train")
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path) in msg
    assert "data.download=true" in msg


def test_count_mismatch_and_label_range(tmp_path):
    write_fake_mnist(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(9, np.uint8))
    with pytest.raises(DataError, match="10 images but 9 labels"):
        mnist.load_split(tmp_path, "test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.full(10, 12, np.uint8))
    with pytest.raises(DataError, match="label 12 out of range"):
        mnist.load_split(tmp_path, "test")


def test_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPSCTL_DATA", str(tmp_path / "env"))
    assert mnist.resolve_root("flag", "cfg").name == "flag"
    assert mnist.resolve_root(None, "cfg").name == "cfg"
    assert mnist.resolve_root(None, None).name == "env"
    monkeypatch.delenv("CAPSCTL_DATA")
    assert mnist.resolve_root(None, None) == mnist.default_cache()


def test_real_mnist_checks(mnist_root):
    """The real files parse with the expected counts (and the labels cover 0-9)."""
    images, labels = mnist.load_split(mnist_root, "test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    assert LABELS_MAGIC == 2049
