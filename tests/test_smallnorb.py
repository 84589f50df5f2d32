"""smallNORB reader and preprocessing, on small files written here in the official binary format."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from capsctl.config import from_dict
from capsctl.data import smallnorb as sn
from capsctl.data.build import build
from capsctl.data.registry import DATASETS, SINGLE
from capsctl.errors import DataError

MAGIC = {np.dtype("u1"): 0x1E3D4C55, np.dtype("<i4"): 0x1E3D4C54}


def write_matrix(path: Path, array: np.ndarray, gz: bool = False, magic: int | None = None):
    """The smallNORB binary matrix format: magic, ndim, max(ndim, 3) sizes, little-endian data."""
    array = np.ascontiguousarray(array)
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    raw = struct.pack("<ii", magic or MAGIC[array.dtype], array.ndim)
    raw += struct.pack(f"<{len(dims)}i", *dims) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_fake_norb(root: Path, n: int = 12, seed: int = 0, gz: bool = True) -> Path:
    """Both splits; class c has a bright square at its own place (so crops keep the label)."""
    rng = np.random.default_rng(seed)
    folder = root / "smallnorb"
    folder.mkdir(parents=True, exist_ok=True)
    for split, stem in sn.STEMS.items():
        labels = (np.arange(n) % 5).astype("<i4")
        images = rng.integers(0, 60, (n, 2, 96, 96)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, :, 20 + 10 * c: 36 + 10 * c, 30:66] = 250
        info = rng.integers(0, 9, (n, 4)).astype("<i4")
        for part, arr in (("dat", images), ("cat", labels), ("info", info)):
            zipped = gz and part == "dat"
            write_matrix(folder / f"{stem}-{part}.mat{'.gz' if zipped else ''}", arr, gz=zipped)
    return root


def test_read_matrix_roundtrip_and_errors(tmp_path):
    a = np.arange(2 * 3 * 4 * 5, dtype=np.uint8).reshape(2, 3, 4, 5)
    write_matrix(tmp_path / "a.mat", a)
    assert np.array_equal(sn.read_matrix(tmp_path / "a.mat"), a)
    labels = np.array([4, 0, 3], dtype="<i4")                     # 1-D: sizes padded to 3
    write_matrix(tmp_path / "c.mat.gz", labels, gz=True)
    assert sn.read_matrix(tmp_path / "c.mat.gz").tolist() == [4, 0, 3]
    write_matrix(tmp_path / "bad.mat", labels, magic=0x12345678)
    with pytest.raises(DataError, match="magic"):
        sn.read_matrix(tmp_path / "bad.mat")
    (tmp_path / "short.mat").write_bytes((tmp_path / "a.mat").read_bytes()[:-7])
    with pytest.raises(DataError, match="truncated"):
        sn.read_matrix(tmp_path / "short.mat")


def test_load_split_and_missing_files(tmp_path):
    root = write_fake_norb(tmp_path / "d")
    images, labels = sn.load_split(root, "test")
    assert images.shape == (12, 2, 96, 96) and labels.dtype == np.int64
    assert labels.tolist() == [i % 5 for i in range(12)]
    with pytest.raises(DataError, match="data.download"):
        sn.load_split(tmp_path / "empty", "train")


def test_preprocessing():
    images = np.zeros((1, 1, 96, 96), np.uint8)
    images[0, 0, :2, :2] = [[10, 20], [30, 40]]
    small = sn.downsample(images)
    assert small.shape == (1, 1, 48, 48) and small[0, 0, 0, 0] == 25 and small[0, 0, 1, 1] == 0
    x = torch.rand(3, 2, 48, 48) * 200 + 20
    z = sn.standardise(x)
    assert torch.allclose(z.mean((2, 3)), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(z.std((2, 3), unbiased=False), torch.ones(3, 2), atol=1e-4)
    grid = torch.arange(48 * 48.0).view(1, 1, 48, 48).expand(2, 1, 48, 48)
    c = sn.crop(grid, torch.tensor([[0, 0], [16, 5]]))
    assert c.shape == (2, 1, 32, 32)
    assert c[0, 0, 0, 0] == 0 and c[1, 0, 0, 0] == 16 * 48 + 5 and c[1, 0, 31, 31] == 47 * 48 + 36


def test_bundle_train_and_eval_batches(tmp_path):
    root = write_fake_norb(tmp_path / "d", n=20)
    assert DATASETS["smallnorb"].task == SINGLE
    assert DATASETS["smallnorb"].classes == sn.CLASSES
    cfg = from_dict({"model": {"name": "em-capsnet", "input_size": 32, "num_classes": 5},
                     "data": {"name": "smallnorb", "val_size": 4, "root": str(root)},
                     "train": {"batch_size": 8}})
    bundle = build(cfg, torch.device("cpu"))
    assert bundle.input_size == 32 and len(bundle.val) == 4 and len(bundle.test) == 20
    assert bundle.task == bundle.train.task == bundle.val.task == bundle.test.task == SINGLE
    assert bundle.train.steps_per_epoch == 2
    b1, b2 = bundle.train.batch(0, 0, 0), bundle.train.batch(0, 0, 0)
    assert b1["x"].shape == (8, 1, 32, 32) and b1["x"].dtype == torch.float32
    assert torch.equal(b1["x"], b2["x"])                          # a pure function of the step
    assert not torch.equal(b1["x"], bundle.train.batch(0, 0, 1)["x"])   # other crops/jitter
    test = next(bundle.test.batches(20))
    assert test["x"].shape == (20, 1, 32, 32) and test["y"].tolist() == [i % 5 for i in range(20)]
    # the centre crop of the standardised 48x48 image, unjittered
    full = sn.standardise(torch.from_numpy(sn.downsample(
        sn.load_split(root, "test")[0][:, :1])).float())
    assert torch.allclose(test["x"], full[:, :, 8:40, 8:40])
    cfg.model.in_channels = 2                                     # both cameras
    assert build(cfg, torch.device("cpu")).train.batch(0, 0, 0)["x"].shape == (8, 2, 32, 32)
