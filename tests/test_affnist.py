"""affNIST: the .mat reader (pixel order, both layouts, bad files), the affnist-synth generator,
expanded-MNIST placement, early stopping and final evaluation, and CapsNet vs CNN in one table."""

from __future__ import annotations

import io
import json
import shutil
import urllib.request
import zipfile

import numpy as np
import pytest
import scipy.io
import scipy.ndimage
import torch
from rich.console import Console
from typer.testing import CliRunner

import capsctl.data.build as data_mod
from capsctl import checkpoint
from capsctl.cli import app
from capsctl.config import ConfigError, from_dict, to_dict
from capsctl.data import affnist, mnist
from capsctl.data.augment import place
from capsctl.data.registry import SINGLE
from capsctl.errors import CapsctlError, DataError
from capsctl.models import build_model
from capsctl.training import train
from conftest import tiny_config, write_fake_mnist, write_idx

CPU = torch.device("cpu")
runner = CliRunner()


def cfg40(**model):
    """A tiny 40x40 model trained on expanded MNIST (data.shift 6: anywhere on the canvas)."""
    cfg = tiny_config(model={"input_size": 40, **model}, data={"name": "expanded-mnist"})
    assert (cfg.data.name, cfg.data.shift) == ("expanded-mnist", 6)
    return cfg


def tiny_cnn40():
    return cfg40(name="cnn", channels=[4, 4], pool=[2, 2], hidden=[16])


def all_images(source, batch_size=7):
    xs, ys = zip(*[(b["x"], b["y"]) for b in source.batches(batch_size)])
    return torch.cat(xs), torch.cat(ys)


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- reader -------------------------------------------------------------------------------------

