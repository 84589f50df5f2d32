"""The ``folder`` dataset: ROOT/{train,val,test}/<class>/ images of any size and mode, decoded
once (in parallel) to data.image_size x data.channels, cached in capsctl's cache folder (never in
ROOT) and read from there while the files are unchanged; bad images stop the build with the
file's name or are skipped and counted."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsctl.config import empty
from capsctl.data import folder
from capsctl.data.build import build
from capsctl.data.registry import DATASETS
from capsctl.errors import DataError

CPU = torch.device("cpu")
CLASSES = ("cat", "dog", "emu")


def picture(label: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Class c: a bright horizontal band at its own height, on a dark background."""
    w, h = size
    a = np.full((h, w, 3), 20, np.uint8)
    top = h * (1 + 2 * label) // 8
    a[top:top + max(1, h // 8), :, :] = (250, 200, 150)
    img = Image.fromarray(a)
    return img.convert(mode) if mode != "RGB" else img


KINDS = [("png", "RGB", (20, 20)), ("png", "L", (33, 17)), ("jpg", "RGB", (40, 64)),
         ("png", "RGBA", (16, 16)), ("png", "P", (24, 30))]


def make_folder(root: Path, n_train: int = 8, n_test: int = 3, val: int = 0) -> Path:
    """Mixed files: PNG grey/RGB/RGBA/palette and JPEG, several sizes, non-square ones too
    (file i of class c is of kind KINDS[(i + c) % 5])."""
    kinds = KINDS
    for split, n in (("train", n_train), ("test", n_test), ("val", val)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            if n:
                d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ext, mode, size = kinds[(i + c) % len(kinds)]
                picture(c, size, mode).save(d / f"{split}_{i}.{ext}")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"junk")
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("CAPSCTL_CACHE", str(path))
    return path


def cfg_for(root: Path | None, **data):
    cfg = empty("capsnet", "folder")
    cfg.data = dataclasses.replace(cfg.data, **{"root": str(root) if root else None,
                                                "image_size": 16, "val_size": 3, **data})
    cfg.model.num_classes = 3
    cfg.train.batch_size = 4
    return cfg


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


def test_decodes_converts_and_labels_by_folder(tmp_path, cache):
    root = make_folder(tmp_path / "pics")
    before = files_under(root)
    b = build(cfg_for(root), CPU)
    assert files_under(root) == before                      # nothing written into ROOT
    assert len(list((cache / "folders").glob("*.pt"))) == 1
    assert (len(b.train.data), len(b.val), len(b.test), b.input_size) == (21, 3, 9, 16)
    imgs = b.test.data.images
    assert imgs.shape == (9, 3, 16, 16) and imgs.dtype == torch.uint8
    assert b.test.data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # the band of class c lands where the centre square of its picture puts it, resized
    rows = imgs.float().mean(dim=(1, 3)).argmax(dim=1).tolist()
    for k, row in enumerate(rows):
        c, i = divmod(k, 3)
        w, h = KINDS[(i + c) % len(KINDS)][2]
        side, middle = min(w, h), h * (1 + 2 * c) // 8 + max(1, h // 8) / 2
        want = (middle - (h - side) // 2) * 16 / side
        assert abs(row + 0.5 - want) <= 1.5, (k, row, want)
    x = b.train.batch(0, 0, 0)["x"]
    assert x.shape == (4, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert DATASETS["folder"].class_names(cfg_for(root).data) == CLASSES


def test_decode_modes(tmp_path):
    """16-bit grey is scaled (not clipped), grey to RGB repeats, RGB to grey is luminance."""
    a16 = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(a16).save(tmp_path / "g16.png")
    assert np.array_equal(folder.decode_image(str(tmp_path / "g16.png"), 8, 1)[0], a16 // 257)
    rgb = folder.decode_image(str(tmp_path / "g16.png"), 8, 3)
    assert rgb.shape == (3, 8, 8) and (rgb == rgb[:1]).all()
    Image.fromarray(np.full((6, 6, 3), (255, 0, 0), np.uint8)).save(tmp_path / "red.png")
    assert (folder.decode_image(str(tmp_path / "red.png"), 6, 1) == 76).all()   # 0.299 * 255


def test_grey_channels_and_crop(tmp_path, cache):
    root = make_folder(tmp_path / "pics")
    b = build(cfg_for(root, channels=1, crop=12, pad=2, flip=True), CPU)
    assert b.test.data.images.shape[1:] == (1, 16, 16) and b.input_size == 12
    assert b.train.batch(0, 0, 0)["x"].shape == (4, 1, 12, 12)
    assert b.test.get(torch.arange(2))["x"].shape == (2, 1, 12, 12)


def test_cache_is_reused_while_files_are_unchanged(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "pics")
    first = build(cfg_for(root), CPU)

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(folder, "decode_all", no_decoding)
    again = build(cfg_for(root), CPU)
    assert torch.equal(first.train.data.images, again.train.data.images)
    # a touched file, another size or channel count: decoded again, under another key
    for change in ("touch", "size", "channels"):
        monkeypatch.undo()
        monkeypatch.setenv("CAPSCTL_CACHE", str(cache))
        if change == "touch":
            p = root / "test" / "dog" / "test_0.png"
            os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10 ** 9))
            build(cfg_for(root), CPU)
        elif change == "size":
            build(cfg_for(root, image_size=20), CPU)
        else:
            build(cfg_for(root, channels=1), CPU)
    assert len(list((cache / "folders").glob("*.pt"))) == 4
    assert not list((cache / "folders").glob("*.tmp"))      # written atomically


def test_unusable_cache_file_is_rebuilt(tmp_path, cache):
    root = make_folder(tmp_path / "pics")
    build(cfg_for(root), CPU)
    (path,) = (cache / "folders").glob("*.pt")
    path.write_bytes(b"torn")
    with pytest.warns(UserWarning, match="unreadable"):
        b = build(cfg_for(root), CPU)
    assert len(b.test) == 9 and path.stat().st_size > 1000


def test_bad_image_names_the_file_or_is_skipped(tmp_path, cache):
    root = make_folder(tmp_path / "pics")
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(DataError) as e:
        build(cfg_for(root), CPU)
    assert str(bad) in str(e.value) and "skip_bad_images" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image"):
        b = build(cfg_for(root, skip_bad_images=True), CPU)
    assert len(b.train.data) + len(b.val) == 24
    with pytest.raises(DataError, match="broken.png"):   # the cache remembers the bad file
        build(cfg_for(root), CPU)


def test_validation_from_val_folder_or_a_fixed_held_out_slice(tmp_path, cache):
    root = make_folder(tmp_path / "pics", val=2)
    b = build(cfg_for(root), CPU)
    assert (len(b.train.data), len(b.val)) == (24, 6)
    plain = make_folder(tmp_path / "plain")
    one, two = build(cfg_for(plain, val_size=5), CPU), build(cfg_for(plain, val_size=5), CPU)
    assert len(one.val) == 5 and len(one.train.data) == 19
    assert torch.equal(one.val.data.images, two.val.data.images)
    assert len(build(cfg_for(plain, val_size=0), CPU).train.data) == 24
    assert build(cfg_for(plain, val_size=0), CPU).val is None
    with pytest.raises(DataError, match="data.val_size=24 leaves no training images"):
        build(cfg_for(plain, val_size=24), CPU)


@pytest.mark.parametrize("case", ["no_root", "not_a_folder", "no_test", "one_class",
                                  "foreign_class", "empty_class", "classes_mismatch"])
def test_layout_errors_are_one_line(tmp_path, cache, case):
    root = make_folder(tmp_path / "pics")
    cfg = cfg_for(root)
    if case == "no_root":
        cfg = cfg_for(None)
    elif case == "not_a_folder":
        cfg = cfg_for(tmp_path / "nowhere")
    elif case == "no_test":
        for p in (root / "test").rglob("*"):
            if p.is_file():
                p.unlink()
        for d in sorted((root / "test").rglob("*"), reverse=True):
            d.rmdir()
        (root / "test").rmdir()
    elif case == "one_class":
        cfg = cfg_for(make_folder_one(tmp_path / "one"))
    elif case == "foreign_class":
        (root / "test" / "yak").mkdir()
    elif case == "empty_class":
        (root / "train" / "fox").mkdir()
    elif case == "classes_mismatch":
        cfg.model.num_classes = 5
    with pytest.raises(DataError) as e:
        build(cfg, CPU)
    msg = str(e.value)
    assert "\n" not in msg and "folder dataset" in msg, msg
    assert list((cache / "folders").glob("*.pt")) == [] or case == "classes_mismatch"


def make_folder_one(root: Path) -> Path:
    for split in ("train", "test"):
        (root / split / "only").mkdir(parents=True)
        picture(0, (8, 8)).save(root / split / "only" / "a.png")
    return root


def test_data_root_flag_wins_and_classes_hook(tmp_path, cache):
    root = make_folder(tmp_path / "pics")
    cfg = cfg_for(tmp_path / "elsewhere")
    assert len(build(cfg, CPU, str(root)).test) == 9
    spec = DATASETS["folder"]
    assert spec.class_names(cfg.data) is None
    assert spec.class_names(cfg.data, str(root)) == CLASSES
    assert spec.class_names(cfg_for(None).data) is None


def test_parallel_decoding_matches_serial(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "pics", n_train=12)
    classes, splits = folder.scan(root)
    paths = splits["train"].paths
    serial, bad = folder.decode_chunk([str(root / p) for p in paths], 16, 3)
    monkeypatch.setattr(folder, "PROCESS_MIN", 1)
    monkeypatch.setattr(folder, "CHUNK", 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        parallel, bad2 = folder.decode_all(root, paths, 16, 3, workers=2)
    assert np.array_equal(serial, parallel) and bad == bad2 == []


def test_a_few_training_steps(tmp_path, cache):
    from capsctl.config import from_dict
    from capsctl.training import train

    root = make_folder(tmp_path / "pics")
    cfg = from_dict({
        "model": {"conv1_channels": 8, "primary_types": 2, "primary_dim": 4, "class_dim": 6,
                  "decoder_hidden": [16, 32], "num_classes": 3, "in_channels": 3},
        "data": {"name": "folder", "root": str(root), "image_size": 28, "val_size": 3},
        "train": {"batch_size": 4, "max_steps": 3, "checkpoint_every": 0,
                  "checkpoint_minutes": 0.0, "images_every_epoch": False}})
    summary = train(cfg, tmp_path / "run", CPU, show_progress=False)
    assert summary["steps"] == 3
