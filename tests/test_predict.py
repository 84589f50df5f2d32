"""`capsctl predict`: your own files through exactly the test-time preprocessing of the dataset
the model was trained on. The central check: the test images exported as PNG files predict
exactly what `capsctl eval` scores for them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from capsctl import checkpoint
from capsctl.classes import class_names_of, numbered
from capsctl.cli import app
from capsctl.config import to_dict
from capsctl.data import mnist
from capsctl.data.build import build_eval
from capsctl.data.datasets import EvalSource, ImageSet
from capsctl.data.natural import CropSource
from capsctl.data.smallnorb import NorbEvalSource
from capsctl.errors import CheckpointError, DataError
from capsctl.models import build_model
from capsctl.predict import list_inputs, model_input, predict, read_input, preprocessing_of
from conftest import REPO, tiny_config, write_fake_mnist, cli, one_line_error

CPU = torch.device("cpu")
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CapsNet trained a few steps on synthetic MNIST: (best.pt, data root, test
    images exported as PNG files 000.png ..., their labels)."""
    from capsctl.training import train

    base = tmp_path_factory.mktemp("predict")
    root = write_fake_mnist(base / "mnist")
    cfg = tiny_config(optim={"lr": 0.01}, model={"transform_init_std": 0.1},
                      train={"max_steps": 24, "epochs": 2})
    summary = train(cfg, base / "run", CPU, data_root=str(root), show_progress=False,
                    console=Console(file=io.StringIO()))
    images, labels = mnist.load_split(root, "test")
    pngs = base / "png"
    pngs.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(pngs / f"{i:03d}.png")
    return Path(summary["best_checkpoint"]), root, pngs, labels


# --- predict == eval ------------------------------------------------------------------------