def test_centred_variant_from_real_mnist_round_trips_to_the_padded_digits(tmp_path, mnist_root):
    """Pins the pixel order: the official 'centred' file is MNIST padded by 6 px, one picture per
    column of a 1600 x N matrix read row-major. Written here by hand, independently of capsctl."""
    digits, labels = mnist.load_split(mnist_root, "test")
    digits, labels = digits[:300], labels[:300]
    padded = np.pad(digits, ((0, 0), (6, 6), (6, 6)))
    (tmp_path / "affnist").mkdir()
    scipy.io.savemat(tmp_path / "affnist" / "test.mat", {"affNISTdata": {
        "image": padded.reshape(300, 1600).T.astype(np.uint8),
        "label_int": labels.reshape(1, -1).astype(np.uint8)}})
    source = data_mod.build_eval("affnist", "test", cfg40(), CPU, str(tmp_path))
    x, y = all_images(source, batch_size=128)
    got = (x[:, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(got, padded)
    assert np.array_equal(y.numpy(), labels)
    assert not np.array_equal(got, padded.transpose(0, 2, 1))  # the test can tell the orders apart
    # the same pictures as expanded MNIST's centred placement
    centred = place(torch.from_numpy(digits.copy()), None, 6, 6)
    assert torch.equal(torch.from_numpy(got), centred)


def _write_batches(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    images, labels = [], []
    for k, n in enumerate(sizes, 1):
        im = rng.integers(0, 256, (n, 40, 40), dtype=np.uint8)
        lab = rng.integers(0, 10, n)
        affnist.write_mat(folder / f"{k}.mat", im, lab)
        images.append(im)
        labels.append(lab)
    return np.concatenate(images), np.concatenate(labels)


def test_batches_folder_and_single_file_layouts(tmp_path):
    images, labels = _write_batches(tmp_path / "affnist" / "test_batches", [10, 3, 8])
    source = data_mod.build_eval("affnist", "test", cfg40(), CPU, str(tmp_path))
    assert source.name == "affnist" and len(source) == 21 and source.task == SINGLE
    x, y = all_images(source, batch_size=4)
    assert x.shape == (21, 1, 40, 40) and x.dtype == torch.float32
    assert np.array_equal((x[:, 0] * 255).round().byte().numpy(), images)
    assert np.array_equal(y.numpy(), labels)
    assert sum(len(b["y"]) for b in source.batches(4, limit=12)) == 12
    idx = torch.tensor([20, 0, 11, 10, 12, 3])  # across file boundaries, any order
    got = source.get(idx)
    assert torch.equal(got["x"], x[idx]) and torch.equal(got["y"], y[idx])

    single = tmp_path / "single" / "affnist"
    single.mkdir(parents=True)
    affnist.write_mat(single / "test.mat", images, labels)
    source = data_mod.build_eval("affnist", "test", cfg40(), CPU, str(tmp_path / "single"))
    x2, y2 = all_images(source)
    assert torch.equal(x2, x) and torch.equal(y2, y)

    # float pixels (0-255) from another generator are kept, not truncated to integers
    soft = images[:5].astype(np.float64) * 0.5 + 0.25
    scipy.io.savemat(single / "test.mat", {"affNISTdata": {
        "image": soft.reshape(5, 1600).T, "label_int": labels[None, :5].astype(float)}})
    source = data_mod.build_eval("affnist", "test", cfg40(), CPU, str(tmp_path / "single"))
    x3, y3 = all_images(source, batch_size=2)
    assert torch.allclose(x3[:, 0].double(), torch.from_numpy(soft) / 255, atol=1e-6)
    assert torch.equal(y3, y[:5]) and torch.equal(source.get(torch.tensor([4, 1]))["x"], x3[[4, 1]])


def test_bad_files_are_one_line_errors(tmp_path):
    folder = tmp_path / "affnist" / "test_batches"
    _write_batches(folder, [5])
    good = (folder / "1.mat").read_bytes()

    def source_error(content: bytes | None = None, mat: dict | None = None) -> str:
        if mat is not None:
            scipy.io.savemat(folder / "1.mat", mat)
        else:
            (folder / "1.mat").write_bytes(content)
        source = data_mod.build_eval("affnist", "test", cfg40(), CPU, str(tmp_path))
        with pytest.raises(DataError) as e:
            len(source)
        return one_line(e)

    assert "not a readable MATLAB .mat file" in source_error(b"this is not a mat file" * 20)
    assert "1.mat" in source_error(good[: len(good) // 2])  # truncated
    msg = source_error(mat={"images": np.zeros((1600, 2), np.uint8)})
    assert "no 'affNISTdata' struct" in msg and "images" in msg
    msg = source_error(mat={"affNISTdata": {"image": np.zeros((2, 1600), np.uint8),
                                            "label_int": np.zeros((1, 2), np.uint8)}})
    assert "1600 x N" in msg
    msg = source_error(mat={"affNISTdata": {"image": np.zeros((1600, 2), np.uint8)}})
    assert "no 'label_int' field" in msg
    # a gap in the numbered batches
    (folder / "1.mat").write_bytes(good)
    shutil.copy(folder / "1.mat", folder / "3.mat")
    with pytest.raises(DataError) as e:
        data_mod.build_eval("affnist", "test", cfg40(), CPU, str(tmp_path))
    assert "2.mat is missing" in one_line(e)


def test_missing_files_name_the_file_and_where_to_get_it(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    with pytest.raises(data_mod.MissingDataError) as e:
        data_mod.build_eval("affnist", "test", cfg40(), CPU, str(tmp_path))
    msg = one_line(e)
    assert str(tmp_path / "affnist" / "test_batches" / "1.mat") in msg
    assert "test.mat" in msg and affnist.BASE_URL + "test_batches.zip" in msg
    with pytest.raises(data_mod.MissingDataError) as e:
        data_mod.build_eval("affnist-synth", "test", cfg40(), CPU, str(tmp_path))
    assert "capsctl data affnist-synth" in one_line(e)


def test_download_fetches_and_unpacks_the_zip(tmp_path, monkeypatch):
    """data.download=true: the official zip is fetched (here: a local stand-in) and unpacked."""
    staged = tmp_path / "staged"
    images, labels = _write_batches(staged / "test_batches", [4, 2])
    zip_path = tmp_path / "test_batches.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted((staged / "test_batches").iterdir()):
            zf.write(p, f"test_batches/{p.name}")
    urls = []

    def fake_retrieve(url, target):
        urls.append(url)
        shutil.copy(zip_path, target)

    monkeypatch.setattr(urllib.request, "urlretrieve", fake_retrieve)
    cfg = cfg40()
    cfg.data.download = True
    source = data_mod.build_eval("affnist", "test", cfg, CPU, str(tmp_path / "root"))
    assert urls == [affnist.BASE_URL + "test_batches.zip"]
    x, y = all_images(source)
    assert np.array_equal(y.numpy(), labels) and len(source) == 6
    assert (tmp_path / "root" / "affnist" / "test_batches" / "2.mat").is_file()


# --- the synthetic set ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_digits(mnist_root):
    digits, labels = mnist.load_split(mnist_root, "test")
    return digits[:60].copy(), labels[:60].copy()


def test_synth_is_deterministic_per_seed_and_round(real_digits):
    digits, _ = real_digits
    r = affnist.SynthRanges()
    a, pa = affnist.generate_round(digits, r, seed=3, k=0)
    b, pb = affnist.generate_round(digits, r, seed=3, k=0)
    assert np.array_equal(a, b) and np.array_equal(pa, pb)
    assert not np.array_equal(affnist.generate_round(digits, r, seed=3, k=1)[0], a)
    assert not np.array_equal(affnist.generate_round(digits, r, seed=4, k=0)[0], a)


@pytest.mark.parametrize("ranges", [affnist.SynthRanges(),
                                    affnist.SynthRanges(5.0, 0.05, 0.9, 1.0)])
def test_synth_files_keep_labels_frame_ranges_and_the_stored_transform(tmp_path, real_digits,
                                                                       ranges):
    digits, labels = real_digits
    affnist.write_synth(tmp_path, digits, labels, per_digit=2, seed=1, ranges=ranges)
    files = sorted((tmp_path / "test_batches").iterdir())
    assert [p.name for p in files] == ["1.mat", "2.mat"]
    assert affnist.is_synthetic(files[0])
    for path in files:
        images, got_labels = affnist.read_mat(path)
        fields = affnist.load_struct(path)
        assert np.array_equal(got_labels, labels)
        assert np.array_equal(fields["source_index"].ravel(), np.arange(len(labels)))
        params = fields["transform_params"].T  # rotation, shear, scale_x, scale_y, centre x, y
        assert np.all(np.abs(params[:, 0]) <= ranges.rotation)
        assert np.all(np.abs(params[:, 1]) <= ranges.shear)
        assert np.all((params[:, 2:4] >= ranges.scale_min) & (params[:, 2:4] <= ranges.scale_max))
        assert params[:, 0].std() > ranges.rotation / 4  # drawn, not constant
        # the stored matrix is the one the parameters describe
        m = fields["affine_transforms"].T.reshape(-1, 2, 3)
        assert np.allclose(m, affnist.forward_matrix(torch.from_numpy(params)).numpy())
        for i in range(len(labels)):
            # every ink pixel of the source digit lands inside the 40x40 frame
            ys, xs = np.nonzero(digits[i])
            q = m[i] @ np.stack([xs, ys, np.ones_like(xs)]).astype(float)
            assert q.min() >= 0 and q.max() <= 39
            # warping the source by the stored transform, independently, gives the stored image
            inv = np.linalg.inv(m[i][:, :2])
            t = m[i][:, 2]
            swap = np.array([[0, 1], [1, 0]])
            warped = scipy.ndimage.affine_transform(
                digits[i].astype(float), swap @ inv @ swap, offset=swap @ (-inv @ t),
                output_shape=(40, 40), order=1, mode="grid-constant", cval=0.0)
            assert np.abs(warped - images[i]).max() <= 1.0
            # nothing is cut off: the ink is conserved up to the area change
            det = np.linalg.det(m[i][:, :2])
            assert images[i].sum() == pytest.approx(digits[i].sum().astype(float) * det, rel=0.03)


def test_synth_cli_eval_source_and_labels(tmp_path):
    root = write_fake_mnist(tmp_path / "root", n_train=64, n_test=24)
    r = runner.invoke(app, ["data", "affnist-synth", "--data-root", str(root), "--per-digit", "2",
                            "--rotation", "10"])
    assert r.exit_code == 0, r.output
    source = data_mod.build_eval("affnist-synth", "test", cfg40(), CPU, str(root))
    assert source.name == "affnist-synth" and len(source) == 48
    params = affnist.load_struct(root / "affnist-synth" / "test_batches" / "1.mat")
    assert np.abs(params["transform_params"][0]).max() <= 10
    # again: refused without --force, moved aside (never deleted) with it
    r = runner.invoke(app, ["data", "affnist-synth", "--data-root", str(root), "--per-digit", "1"])
    assert r.exit_code == 2 and "--force" in r.output
    r = runner.invoke(app, ["data", "affnist-synth", "--data-root", str(root), "--per-digit", "1",
                            "--force"])
    assert r.exit_code == 0, r.output
    assert len(data_mod.build_eval("affnist-synth", "test", cfg40(), CPU, str(root))) == 24
    assert list((root / "affnist-synth").glob("test_batches.replaced-*"))
    # bad ranges: one line, exit 2
    r = runner.invoke(app, ["data", "affnist-synth", "--data-root", str(root), "--out",
                            str(tmp_path / "x"), "--scale-min", "1.3", "--scale-max", "1.1"])
    assert r.exit_code == 2 and "--scale-min" in r.output
    # synthetic files put where the official ones belong are refused, never reported as affNIST
    shutil.copytree(root / "affnist-synth", root / "affnist")
    with pytest.raises(DataError) as e:
        data_mod.build_eval("affnist", "test", cfg40(), CPU, str(root))
    assert "affnist-synth" in one_line(e)


# --- expanded MNIST and image sizes -------------------------------------------------------------

@pytest.fixture
def square_mnist(tmp_path):
    """MNIST-shaped files whose every 'digit' is a full 28x28 white square: easy to locate."""
    root = tmp_path / "squares"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 160), ("t10k", 40)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", np.full((n, 28, 28), 255, np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n).astype(np.uint8))
    return root


def _offsets(x_B1HW):
    """(B, 2) row/col of the top-left corner of the 28x28 square on each 40x40 canvas."""
    on = x_B1HW[:, 0] > 0.5
    assert x_B1HW.shape[-2:] == (40, 40)
    assert torch.all(on.sum((1, 2)) == 28 * 28)  # the whole digit, never cropped
    rows = on.any(2).float().argmax(1)
    cols = on.any(1).float().argmax(1)
    return torch.stack([rows, cols], 1)


def test_expanded_mnist_placement_bounds(square_mnist):
    cfg = cfg40()
    bundle = data_mod.build(cfg, CPU, str(square_mnist))
    assert bundle.input_size == 40 and bundle.task == SINGLE
    stream = bundle.train
    spe = stream.steps_per_epoch
    per_epoch = []
    for epoch in range(2):
        offs, idx = [], []
        for k in range(spe):
            offs.append(_offsets(stream.batch(epoch, k, epoch * spe + k)["x"]))
            idx.append(stream.permutation(epoch)[k * 16:(k + 1) * 16])
        order = torch.cat(idx).argsort()
        per_epoch.append(torch.cat(offs)[order])  # by image index
    offs = torch.cat(per_epoch)
    assert offs.min() == 0 and offs.max() == 12  # anywhere it fits, and never beyond
    assert len(torch.unique(offs[:, 0])) == 13 and len(torch.unique(offs[:, 1])) == 13
    changed = (per_epoch[0] != per_epoch[1]).any(1).float().mean()
    assert changed > 0.9  # drawn afresh each time an image is used

    for split in ("val", "test"):  # fixed placement, the same for every build and batch size
        a = _offsets(all_images(data_mod.build_eval("expanded-mnist", split, cfg, CPU,
                                                    str(square_mnist)), 5)[0])
        cfg2 = from_dict(to_dict(cfg))
        cfg2.train.seed = 99
        b = _offsets(all_images(data_mod.build_eval("expanded-mnist", split, cfg2, CPU,
                                                    str(square_mnist)), 11)[0])
        assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 12
        assert len(torch.unique(a[:, 0])) > 3


def test_image_size_mismatch_is_one_line(tmp_path, fake_mnist):
    with pytest.raises(DataError) as e:
        data_mod.build_eval("affnist", "test", tiny_config(), CPU, str(tmp_path))
    msg = one_line(e)
    assert "affnist makes 40x40 images but model.input_size is 28" in msg
    assert "this model can be evaluated on mnist" in msg and "affnist-synth" not in msg
    with pytest.raises(DataError) as e:
        data_mod.build_eval("mnist", "test", cfg40(), CPU, str(fake_mnist))
    msg = one_line(e)
    assert "mnist makes 28x28 images but model.input_size is 40" in msg
    fits = msg.split("this model can be evaluated on ", 1)[1].split(", ")
    assert {"expanded-mnist", "affnist", "affnist-synth"} <= set(fits) and "mnist" not in fits
    with pytest.raises(DataError) as e:
        data_mod.build_eval("nope", "test", cfg40(), CPU, str(fake_mnist))
    assert "unknown dataset 'nope'" in one_line(e) and "affnist-synth" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"name": "expanded-mnist"}, "model": {"input_size": 28}})
    assert "dataset expanded-mnist makes 40x40 images but model.input_size is 28" in one_line(e)
    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"name": "expanded-mnist", "shift": 7},
                   "model": {"input_size": 40}})
    assert "'data.shift' must be <= 6" in one_line(e)
    assert from_dict({"data": {"name": "expanded-mnist"}}).model.input_size == 40  # followed


