"""The CLI as a user drives it: train -> eval, JSON output, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from capsctl.cli import app
from capsctl.data import mnist
from capsctl.data.augment import to_float
from capsctl.models import build_model
from capsctl.config import from_dict
from conftest import REPO

runner = CliRunner()
TINY = ["--set", "model.conv1_channels=8", "--set", "model.primary_types=2",
        "--set", "model.primary_dim=4", "--set", "model.class_dim=6",
        "--set", "model.decoder_hidden=[16,32]", "--set", "train.batch_size=16",
        "--set", "data.val_size=32", "--set", "train.log_every=2",
        "--set", "optim.lr=0.01", "--set", "model.transform_init_std=0.1"]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_train_then_eval_json_agrees_with_independent_computation(tmp_path, fake_mnist):
    r = cli("train", REPO / "configs/mnist-quick.yaml", "--run-dir", tmp_path, "--name", "t",
            "--data-root", fake_mnist, "--no-progress", "--set", "train.max_steps=20", *TINY)
    assert r.exit_code == 0, r.output
    best = tmp_path / "t" / "checkpoints" / "best.pt"
    assert best.is_file()
    r = cli("eval", best, "--data-root", fake_mnist, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)           # exactly one JSON object, nothing else on stdout
    assert {"dataset", "split", "n", "accuracy", "error"} <= set(result)
    assert result["dataset"] == "mnist" and result["split"] == "test" and result["n"] == 64

    # independent: raw torch.load, the model rebuilt from the stored config, one forward pass
    state = torch.load(best, weights_only=True)
    model = build_model(from_dict(state["config"]).model)
    model.load_state_dict(state["model"])
    model.eval()
    images, labels = mnist.load_split(fake_mnist, "test")
    with torch.no_grad():
        lengths = model(to_float(torch.from_numpy(images.copy())))["v"].norm(dim=-1)
    acc = (lengths.argmax(1) == torch.from_numpy(labels)).float().mean().item()
    assert abs(result["accuracy"] - acc) < 1e-9
    assert abs(result["error"] - (1 - acc)) < 1e-9

    # the run folder works as the checkpoint argument; val split; a table by default
    r = cli("eval", tmp_path / "t", "--data-root", fake_mnist, "--split", "val")
    assert r.exit_code == 0 and "mnist accuracy" in r.stdout


def test_resume_from_cli(tmp_path, fake_mnist):
    r = cli("train", REPO / "configs/mnist-quick.yaml", "--run-dir", tmp_path, "--name", "r",
            "--data-root", fake_mnist, "--no-progress", "--set", "train.max_steps=4", *TINY)
    assert r.exit_code == 0, r.output
    r = cli("train", "--resume", tmp_path / "r", "--data-root", fake_mnist, "--no-progress",
            "--set", "train.max_steps=8")
    assert r.exit_code == 0, r.output
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 8
    assert "max_steps: 8" in (tmp_path / "r" / "config.yaml").read_text()


def one_line_error(r, needle):
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1, r.output
    assert needle in lines[0], lines[0]
    assert "Traceback" not in r.output


def test_errors_are_one_line_exit_2(tmp_path, fake_mnist):
    one_line_error(cli("train", REPO / "configs/nope.yaml"), "config file not found")
    one_line_error(cli("train", REPO / "configs/mnist.yaml", "--set", "train.epoch=1"),
                   "did you mean 'train.epochs'")
    one_line_error(cli("train", REPO / "configs/mnist-quick.yaml", "--run-dir", tmp_path,
                       "--data-root", tmp_path / "empty", "--no-progress"),
                   "MNIST train files missing")
    one_line_error(cli("eval", tmp_path / "missing.pt"), "checkpoint not found")
    (tmp_path / "bad.pt").write_bytes(b"\x00" * 100)
    one_line_error(cli("eval", tmp_path / "bad.pt"), "not a readable checkpoint")
    one_line_error(cli("train", "--resume", tmp_path, "--force"), "conflict")
    if not torch.cuda.is_available():
        one_line_error(cli("train", REPO / "configs/mnist.yaml", "--device", "cuda"),
                       "CUDA is not available")


def test_version_and_config_reference():
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("capsctl ")
    r = cli("config", "--reference")
    assert "`train.batch_size`" in r.stdout and "`model.routing.iterations`" in r.stdout


def test_usage_errors_are_one_line_with_a_help_hint():
    for args, needle in [(["eval", "x.pt", "--limit", "abc"], "Invalid value for '--limit'"),
                         (["eval", "x.pt", "--nope"], "No such option: --nope"),
                         (["eval"], "Missing argument 'checkpoints'")]:
        r = cli(*args)
        one_line_error(r, needle)
        assert r.stderr.startswith("error: ") and "see 'capsctl eval --help'" in r.stderr
        assert "Usage:" not in r.output


def test_name_is_a_name_not_a_path(tmp_path, fake_mnist):
    for name in ("..", "../outside", "a/b", str(tmp_path / "abs"), "."):
        one_line_error(cli("train", REPO / "configs/mnist-quick.yaml", "--run-dir",
                           tmp_path / "runs", "--name", name, "--data-root", fake_mnist,
                           "--no-progress", *TINY), "a run name, not a path")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outside").exists()


def _strict(constant):
    raise AssertionError(f"invalid JSON constant {constant} on stdout")


def test_eval_json_writes_non_finite_numbers_as_null(monkeypatch):
    import capsctl.evaluate

    row = {"checkpoint": "x.pt", "dataset": "mnist", "split": "test", "n": 0,
           "accuracy": float("nan"), "error": float("inf"), "extra": [float("-inf"), 0.5]}
    monkeypatch.setattr(capsctl.evaluate, "evaluate_checkpoints", lambda *a, **k: [row])
    r = cli("eval", "x.pt", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout, parse_constant=_strict)
    assert result["accuracy"] is None and result["error"] is None
    assert result["extra"] == [None, 0.5] and result["n"] == 0


def test_bench_threads_sets_torch_threads():
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    try:
        r = cli("bench", "--set", "model.conv1_channels=8", "--set", "model.primary_types=2",
                "--set", "model.primary_dim=4", "--set", "model.class_dim=6",
                "--set", "model.decoder_hidden=[16,32]", "--device", "cpu", "--batch-size", "4",
                "--large-batch", "8", "--steps", "1", "--warmup", "0", "--threads", wanted,
                "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["threads"] == wanted
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv", [["--version"], ["eval", "--limit", "x", "y.pt"]])
def test_python_dash_m_capsctl_runs_the_cli(argv):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "capsctl", *argv], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    if argv == ["--version"]:
        assert r.returncode == 0 and r.stdout.startswith("capsctl ")
    else:
        assert r.returncode == 2 and r.stderr.count("\n") == 1
        assert r.stderr.startswith("error: ") and "see 'python -m capsctl eval --help'" in r.stderr