def test_exported_test_images_predict_what_eval_scores(trained):
    best, root, pngs, labels = trained
    r = cli("predict", best, pngs, "--json", "--top-k", "2")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(row["file"]).name for row in rows] == [f"{i:03d}.png" for i in range(64)]
    pred = np.array([row["index"] for row in rows])
    assert len(set(pred.tolist())) > 3              # a model that tells classes apart

    r = cli("eval", best, "--data-root", root, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    confusion = np.zeros((10, 10), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    assert result["confusion"] == confusion.tolist()       # the same prediction for every image
    assert result["correct"] == int((pred == labels).sum()) and result["n"] == 64

    # the scores themselves: the evaluation source's batches through the same model
    model, cfg, state = checkpoint.load_model(best, CPU)
    source = build_eval("mnist", "test", cfg, CPU, str(root))
    with torch.no_grad():
        scores = torch.cat([model(b["x"])["scores"] for b in source.batches(64)])
    got = torch.tensor([[row["scores"][str(j)] for j in range(10)] for row in rows])
    assert torch.allclose(got, scores, rtol=0, atol=1e-6)
    assert torch.equal(torch.tensor(pred), scores.argmax(1))
    for row in rows:
        assert row["class"] == str(row["index"]) and len(row["top_k"]) == 2
        assert row["top_k"][0] == {"class": row["class"], "score": row["score"]}
        assert row["top_k"][0]["score"] >= row["top_k"][1]["score"]


def test_any_size_grey_or_colour_and_npy_arrays(trained, tmp_path):
    best, root, pngs, labels = trained
    digit = np.asarray(Image.open(pngs / "005.png"))
    Image.fromarray(digit).convert("RGB").save(tmp_path / "rgb.png")           # colour
    Image.fromarray(digit).save(tmp_path / "same.bmp")                          # BMP
    np.save(tmp_path / "u8.npy", digit)
    np.save(tmp_path / "float.npy", digit.astype(np.float32) / 255)
    np.save(tmp_path / "hwc.npy", np.repeat(digit[:, :, None], 3, axis=2))
    Image.fromarray(digit).resize((56, 56), Image.NEAREST).save(tmp_path / "big.png")
    result = predict(best, [pngs / "005.png", tmp_path], "cpu")
    rows = {Path(r["file"]).name: r for r in result["rows"]}
    want = rows["005.png"]["scores"]
    for name in ("rgb.png", "same.bmp", "u8.npy", "float.npy", "hwc.npy"):
        assert rows[name]["scores"] == pytest.approx(want, abs=1e-6), name
    assert rows["big.png"]["class"] in result["classes"]   # resized to 28x28, predicted
    view = preprocessing_of(checkpoint.load_model(best, CPU)[1])
    assert read_input(tmp_path / "big.png", view).shape == (1, 28, 28)


def test_a_bad_file_is_one_line_or_an_error_row(trained, tmp_path):
    best, _, pngs, _ = trained
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    line = one_line_error(cli("predict", best, pngs / "000.png", tmp_path / "broken.png"),
                          "broken.png")
    assert line.startswith("error: ") and "cannot read as an image" in line
    one_line_error(cli("predict", best, tmp_path / "nowhere.png"), "no such file or folder")
    (tmp_path / "empty").mkdir()
    one_line_error(cli("predict", best, tmp_path / "empty"), "a folder without images")

    r = cli("predict", best, pngs / "000.png", tmp_path / "broken.png", pngs / "001.png",
            "--json", "--keep-going")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [("error" in row) for row in rows] == [False, True, False]
    assert "broken.png" in rows[1]["error"] and rows[1]["file"].endswith("broken.png")
    assert "1 of 3 file(s) could not be read" in r.stderr


@pytest.mark.parametrize("array, needle", [
    (np.array([1.5, 2.0]).reshape(1, 2), "outside [0, 1]"),
    (np.full((4, 4), 300, np.int32), "outside 0-255"),
    (np.zeros((2, 3, 4, 5), np.uint8), "expected (H, W), (C, H, W) or (H, W, C)"),
    (np.zeros((8, 8), dtype=[("a", "u1")]), "not pixels"),
    (np.array([["a", "b"]]), "not pixels"),
])
def test_bad_arrays_are_refused(trained, tmp_path, array, needle):
    best = trained[0]
    np.save(tmp_path / "bad.npy", array)
    line = one_line_error(cli("predict", best, tmp_path / "bad.npy"), "bad.npy")
    assert needle in line


def test_hostile_arrays_are_refused_before_they_are_read(trained, tmp_path):
    best = trained[0]
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "Python objects" in one_line_error(cli("predict", best, tmp_path / "objects.npy"),
                                              "objects.npy")
    np.save(tmp_path / "cut.npy", np.zeros((64, 64), np.uint8))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:300])
    assert "truncated" in one_line_error(cli("predict", best, tmp_path / "cut.npy"), "cut.npy")
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1), np.uint8))
    header["shape"] = (1 << 20, 1 << 20)                    # 1 TB declared, nothing behind it
    with open(tmp_path / "huge.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    assert "at most" in one_line_error(cli("predict", best, tmp_path / "huge.npy"), "huge.npy")


def test_table_top_k_and_options(trained, tmp_path):
    best, _, pngs, _ = trained
    r = runner.invoke(app, ["predict", str(best), str(pngs / "003.png"), "--top-k", "3"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "003.png" in r.stdout and "|v|" in r.stdout and "top-k" in r.stdout
    one_line_error(cli("predict", best, pngs / "003.png", "--top-k", "0"), "--top-k 0")
    one_line_error(cli("predict", best, pngs / "003.png", "--batch-size", "-1"), "--batch-size")
    many = predict(best, [pngs / "003.png"], "cpu", top_k=99)["rows"][0]
    assert len(many["top_k"]) == 10 and len(many["scores"]) == 10


def test_recon_saves_a_picture_per_file(trained, tmp_path):
    best, _, pngs, _ = trained
    sub = tmp_path / "in" / "sub"
    sub.mkdir(parents=True)
    for name in ("000.png", "001.png"):
        (sub / name).write_bytes((pngs / name).read_bytes())
    (tmp_path / "in" / "000.png").write_bytes((pngs / "002.png").read_bytes())
    out = tmp_path / "recon"
    result = predict(best, [tmp_path / "in", pngs / "000.png"], "cpu", recon_dir=out)
    written = [Path(r["recon"]) for r in result["rows"]]
    assert written == [out / "000.recon.png", out / "sub" / "000.recon.png",
                       out / "sub" / "001.recon.png", out / "000-2.recon.png"]
    for path in written:
        with Image.open(path) as im:   # input beside its reconstruction, 4x upscaled 28 px
            assert im.size == (2 * 28 * 4 + 3, 28 * 4 + 2)


def test_recon_needs_a_decoder(tmp_path, trained):
    cfg = tiny_config(model={"name": "cnn"})
    path = tmp_path / "cnn.pt"
    checkpoint.save(path, {"model": build_model(cfg.model).state_dict(),
                           "config": to_dict(cfg), "step": 0})
    png = trained[2] / "000.png"
    one_line_error(cli("predict", path, png, "--recon", tmp_path / "r"),
                   "needs a model with a reconstruction decoder")
    r = cli("predict", path, png, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["class"] in numbered(10)


# --- the preprocessing is the evaluation sources' -----------------------------------------------

def test_model_input_is_what_the_evaluation_sources_give():
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(5)

    cfg = tiny_config(data={"name": "cifar10", "crop": 24, "pad": 0})
    view = preprocessing_of(cfg)
    assert (view.side, view.channels, view.crop, view.normalisation) == (32, 3, 24, "unit")
    u8 = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    source = CropSource(ImageSet(u8, torch.zeros(5, dtype=torch.long)), "test", 24)
    assert torch.equal(model_input(u8, view), source.get(idx)["x"])

    cfg = tiny_config(data={"name": "smallnorb"}, model={"in_channels": 2})
    view = preprocessing_of(cfg)
    assert (view.side, view.channels, view.crop, view.normalisation) == (
        48, 2, 32, "standardised")
    u8 = torch.randint(0, 256, (5, 2, 48, 48), generator=g, dtype=torch.uint8)
    source = NorbEvalSource(ImageSet(u8, torch.zeros(5, dtype=torch.long)), "test")
    assert torch.equal(model_input(u8, view), source.get(idx)["x"])

    for name, side in (("mnist", 28), ("fashion-mnist", 28), ("expanded-mnist", 40)):
        view = preprocessing_of(tiny_config(data={"name": name}))
        assert (view.side, view.crop, view.channels) == (side, side, 1)
    u8 = torch.randint(0, 256, (5, 28, 28), generator=g, dtype=torch.uint8)
    source = EvalSource(ImageSet(u8, torch.zeros(5, dtype=torch.long)), "test")
    assert torch.equal(model_input(u8[:, None], preprocessing_of(tiny_config())), source.get(idx)["x"])


def test_stereo_models_take_two_channel_arrays(tmp_path):
    cfg = tiny_config(data={"name": "smallnorb"}, model={"in_channels": 2})
    view = preprocessing_of(cfg)
    pair = np.random.default_rng(0).integers(0, 256, (2, 48, 48), dtype=np.uint8)
    np.save(tmp_path / "pair.npy", pair)
    assert np.array_equal(read_input(tmp_path / "pair.npy", view), pair)   # 48x48: as it is
    Image.fromarray(pair[0]).save(tmp_path / "one.png")
    with pytest.raises(DataError, match="2-channel input"):
        read_input(tmp_path / "one.png", view)


def test_folder_models_predict_their_own_test_files_as_eval_does(tmp_path, monkeypatch):
    """A folder-trained model: the original files (any size and mode, JPEG too) decode as the
    dataset decoded them, and the class names come from the checkpoint."""
    from test_folder_dataset import make_folder

    monkeypatch.setenv("CAPSCTL_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "pics", n_train=4, n_test=4)
    cfg = tiny_config(data={"name": "folder", "root": str(root), "image_size": 32, "crop": 24,
                            "val_size": 2})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    path = tmp_path / "folder.pt"
    checkpoint.save(path, {"model": model.state_dict(), "config": to_dict(cfg), "step": 0,
                           "class_names": ["cat", "dog", "emu"]})
    source = build_eval("folder", "test", cfg, CPU, str(root))
    with torch.no_grad():
        scores = model(source.get(torch.arange(len(source)))["x"])["scores"]
    result = predict(path, [root / "test"], "cpu")
    assert result["classes"] == ["cat", "dog", "emu"]
    files = [r["file"] for r in result["rows"]]
    assert files == sorted(files, key=lambda f: Path(f).relative_to(root / "test").parts)
    got = torch.tensor([[r["scores"][n] for n in ("cat", "dog", "emu")]
                        for r in result["rows"]])
    assert torch.allclose(got, scores, rtol=0, atol=1e-6)


# --- class names ------------------------------------------------------------------------------

def test_class_names_come_from_the_checkpoint_then_the_registry():
    fashion = tiny_config(data={"name": "fashion-mnist"})
    assert class_names_of(fashion)[0] == "T-shirt/top" and class_names_of(fashion)[9] == \
        "Ankle boot"
    assert class_names_of(tiny_config()) == numbered(10)
    assert class_names_of(tiny_config(), {"class_names": list("abcdefghij")})[2] == "c"
    for bad in (["a"] * 9, "abcdefghij", [1] * 10, [""] * 10, ["a"] * 10):
        with pytest.raises(CheckpointError, match="class_names"):
            class_names_of(tiny_config(), {"class_names": bad})


def test_list_inputs_walks_folders_sorted_and_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    for rel in ("b/2.PNG", "a.jpg", "z.npy", "notes.txt", ".x.png", ".hidden/h.png"):
        (tmp_path / rel).write_bytes(b"")
    found = [str(i.rel) for i in list_inputs([tmp_path])]
    assert found == ["a.jpg", "z.npy", "b/2.PNG"]
    assert [str(i.rel) for i in list_inputs([tmp_path / "notes.txt"])] == ["notes.txt"]


def test_predict_help_does_not_import_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom capsctl.cli import app\n"
            "r = CliRunner().invoke(app, ['predict', '--help'])\n"
            "assert r.exit_code == 0, r.output\nprint('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