# --- trainer: early stopping and final evaluation ----------------------------------------------

def test_early_stop_and_final_eval(tmp_path):
    root = write_fake_mnist(tmp_path / "root", n_train=160, n_test=24)
    affnist.write_synth(root / "affnist-synth", *mnist.load_split(root, "test"), per_digit=1,
                        seed=0, ranges=affnist.SynthRanges())
    cfg = tiny_cnn40()
    cfg.train.epochs, cfg.train.target_val_accuracy = 3, 0.01
    cfg.train.final_eval = ["affnist-synth", "affnist"]
    text = io.StringIO()
    summary = train(cfg, tmp_path / "run", CPU, data_root=str(root),
                    console=Console(file=text, width=200), show_progress=False)
    assert summary["epochs"] == 1 and summary["steps"] == (160 - 32) // 16  # stopped early
    assert summary["best_val_accuracy"] >= 0.01
    out = text.getvalue()
    assert "early stop" in out and "final eval on affnist skipped" in out
    assert list(summary["final_eval"]) == ["affnist-synth"]
    logged = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        logged.update(json.loads(line))
    assert logged["test/affnist-synth/accuracy"] == summary["final_eval"]["affnist-synth"]
    assert not any(k.startswith("test/affnist/") for k in logged)

    cfg.train.final_eval = ["mnist"]  # 28x28 data for a 40x40 model: refused before training
    with pytest.raises(CapsctlError):
        train(cfg, tmp_path / "run2", CPU, data_root=str(root), console=Console(file=text),
              show_progress=False)


