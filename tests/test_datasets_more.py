"""fashion-mnist, kmnist, emnist (IDX), cifar10/cifar100 (python batches), svhn (.mat): small
files written here in each official format and read back (never downloaded); the natural-image
augmentation (random crop of a padded image, flip) against a per-example loop; exact replay of
training batches; hostile files refused with one line; a few training steps on each set."""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capsctl.config import empty, from_dict
from capsctl.data import cifar, idx_sets, svhn
from capsctl.data import image_sets_config as isc
from capsctl.data.augment import centre_crop, crop_flip, place
from capsctl.data.build import build
from capsctl.data.natural import CropSource, ImageStream
from capsctl.data.datasets import ImageSet
from capsctl.data.registry import DATASETS, NORMALISATIONS, SINGLE, STANDARDISED, UNIT
from capsctl.errors import DataError
from conftest import tiny_config, write_idx

CPU = torch.device("cpu")
NEW = ("fashion-mnist", "kmnist", "emnist", "cifar10", "cifar100", "svhn")


# --- writers: the official formats --------------------------------------------------------------

def bar_images(labels: np.ndarray, side: int, channels: int = 0, seed: int = 0) -> np.ndarray:
    """uint8 images where class c is a bright bar at its own row (learnable, crop-robust):
    (N, side, side) when channels is 0, else (N, channels, side, side)."""
    rng = np.random.default_rng(seed)
    shape = (len(labels), side, side) if not channels else (len(labels), channels, side, side)
    images = (rng.random(shape) * 40).astype(np.uint8)
    for i, y in enumerate(labels):
        row = 4 + (2 * int(y)) % (side - 8)
        images[i, ..., row:row + 2, 4:side - 4] = 255
    return images


def write_idx_set(folder: Path, stems: tuple[str, str], labels: np.ndarray, transposed=False):
    folder.mkdir(parents=True, exist_ok=True)
    images = bar_images(labels, 28)
    write_idx(folder / f"{stems[0]}.gz", images.transpose(0, 2, 1) if transposed else images)
    write_idx(folder / f"{stems[1]}.gz", labels.astype(np.uint8))
    return images


