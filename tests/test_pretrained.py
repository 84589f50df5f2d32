"""Pretrained models (capsctl.pretrained, pretrained/NAME/): every committed model reproduces its
card's accuracy exactly (MNIST ones on the real test set, the others on their recorded slice),
and so does a tiny model exported here from a fresh run, so that the check always runs; the
storage (packing, the size limit), the commands that take a folder as a checkpoint, the listing
without torch, and refusals of bad folders as one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from capsctl import checkpoint, packing, pretrained
from capsctl.cli import app
from capsctl.errors import CapsctlError, CheckpointError
from conftest import REPO, tiny_config, write_fake_mnist

runner = CliRunner()
CPU = torch.device("cpu")
COMMITTED = sorted(p.name for p in (REPO / "pretrained").glob("*")
                   if (p / pretrained.CARD_FILE).is_file())
FRESH = "fresh-tiny"   # a tiny model exported by this module: the check never runs on nothing


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(fake MNIST root, best.pt of a one-epoch tiny CapsNet run on it)."""
    from capsctl.training.loop import train

    base = tmp_path_factory.mktemp("pretrained")
    root = write_fake_mnist(base / "mnist")
    train(tiny_config(train={"epochs": 1}), base / "run", CPU, data_root=str(root),
          show_progress=False)
    return root, base / "run" / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """(fake MNIST root, pretrained/fresh-tiny folder, its card): int8 decoder, 64-example
    slice."""
    root, best = tiny_run
    models = tmp_path_factory.mktemp("models")
    card = pretrained.export(best, FRESH, models, decoder="int8", command="capsctl train tiny",
                             slice_n=40, device_name="cpu", data_root=str(root))
    return root, models / FRESH, card


@pytest.mark.parametrize("name", COMMITTED + [FRESH])
def test_each_pretrained_model_evaluates_to_its_card_exactly(name, request):
    """The committed models (none until they are added) and a fresh one: the slice always, the
    whole real test set for MNIST models (a fresh model: its own fake test set)."""
    if name == FRESH:
        root, folder, _ = request.getfixturevalue("exported")
    else:
        folder, root = REPO / "pretrained" / name, None
    card = pretrained.read_card(folder)
    full = card["data"] == "mnist"
    if full and root is None:
        root = request.getfixturevalue("mnist_root")   # a failure when absent, never a skip
    assert (folder / pretrained.MODEL_FILE).stat().st_size <= pretrained.MAX_BYTES
    assert (folder / pretrained.SLICE_FILE).stat().st_size <= 200_000
    checked = pretrained.verify(folder, full, "cpu", str(root) if root else None)
    assert [w for w, _, _ in checked][:1] == ["slice correct"]
    assert len(checked) == (2 if full else 1)
    for what, recorded, now in checked:
        assert recorded == now, f"{name} {what}: card {recorded}, now {now}"


def test_eval_of_the_folder_prints_the_cards_accuracy(exported):
    root, folder, card = exported
    r = runner.invoke(app, ["eval", str(folder), "--json", "--device", "cpu", "--data-root",
                            str(root)])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert (result["correct"], result["n"]) == (card["test"]["correct"], card["test"]["n"])
    assert result["accuracy"] == card["test"]["accuracy"]
    # the classifier is stored in fp32: exactly the run's own model
    assert card["source"]["test_correct"] == card["test"]["correct"]


def test_the_card_says_what_was_stored_and_how(exported):
    _, folder, card = exported
    assert card["storage"]["decoder"] == "int8" and card["storage"]["classifier"] == "fp32"
    assert card["storage"]["bytes"] == (folder / "model.pt").stat().st_size
    assert card["model"] == "capsnet" and card["data"] == "mnist" and card["epochs"] == 1
    assert card["command"] == "capsctl train tiny" and card["config"]["model"]["name"] == "capsnet"
    assert card["slice"]["n"] == 40 and 0 <= card["slice"]["correct"] <= 40
    rec = card["reconstruction"]
    assert 0 < rec["mean_abs_change"] < 0.05      # int8 moves the pixels, but little


def test_the_stored_model_loads_safely_as_fp32(exported):
    _, folder, _ = exported
    raw = torch.load(folder / "model.pt", weights_only=True)
    assert set(raw["packed"]) == {"decoder.net.0.weight", "decoder.net.2.weight",
                                  "decoder.net.4.weight"}
    assert all(e["q"].dtype == torch.int8 for e in raw["packed"].values())
    assert "optimizer" not in raw and "rng" not in raw
    state = checkpoint.load(folder)
    assert "packed" not in state
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    model, cfg, _ = checkpoint.load_model(folder, CPU)
    assert cfg.model.name == "capsnet" and not model.training