# --- CapsNet vs CNN in one table ----------------------------------------------------------------

def test_eval_two_checkpoints_into_one_table(tmp_path):
    root = write_fake_mnist(tmp_path / "root", n_train=64, n_test=24)
    digits, labels = mnist.load_split(root, "test")
    affnist.write_synth(root / "affnist-synth", digits, labels, per_digit=2, seed=0,
                        ranges=affnist.SynthRanges())
    paths = []
    for name, cfg in (("capsnet", cfg40()), ("cnn", tiny_cnn40())):
        torch.manual_seed(1)
        model = build_model(cfg.model)
        paths.append(tmp_path / f"{name}.pt")
        checkpoint.save(paths[-1], {"model": model.state_dict(), "config": to_dict(cfg),
                                    "step": 0})
    args = ["eval", *map(str, paths), "--dataset", "expanded-mnist", "--dataset",
            "affnist-synth", "--data-root", str(root)]
    r = runner.invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)["results"]
    assert [(x["model"], x["dataset"]) for x in results] == [
        ("capsnet", "expanded-mnist"), ("capsnet", "affnist-synth"),
        ("cnn", "expanded-mnist"), ("cnn", "affnist-synth")]

    # independent: the .mat files read with scipy alone, each model run once on all of them
    mats = [scipy.io.loadmat(root / "affnist-synth" / "test_batches" / f"{k}.mat")["affNISTdata"]
            for k in (1, 2)]
    x = np.concatenate([m["image"][0, 0].T.reshape(-1, 40, 40) for m in mats])
    y = np.concatenate([m["label_int"][0, 0].ravel() for m in mats]).astype(np.int64)
    for path, res in zip(paths, results[1::2]):
        state = torch.load(path, weights_only=True)
        model = build_model(from_dict(state["config"]).model)
        model.load_state_dict(state["model"])
        with torch.no_grad():
            scores = model.eval()(torch.from_numpy(x).float().div(255).unsqueeze(1))["scores"]
        acc = (scores.argmax(1).numpy() == y).mean()
        assert res["n"] == 48 and res["accuracy"] == pytest.approx(acc, abs=1e-12)

    r = runner.invoke(app, args, env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    table = r.stdout
    assert "expanded-mnist accuracy" in table and "affnist-synth accuracy" in table
    assert str(paths[0]) in table and str(paths[1]) in table
