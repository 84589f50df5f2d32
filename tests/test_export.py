"""`capsctl export`: every family's model leaves capsctl as an ONNX or TorchScript file that its
own runtime runs to the model's scores (checked before the file is kept); a file that fails the
check is never left; `capsctl predict` takes the .onnx file and predicts what the checkpoint
predicts; docs/export.md's plain-Python example runs. Tiny widths, a small MNIST-shaped set."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capsctl import export as export_mod
from capsctl.config import to_dict
from capsctl.data import mnist
from capsctl.models import build_model
from conftest import REPO, tiny_config, write_fake_mnist, cli, one_line_error

SMALL_DECODER = {"decoder_hidden": [8, 16]}
FAMILIES = {
    "dynamic": {},
    "leaky": {"routing": {"name": "dynamic", "leaky": True, "iterations": 2}},
    "uniform": {"routing": {"name": "uniform"}},
    "self-attention": {"routing": {"name": "self-attention"}},
    "inverted-dot-product": {"routing": {"name": "inverted-dot-product", "iterations": 2}},
    "efficient-capsnet": {"name": "efficient-capsnet", "conv_channels": [4, 4, 4, 16],
                          **SMALL_DECODER},
    "em-capsnet": {"name": "em-capsnet", "conv1_channels": 4, "primary_types": 2,
                   "caps1_types": 2, "caps2_types": 2, "iterations": 2, **SMALL_DECODER},
    "cnn": {"name": "cnn", "channels": [4, 4], "hidden": [8]},
}


def save_checkpoint(path: Path, model_keys: dict, seed: int = 0) -> Path:
    """An untrained model of ``model_keys`` as a capsctl checkpoint (format 2)."""
    cfg = tiny_config(model=model_keys)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():  # away from zero: capsule lengths that differ from class to class
        for p in model.parameters():
            p.mul_(3.0)
    torch.save({"format_version": 2, "model": model.state_dict(), "config": to_dict(cfg),
                "class_names": [f"c{k}" for k in range(10)]}, path)
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("export") / "mnist", n_train=48, n_test=24)


@pytest.fixture(scope="module")
def capsnet(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "capsnet.pt", {})


@pytest.fixture(scope="module")
def capsnet_onnx(tmp_path_factory, capsnet, data_root) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_mod.export(capsnet, out, with_decoder=True, check=0, data_root=str(data_root))
    return out


def eager(path: Path, x: np.ndarray) -> dict:
    from capsctl.checkpoint import load_model

    model, _, _ = load_model(path, torch.device("cpu"))
    return export_mod.reference(model, x, model.has_decoder)


# --- each family round trip -----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", export_mod.FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_round_trips(tmp_path, data_root, family, fmt):
    ckpt = save_checkpoint(tmp_path / "m.pt", FAMILIES[family])
    out = tmp_path / ("m.onnx" if fmt == "onnx" else "m.ts")
    decoder = family != "cnn"
    r = export_mod.export(ckpt, out, fmt, with_decoder=decoder, check=0,
                          data_root=str(data_root))
    assert r["check"]["passed"] and r["check"]["images"] == 24
    assert r["check"]["max_abs_diff"]["scores"] <= export_mod.TOLERANCE["fp32"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.pt", out.name])
    # the file on its own, at a batch it was not traced or checked at, against the model
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1)).numpy()
    if fmt == "onnx":
        session, meta = export_mod.onnx_session(out)
        got = export_mod.run_onnx(session, x, None)
    else:
        module, meta = export_mod.read_torchscript(out)
        got = export_mod.run_torchscript(module, meta["outputs"], x, None)
    want = eager(ckpt, x)
    assert meta["outputs"] == ["scores"] + (["capsules", "recon"] if decoder else [])
    assert meta["classes"] == [f"c{k}" for k in range(10)] and meta["check"]["passed"]
    assert meta["input"]["crop"] == 28 and meta["input"]["normalisation"] == "unit"
    for name, value in want.items():
        assert got[name].shape == value.shape
        assert np.abs(got[name] - value).max() <= 1e-4 * max(1.0, np.abs(value).max()), name
    assert (got["scores"].argmax(1) == want["scores"].argmax(1)).all()


def test_the_onnx_graph_has_standard_operators_only(capsnet_onnx):
    import onnx

    proto = onnx.load(str(capsnet_onnx))
    domains = {n.domain for n in proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "Softmax", "Sqrt"} <= ops
    keys = {p.key for p in proto.metadata_props}
    assert {"capsctl", "classes", "input_size", "input_channels", "normalisation"} <= keys


def test_fixed_batch_and_reduced_precision(tmp_path, capsnet, data_root, capsnet_onnx):
    fixed = export_mod.export(capsnet, tmp_path / "b4.onnx", batch=4, check=10,
                              data_root=str(data_root))
    session, meta = export_mod.onnx_session(fixed["out"])
    assert meta["batch"] == 4 and session.get_inputs()[0].shape[0] == 4
    x = np.random.default_rng(0).random((10, 1, 28, 28), dtype=np.float32)
    got = export_mod.run_onnx(session, x, 4)["scores"]      # 3 chunks, the last padded
    assert np.abs(got - eager(capsnet, x)["scores"]).max() <= 1e-5
    half = export_mod.export(capsnet, tmp_path / "h.pt", "torchscript", precision="bf16",
                             check=10, data_root=str(data_root))
    full = export_mod.export(capsnet, tmp_path / "f.pt", "torchscript", check=10,
                             data_root=str(data_root))
    assert half["bytes"] < 0.7 * full["bytes"] and half["metadata"]["precision"] == "bf16"
    assert half["check"]["max_abs_diff"]["scores"] <= export_mod.TOLERANCE["bf16"]


def test_a_pretrained_folder_is_checked_on_its_slice_where_the_data_is_absent(tmp_path, capsnet,
                                                                             data_root):
    folder = tmp_path / "pretrained" / "tiny"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(capsnet.read_bytes())
    images, labels = mnist.load_split(data_root, "test")
    np.savez(folder / "slice.npz", x=images[:6, None].copy(), y=labels[:6].astype(np.int64))
    r = cli("export", folder, "--out", tmp_path / "tiny.pt", "--data-root", tmp_path / "none",
            "--json")
    assert r.exit_code == 0, r.output
    check = json.loads(r.stdout)["check"]
    assert check["on"] == f"6 images of {folder / 'slice.npz'}" and check["passed"]


# --- the check refuses a file that does not compute what the model does ---------------------------

def test_a_broken_export_is_refused_and_leaves_no_file(tmp_path, capsnet, data_root,
                                                        monkeypatch):
    real = export_mod.run_exported

    def off_by_a_bit(*args, **kwargs):
        got = real(*args, **kwargs)
        got["scores"] = got["scores"] + 1e-3
        return got

    monkeypatch.setattr(export_mod, "run_exported", off_by_a_bit)
    out = tmp_path / "broken.onnx"
    r = cli("export", capsnet, "--out", out, "--check", "8", "--data-root", data_root)
    line = one_line_error(r, "does not compute what the model does")
    assert "max |score difference| 0.001" in line
    assert list(tmp_path.iterdir()) == []     # neither the file nor its temporary


def test_a_swapped_prediction_is_refused(tmp_path, capsnet, data_root, monkeypatch):
    real = export_mod.run_exported

    def swapped(*args, **kwargs):
        got = real(*args, **kwargs)
        got["scores"] = got["scores"][:, ::-1].copy()
        return got

    monkeypatch.setattr(export_mod, "run_exported", swapped)
    r = cli("export", capsnet, "--out", tmp_path / "m.pt", "--check", "8", "--data-root",
            data_root)
    one_line_error(r, "prediction(s) differ")
    assert list(tmp_path.iterdir()) == []


def test_one_line_errors(tmp_path, capsnet, data_root):
    there = tmp_path / "there.onnx"
    there.write_text("mine")
    one_line_error(cli("export", capsnet, "--out", there, "--data-root", data_root),
                   "exists; pass --force")
    assert there.read_text() == "mine"
    cnn = save_checkpoint(tmp_path / "cnn.pt", FAMILIES["cnn"])
    one_line_error(cli("export", cnn, "--out", tmp_path / "c.onnx", "--with-decoder",
                       "--data-root", data_root), "has no decoder")
    one_line_error(cli("export", capsnet, "--out", tmp_path / "m.bin"), "--format")
    one_line_error(cli("export", capsnet, "--out", tmp_path / "m.onnx", "--precision", "int8"),
                   "--precision")
    one_line_error(cli("export", capsnet, "--out", tmp_path / "m.onnx", "--batch", "2",
                       "--dynamic-batch"), "exclude each other")
    one_line_error(cli("export", capsnet, "--out", tmp_path / "m.onnx", "--data-root",
                       tmp_path / "nowhere"), "no test images of mnist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn.pt", "there.onnx"]
    r = cli("export", capsnet, "--out", there, "--force", "--check", "4", "--data-root",
            data_root)
    assert r.exit_code == 0, r.output
    assert "predictions equal on 4/4" in r.stdout and there.stat().st_size > 1000


def test_missing_onnxruntime_is_one_line(tmp_path, capsnet, capsnet_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import onnxruntime fails
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    one_line_error(cli("export", capsnet, "--out", tmp_path / "m.onnx"), "capsctl[onnx]")
    one_line_error(cli("predict", capsnet_onnx, tmp_path), "capsctl[onnx]")


# --- predict with the .onnx file ------------------------------------------------------------------

def test_predict_on_the_onnx_file_equals_predict_on_the_checkpoint(tmp_path, capsnet,
                                                                   capsnet_onnx, data_root):
    images, _ = mnist.load_split(data_root, "test")
    for i in range(5):
        Image.fromarray(images[i]).save(tmp_path / f"{i}.png")
    Image.fromarray(images[5]).resize((40, 33)).convert("RGB").save(tmp_path / "big.jpg")
    rows = {}
    for model in (capsnet, capsnet_onnx):
        r = cli("predict", model, tmp_path, "--json", "--top-k", "3", "--batch-size", "2")
        assert r.exit_code == 0, r.output
        rows[model] = [json.loads(line) for line in r.stdout.splitlines()]
    a, b = rows[capsnet], rows[capsnet_onnx]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert (x["file"], x["class"], x["index"]) == (y["file"], y["class"], y["index"])
        assert [t["class"] for t in x["top_k"]] == [t["class"] for t in y["top_k"]]
        assert max(abs(x["scores"][k] - y["scores"][k]) for k in x["scores"]) <= 1e-5
    r = cli("predict", capsnet_onnx, tmp_path / "0.png", "--recon", tmp_path / "rec")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rec" / "0.recon.png").is_file()


def test_predict_refuses_a_foreign_onnx_file(tmp_path, capsnet, data_root):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["image"], ["scores"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "image", TensorProto.FLOAT, [1, 10])], [helper.make_tensor_value_info(
        "scores", TensorProto.FLOAT, [1, 10])])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    one_line_error(cli("predict", tmp_path / "other.onnx", png), "not a capsctl export")
    one_line_error(cli("predict", tmp_path / "junk.onnx", png), "not a readable ONNX model")


# --- docs/export.md ---------------------------------------------------------------------------------

def test_the_plain_python_example_of_the_docs_runs(tmp_path, capsnet, capsnet_onnx, data_root):
    page = (REPO / "docs" / "export.md").read_text()
    block = re.search(r"<!-- example:start -->\s*```python\n(.*?)```", page, re.S).group(1)
    assert len(block.strip().splitlines()) <= 10
    (tmp_path / "model.onnx").write_bytes(capsnet_onnx.read_bytes())
    images, _ = mnist.load_split(data_root, "test")
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    name, score = done.stdout.split()
    r = cli("predict", capsnet, tmp_path / "digit.png", "--json")
    row = json.loads(r.stdout)
    assert name == row["class"] and abs(float(score) - row["score"]) <= 1e-5


# --- bench --export ---------------------------------------------------------------------------------

def test_bench_export_times_every_path():
    from capsctl import export_bench

    r = cli("bench", "--export", "--runs", "3", "--large-batch", "4", "--json",
            "--set", "model.conv1_channels=8", "--set", "model.primary_types=2",
            "--set", "model.decoder=false")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    (model,) = result["models"].values()
    assert list(model["paths"]) == list(export_bench.PATHS) and result["load_average"]
    for name, row in model["paths"].items():
        if isinstance(row, str):
            assert name == "eager + C kernel" and row.startswith("n/a"), row
        else:
            assert row["runs"] == 3 and row["large_batch"] == 4
            assert 0 < row["median_ms"] <= row["p99_ms"] and row["images_per_s"] > 0
    table = export_bench_table(result)
    assert "ONNX Runtime" in table and "batch 1 p99 ms" in table
    one_line_error(cli("bench", "--export", "--runs", "0"), "--runs 0")


def export_bench_table(result: dict) -> str:
    from rich.console import Console

    from capsctl.cli.bench import latency_table

    console = Console(width=200, record=True, file=io.StringIO())
    console.print(latency_table(result))
    return console.export_text()