def write_fashion(root: Path, sub: str = "FashionMNIST/raw", n=(96, 40)) -> Path:
    for split, count in zip(("train", "test"), n):
        write_idx_set(root / sub, idx_sets.stems(idx_sets.FASHION, split, None),
                      np.arange(count) % 10)
    return root


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 20) -> Path:
    """cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta, as pickled dicts."""
    folder = root / cifar.CIFAR10_DIR
    folder.mkdir(parents=True, exist_ok=True)
    names = [*cifar.CIFAR10_FILES["train"], "test_batch"]
    for k, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        labels = [(i + k) % 10 for i in range(n)]
        data = bar_images(np.array(labels), 32, 3, seed=k).reshape(n, 3072)
        batch = {"batch_label": f"batch {k}", "labels": labels, "data": data,
                 "filenames": [f"img_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": list(isc.CIFAR10_CLASSES), "num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_cifar100(root: Path, n_train: int = 60, n_test: int = 30) -> Path:
    folder = root / cifar.CIFAR100_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = np.arange(n) % 100
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": b"training batch 1 of 1",
                 b"fine_labels": fine.tolist(), b"coarse_labels": (fine % 20).tolist(),
                 b"data": bar_images(fine, 32, 3).reshape(n, 3072)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    return root


def write_svhn_mat(path: Path, labels_1to10: np.ndarray, images_NCHW: np.ndarray | None = None):
    import scipy.io

    if images_NCHW is None:
        images_NCHW = bar_images(labels_1to10 % 10, 32, 3)
    x = np.ascontiguousarray(images_NCHW.transpose(2, 3, 1, 0))   # (32, 32, 3, N)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"X": x, "y": labels_1to10.astype(np.uint8).reshape(-1, 1)},
                     do_compression=True)


def write_svhn(root: Path, n_train: int = 60, n_test: int = 30, extra: int = 0) -> Path:
    write_svhn_mat(root / "train_32x32.mat", np.arange(n_train) % 10 + 1)
    write_svhn_mat(root / "test_32x32.mat", np.arange(n_test) % 10 + 1)
    if extra:
        write_svhn_mat(root / "extra_32x32.mat", np.arange(extra) % 10 + 1)
    return root


def cfg_for(name: str, **data):
    cfg = empty("capsnet", name)
    cfg.data = dataclasses.replace(cfg.data, val_size=10, **data)
    cfg.train.batch_size = 8
    return cfg


# --- the registry ------------------------------------------------------------------------------

def test_every_dataset_declares_side_channels_classes_normalisation():
    for name, spec in DATASETS.items():
        assert spec.normalisation in NORMALISATIONS, name
    assert DATASETS["smallnorb"].normalisation == STANDARDISED
    assert DATASETS["mnist"].normalisation == UNIT
    sides = {"fashion-mnist": 28, "kmnist": 28, "emnist": 28, "cifar10": 32, "cifar100": 32,
             "svhn": 32, "folder": 32}
    for name, side in sides.items():
        spec = DATASETS[name]
        assert spec.task == SINGLE and spec.side(spec.options()) == side, name
    assert DATASETS["cifar10"].side(isc.CIFAR10Config(crop=24)) == 24
    assert DATASETS["folder"].side(isc.FolderConfig(image_size=64, crop=48)) == 48
    counts = {n: len(DATASETS[n].class_names(DATASETS[n].options())) for n in NEW}
    assert counts == {"fashion-mnist": 10, "kmnist": 10, "emnist": 47, "cifar10": 10,
                      "cifar100": 100, "svhn": 10}
    emnist = {s: len(DATASETS["emnist"].class_names(isc.EMNISTConfig(split=s)))
              for s in isc.EMNIST_CLASSES}
    assert emnist == {"balanced": 47, "bymerge": 47, "byclass": 62, "letters": 26, "digits": 10,
                      "mnist": 10}
    assert len(DATASETS["cifar100"].class_names(isc.CIFAR100Config(labels="coarse"))) == 20
    assert len(set(isc.CIFAR100_FINE)) == 100 and len(set(isc.CIFAR100_COARSE)) == 20
    assert DATASETS["folder"].channel_counts(isc.FolderConfig(channels=1)) == (1,)
    assert DATASETS["cifar10"].channel_counts(isc.CIFAR10Config()) == (3,)
    assert DATASETS["smallnorb"].channel_counts(DATASETS["smallnorb"].options()) == (1, 2)


def test_option_checks_are_one_line():
    from capsctl.errors import ConfigError

    with pytest.raises(ConfigError, match="data.crop=33|must be <= 32"):
        from_dict({"data": {"name": "cifar10", "crop": 33}})
    with pytest.raises(ConfigError, match="1 .grey. or 3"):
        isc.FolderConfig(channels=2).check("x")
    with pytest.raises(ConfigError, match="download does not apply"):
        isc.FolderConfig(download=True).check("x")
    with pytest.raises(ConfigError, match="larger than the 16x16"):
        isc.FolderConfig(image_size=16, crop=20).check("x")


# --- IDX sets -----------------------------------------------------------------------------------

def test_fashion_mnist_reads_torchvision_layout(tmp_path):
    root = write_fashion(tmp_path / "data")
    b = build(cfg_for("fashion-mnist"), CPU, str(root))
    assert (len(b.train.data), len(b.val), len(b.test), b.input_size) == (86, 10, 40, 28)
    batch = b.train.batch(0, 0, 0)
    assert batch["x"].shape == (8, 1, 28, 28) and batch["x"].dtype == torch.float32
    assert 0 <= batch["x"].min() and batch["x"].max() <= 1 and batch["y"].dtype == torch.int64
    t = b.test.get(torch.arange(3))
    want = bar_images(np.arange(40) % 10, 28)[:3] / 255.0
    assert np.allclose(t["x"][:, 0].numpy(), want) and t["y"].tolist() == [0, 1, 2]
    assert b.test.task == b.train.task == SINGLE and b.test.default_limit is None


def test_fashion_mnist_never_reads_mnist_files_of_the_data_root(tmp_path):
    root = write_fashion(tmp_path / "data", sub=".")  # MNIST's file names, right in the root
    with pytest.raises(DataError, match="Fashion-MNIST train files missing.*FashionMNIST/raw"):
        build(cfg_for("fashion-mnist"), CPU, str(root))
    named = write_fashion(tmp_path / "fashion-mnist", sub=".")  # a folder named for the set
    assert len(build(cfg_for("fashion-mnist"), CPU, str(named)).test) == 40
    sub = write_fashion(tmp_path / "d2", sub="fashion-mnist")
    assert len(build(cfg_for("fashion-mnist"), CPU, str(sub)).test) == 40


def test_kmnist_and_label_range(tmp_path):
    root = tmp_path / "d"
    for split, n in (("train", 50), ("test", 20)):
        write_idx_set(root / "kmnist", idx_sets.stems(idx_sets.KMNIST, split, None),
                      np.arange(n) % 10)
    b = build(cfg_for("kmnist"), CPU, str(root))
    assert len(b.train.data) == 40 and sorted(set(b.test.data.labels.tolist())) == list(range(10))
    write_idx(root / "kmnist" / "t10k-labels-idx1-ubyte.gz", np.full(20, 10, np.uint8))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: label 10 out of range 0-9"):
        build(cfg_for("kmnist"), CPU, str(root))


def test_emnist_letters_are_upright_and_zero_based(tmp_path):
    root = tmp_path / "d"
    upright = {}
    for split, n in (("train", 40), ("test", 26)):
        labels = np.arange(n) % 26 + 1       # the files' letters labels: 1-26
        upright[split] = write_idx_set(root / "EMNIST" / "raw",
                                       idx_sets.stems(idx_sets.EMNIST, split, "letters"),
                                       labels, transposed=True)
    b = build(cfg_for("emnist", split="letters"), CPU, str(root))
    assert b.test.data.labels.tolist() == list(range(26))
    assert torch.equal(b.test.data.images[:, 0], torch.from_numpy(upright["test"]))
    with pytest.raises(DataError, match="emnist-balanced-train-images-idx3-ubyte"):
        build(cfg_for("emnist"), CPU, str(root))   # another split's files are not there


def test_idx_set_broken_file_is_one_line(tmp_path):
    root = write_fashion(tmp_path / "d")
    path = root / "FashionMNIST/raw/train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(DataError) as e:
        build(cfg_for("fashion-mnist"), CPU, str(root))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# --- CIFAR --------------------------------------------------------------------------------------

def test_cifar10_batches_crops_and_channel_layout(tmp_path):
    root = write_cifar10(tmp_path / "d")
    b = build(cfg_for("cifar10", crop=24, pad=0), CPU, str(root))   # the paper's patches
    assert (len(b.train.data), len(b.val), len(b.test), b.input_size) == (90, 10, 20, 24)
    # the 3072 values of a row: 1024 red, 1024 green, 1024 blue, each 32x32 row-major
    raw = cifar.read_batch(root / cifar.CIFAR10_DIR / "test_batch")["data"]
    full = torch.from_numpy(raw.reshape(-1, 3, 32, 32))
    assert torch.equal(b.test.data.images, full)
    t = b.test.get(torch.arange(4))
    assert t["x"].shape == (4, 3, 24, 24)
    assert torch.allclose(t["x"], full[:4, :, 4:28, 4:28].float() / 255)
    x = b.train.batch(0, 0, 0)["x"]
    assert x.shape == (8, 3, 24, 24)
    assert b.train.flip and b.train.room == 8


def test_cifar100_fine_and_coarse(tmp_path):
    root = write_cifar100(tmp_path / "d")
    fine = build(cfg_for("cifar100"), CPU, str(root))
    coarse = build(cfg_for("cifar100", labels="coarse"), CPU, str(root))
    assert fine.test.data.labels.tolist() == list(range(30))
    assert fine.input_size == 32 and fine.train.room == 8 and fine.train.flip  # pad 4, flip
    assert fine.train.batch(0, 0, 0)["x"].shape == (8, 3, 32, 32)
    assert coarse.test.data.labels.tolist() == [i % 20 for i in range(30)]


def test_cifar_pickle_cannot_run_code(tmp_path):
    root = write_cifar10(tmp_path / "d")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = root / cifar.CIFAR10_DIR / "data_batch_3"
    bad.write_bytes(pickle.dumps({"data": Evil(), "labels": []}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3: not a readable CIFAR python batch "
                                        r"\(UnpicklingError: refusing to load (posix|os)\.system"):
        build(cfg_for("cifar10"), CPU, str(root))
    assert not marker.exists()
    for payload in (pickle.dumps(print), pickle.dumps(dataclasses.replace),
                    pickle.dumps(np.load)):  # builtins, functions, numpy beyond arrays
        bad.write_bytes(payload)
        with pytest.raises(DataError, match="refusing to load"):
            cifar.read_batch(bad)


@pytest.mark.parametrize("case", ["truncated", "not_dict", "float_data", "short_labels",
                                  "label_range", "missing", "object_array", "huge_array"])
def test_cifar_broken_batches_are_one_line(tmp_path, case):
    root = write_cifar10(tmp_path / "d")
    path = root / cifar.CIFAR10_DIR / "data_batch_2"
    good = cifar.read_batch(path)
    doc = {"data": good["data"], "labels": good["labels"]}
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif case == "not_dict":
        path.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    elif case == "float_data":
        path.write_bytes(pickle.dumps({**doc, "data": doc["data"].astype(np.float32)}))
    elif case == "short_labels":
        path.write_bytes(pickle.dumps({**doc, "labels": doc["labels"][:-1]}))
    elif case == "label_range":
        path.write_bytes(pickle.dumps({**doc, "labels": [10] * len(doc["labels"])}))
    elif case == "missing":
        path.unlink()
    elif case == "object_array":
        path.write_bytes(pickle.dumps({**doc, "data": np.array([object()] * 3, dtype=object)}))
    elif case == "huge_array":  # an array reconstruction declaring 2**40 elements up front
        raw = pickle.dumps({**doc, "data": np.zeros(7, np.uint8)}, protocol=2)
        path.write_bytes(raw.replace(b"K\x00\x85", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85"))
    with pytest.raises(DataError) as e:
        build(cfg_for("cifar10"), CPU, str(root))
    msg = str(e.value)
    assert "\n" not in msg and ("data_batch_2" in msg), msg
    if case == "huge_array":
        assert "refusing an array reconstruction" in msg
    if case == "object_array":
        assert "refusing a numpy array of dtype object" in msg


# --- SVHN ---------------------------------------------------------------------------------------

def test_svhn_mat_layout_labels_and_extra(tmp_path):
    root = write_svhn(tmp_path / "d", extra=25)
    images, labels = svhn.read_mat(root / "test_32x32.mat")
    assert labels.tolist() == [(i + 1) % 10 for i in range(30)]     # 10 is the digit 0
    want = bar_images((np.arange(30) % 10 + 1) % 10, 32, 3)
    assert np.array_equal(images, want)
    b = build(cfg_for("svhn"), CPU, str(root))
    assert (len(b.train.data), len(b.val), len(b.test), b.input_size) == (50, 10, 30, 32)
    assert not b.train.flip and b.train.room == 4     # pad 2: shifts, never mirrored
    assert len(build(cfg_for("svhn", extra=True), CPU, str(root)).train.data) == 75


@pytest.mark.parametrize("case", ["truncated", "garbage", "float_x", "bad_labels", "no_y",
                                  "missing"])
def test_svhn_broken_files_are_one_line(tmp_path, case):
    import scipy.io

    root = write_svhn(tmp_path / "d")
    path = root / "train_32x32.mat"
    x = np.zeros((32, 32, 3, 5), np.uint8)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif case == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif case == "float_x":
        scipy.io.savemat(str(path), {"X": x.astype(np.float64), "y": np.ones((5, 1))})
    elif case == "bad_labels":
        scipy.io.savemat(str(path), {"X": x, "y": np.full((5, 1), 11.0)})
    elif case == "no_y":
        scipy.io.savemat(str(path), {"X": x})
    elif case == "missing":
        path.unlink()
    with pytest.raises(DataError) as e:
        build(cfg_for("svhn"), CPU, str(root))
    assert "\n" not in str(e.value) and "train_32x32.mat" in str(e.value), str(e.value)


# --- augmentation -------------------------------------------------------------------------------

def loop_crop_flip(images, offsets, flips, pad, crop):
    """Per-example reference of augment.crop_flip."""
    out = []
    for img, (r, c), f in zip(images, offsets.tolist(), flips.tolist()):
        p = torch.nn.functional.pad(img, (pad,) * 4)
        w = p[:, r:r + crop, c:c + crop]
        out.append(w.flip(-1) if f else w)
    return torch.stack(out)


def test_crop_flip_matches_a_loop_and_the_digit_shift():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (9, 3, 12, 12), generator=g, dtype=torch.uint8)
    for pad, crop in ((0, 8), (2, 12), (3, 10)):
        offsets = torch.randint(0, 12 + 2 * pad - crop + 1, (9, 2), generator=g)
        flips = torch.randint(0, 2, (9,), generator=g).bool()
        assert torch.equal(crop_flip(images, offsets, flips, pad, crop),
                           loop_crop_flip(images, offsets, flips, pad, crop))
        assert torch.equal(crop_flip(images, offsets, None, pad, crop),
                           loop_crop_flip(images, offsets, flips & False, pad, crop))
    # pad = shift, crop = side is MNIST's shift (augment.place), bit for bit
    grey = images[:, 0]
    offsets = torch.randint(0, 5, (9, 2), generator=g)
    assert torch.equal(crop_flip(grey[:, None], offsets, None, 2, 12)[:, 0],
                       place(grey, offsets, 0, 2))
    assert torch.equal(centre_crop(images, 8), images[:, :, 2:10, 2:10])


def test_image_stream_is_a_pure_function_of_seed_epoch_step():
    g = torch.Generator().manual_seed(1)
    data = ImageSet(torch.randint(0, 256, (50, 3, 16, 16), generator=g, dtype=torch.uint8),
                    torch.arange(50) % 10)
    a = ImageStream(data, 8, seed=3, pad=2, crop=12, flip=True)
    b = ImageStream(data, 8, seed=3, pad=2, crop=12, flip=True)
    later = a.batch(2, 1, 13)
    a.batch(0, 0, 0)
    assert torch.equal(b.batch(2, 1, 13)["x"], later["x"])      # any order: resume is exact
    assert torch.equal(a.batch(2, 1, 13)["x"], later["x"])
    assert not torch.equal(a.batch(2, 1, 14)["x"], later["x"])  # new step, new windows
    assert later["x"].shape == (8, 3, 12, 12) and a.steps_per_epoch == 6
    # flips happen for some examples and not others
    plain = ImageStream(data, 50, seed=3, pad=0, crop=16, flip=True).batch(0, 0, 5)
    idx = ImageStream(data, 50, seed=3).permutation(0)
    src = data.images[idx].float() / 255
    same = (plain["x"] == src).flatten(1).all(1)
    mirrored = (plain["x"] == src.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    ev = CropSource(data, "test", 12)
    assert torch.equal(ev.get(torch.arange(3))["x"], data.images[:3, :, 2:14, 2:14] / 255)
    assert sum(len(x["y"]) for x in ev.batches(7, limit=20)) == 20 and len(ev) == 50


# --- end to end ---------------------------------------------------------------------------------

WRITERS = {"fashion-mnist": write_fashion, "cifar10": write_cifar10,
           "cifar100": write_cifar100, "svhn": write_svhn}


@pytest.mark.parametrize("name", list(WRITERS) + ["kmnist", "emnist"])
def test_a_few_training_steps(tmp_path, name):
    from capsctl.training import train

    root = tmp_path / "data"
    if name in WRITERS:
        WRITERS[name](root)
    else:
        s = idx_sets.KMNIST if name == "kmnist" else idx_sets.EMNIST
        for split, n in (("train", 60), ("test", 20)):
            write_idx_set(root / s.folders[0], idx_sets.stems(s, split, "balanced"),
                          np.arange(n) % 10)
    data = {"name": name, "val_size": 10}
    cfg = tiny_config(data=data, train={"max_steps": 3, "batch_size": 8, "eval_batch_size": 16})
    summary = train(cfg, tmp_path / "run", CPU, data_root=str(root), show_progress=False)
    assert summary["steps"] == 3, summary
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_data_modules_do_not_import_torch_for_config():
    import subprocess

    code = ("import sys; from capsctl.data.registry import DATASETS; "
            "from capsctl.config import empty; c = empty('capsnet', 'folder'); "
            "print(DATASETS['folder'].class_names(c.data), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "None False", out.stderr