def test_predict_reconstruct_and_perturb_take_the_folder(exported, tmp_path):
    root, folder, _ = exported
    x, y = pretrained.read_slice(folder)
    png = tmp_path / "digit.png"
    Image.fromarray(x[0, 0]).save(png)
    r = runner.invoke(app, ["predict", str(folder), str(png), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout.splitlines()[0])
    assert row["class"] in [str(k) for k in range(10)]
    for command in ("reconstruct", "perturb"):
        out = tmp_path / f"{command}.png"
        r = runner.invoke(app, [command, str(folder), "--out", str(out), "--no-tb", "--device",
                                "cpu", "--data-root", str(root)])
        assert r.exit_code == 0, r.output
        assert Image.open(out).width > 50


def test_example_writes_a_real_test_image_of_the_slice(exported, tmp_path):
    _, folder, _ = exported
    x, y = pretrained.read_slice(folder)
    png = tmp_path / "sub" / "example.png"
    r = runner.invoke(app, ["pretrained", "example", str(folder), "--index", "5", "--out",
                            str(png)])
    assert r.exit_code == 0, r.output
    assert f"label {int(y[5])}" in r.output
    assert np.array_equal(np.asarray(Image.open(png)), x[5, 0])
    assert "0..39" in _one_line_exit_2(["pretrained", "example", str(folder), "--index", "40",
                                        "--out", str(png)])


def test_int8_and_int4_round_trips_stay_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    for shape in [(7, 33), (5, 3, 3, 3), (1, 1), (3, 0)]:
        w = torch.randn(shape, generator=g)
        for bits, top in ((8, 127), (4, 7)):
            e = packing._quantize(w, bits)
            back = packing._dequantize("w", e, "test")
            assert back.shape == w.shape and back.dtype == torch.float32
            if w.numel():
                step = w.abs().max() / top
                assert (back - w).abs().max() <= step / 2 + 1e-6
    zero = packing._dequantize("z", packing._quantize(torch.zeros(4, 40), 4), "test")
    assert torch.equal(zero, torch.zeros(4, 40))


def test_auto_storage_keeps_the_most_precise_that_fits(tiny_run):
    _, best = tiny_run
    state = checkpoint.load(best)
    _, raw32, kind = pretrained.choose_storage(state, "fp32", "auto", 10 ** 7)
    assert kind == "fp32"
    sizes = {k: len(pretrained.serialized(pretrained.model_state(state, "fp32", k)))
             for k in ("bf16", "int8", "int4")}
    assert len(raw32) > sizes["bf16"] > sizes["int8"] > sizes["int4"]
    _, raw, kind = pretrained.choose_storage(state, "fp32", "auto", sizes["int8"])
    assert kind == "int8" and len(raw) == sizes["int8"]
    with pytest.raises(CapsctlError, match="does not fit"):
        pretrained.choose_storage(state, "fp32", "auto", sizes["int4"] - 1)


def test_the_listing_shows_each_model_without_torch(exported):
    _, folder, card = exported
    script = ("import json, sys\nfrom typer.testing import CliRunner\nfrom capsctl.cli import app\n"
              f"r = CliRunner().invoke(app, ['pretrained', '--root', {str(folder.parent)!r}, "
              "'--json'])\n"
              "print(json.dumps({'exit': r.exit_code, 'torch': 'torch' in sys.modules, "
              "'out': r.stdout}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    result = json.loads(done.stdout)
    assert result["exit"] == 0 and not result["torch"], done.stderr
    row = json.loads(result["out"])["models"][0]
    assert row["name"] == FRESH and row["test_error"] == card["test"]["error"]
    assert row["bytes"] == card["storage"]["bytes"] and row["command"] == "capsctl train tiny"
    r = runner.invoke(app, ["pretrained", "--root", str(folder.parent)])
    assert r.exit_code == 0 and FRESH in r.output and "int8" in r.output
    assert "1 of 1" in r.output          # epochs at the checkpoint, of the run's


def test_check_compares_with_the_card(exported, tmp_path):
    root, folder, card = exported
    r = runner.invoke(app, ["pretrained", "check", str(folder), "--full", "--device", "cpu",
                            "--data-root", str(root)])
    assert r.exit_code == 0, r.output
    assert r.output.count("same") == 2
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    bent = json.loads((copy / "card.json").read_text())
    bent["slice"]["correct"] += 1 if bent["slice"]["correct"] < 40 else -1
    (copy / "card.json").write_text(json.dumps(bent))
    r = runner.invoke(app, ["pretrained", "check", str(copy), "--device", "cpu"])
    assert r.exit_code == 1 and "DIFFERENT" in r.output


def _one_line_exit_2(args):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


def test_bad_folders_are_one_line(exported, tmp_path):
    _, folder, _ = exported
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "model.pt" in _one_line_exit_2(["eval", str(empty), "--device", "cpu"])
    assert "no card.json" in _one_line_exit_2(["pretrained", "check", str(empty)])
    bent = tmp_path / "bent"
    shutil.copytree(folder, bent)
    state = torch.load(bent / "model.pt", weights_only=True)
    state["packed"]["decoder.net.0.weight"]["shape"] = [16, 61]
    torch.save(state, bent / "model.pt")
    assert "malformed" in _one_line_exit_2(["predict", str(bent), str(bent / "slice.npz")])
    with pytest.raises(CheckpointError, match="malformed"):
        checkpoint.load(bent)


def test_export_refuses_bad_requests_with_one_line(tiny_run, exported, tmp_path):
    _, best = tiny_run
    _, folder, _ = exported
    assert "--name" in _one_line_exit_2(["pretrained", "export", str(best), "--name", "../x"])
    assert "--decoder" in _one_line_exit_2(["pretrained", "export", str(best), "--name", "x",
                                            "--decoder", "int3"])
    assert "not empty" in _one_line_exit_2(["pretrained", "export", str(best), "--name",
                                            folder.name, "--root", str(folder.parent)])
    assert "does not fit" in _one_line_exit_2(["pretrained", "export", str(best), "--name", "x",
                                               "--root", str(tmp_path), "--max-mb", "0.001"])
    assert not (tmp_path / "x").exists()


def test_the_slice_file_refuses_pickles(tmp_path):
    np.save(tmp_path / "slice.npz", np.array([object()], dtype=object), allow_pickle=True)
    (tmp_path / "slice.npz.npy").rename(tmp_path / "slice.npz")
    with pytest.raises(CapsctlError, match="not a readable test slice"):
        pretrained.read_slice(tmp_path)
