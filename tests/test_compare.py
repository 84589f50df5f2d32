"""``capsctl compare`` (the table of several run folders, --json, --png, --seeds) and ``capsctl sweep``
(the grid, the folder names, skipping finished points and resuming an interrupted one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from capsctl import checkpoint, compare, sweep
from capsctl.cli import compare as cli_compare, sweep as cli_sweep
from capsctl.config import dump
from capsctl.errors import CapsctlError
from conftest import REPO, tiny_config

CPU = torch.device("cpu")


def make_app() -> typer.Typer:
    """A root app with just the two commands (capsctl/cli/__init__.py registers them too)."""
    app = typer.Typer()
    cli_compare.register(app)
    cli_sweep.register(app)
    app.callback()(lambda: None)
    return app


def fake_run(folder: Path, cfg, rows: list[dict], torn: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("# resolved configuration\n" + dump(cfg))
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 9, "tra' if torn else ""))
    return folder


ROWS = [{"step": 10, "time": 100.0, "train/loss_total": 1.0, "images_per_s": 50.0},
        {"step": 20, "time": 110.0, "images_per_s": 40.0},
        {"step": 20, "time": 111.0, "val/accuracy": 0.90},
        {"step": 30, "time": 120.0, "images_per_s": 60.0},
        {"step": 30, "time": 121.0, "val/accuracy": 0.95},
        {"step": 30, "time": 125.0, "test/accuracy": 0.94, "test/error": 0.06},
        {"step": 30, "time": 130.0, "test/affnist-synth/accuracy": 0.70}]


def test_a_row_is_what_the_folder_holds(tmp_path):
    cfg = tiny_config(model={"routing": "self-attention"}, data={"name": "expanded-mnist"},
                      train={"batch_size": 16, "final_eval": ["affnist-synth"]})
    row = compare.read_run(fake_run(tmp_path / "a", cfg, ROWS, torn=True))
    assert (row.model, row.routing, row.dataset) == ("capsnet", "self-attention",
                                                     "expanded-mnist")
    with torch.device("meta"):
        from capsctl.models import build_model, count_parameters
        assert row.parameters == count_parameters(build_model(cfg.model))
    assert row.images_per_s == 50.0                           # the median of 50, 40, 60
    assert row.best_val_accuracy == 0.95
    assert row.test == {"expanded-mnist": 0.94, "affnist-synth": 0.70}
    assert row.steps == 30 and row.finished
    assert row.wall_s == pytest.approx(30.0 + 10 * 16 / 50.0)   # span + first interval


def test_an_unfinished_run_and_other_families(tmp_path):
    cnn = tiny_config(model={"name": "cnn", "channels": [4], "hidden": [8]})
    row = compare.read_run(fake_run(tmp_path / "c", cnn, ROWS[:3]))
    assert (row.model, row.routing, row.finished, row.test) == ("cnn", "none", False, {})
    eff = tiny_config(model={"name": "efficient-capsnet"})
    assert compare.read_run(fake_run(tmp_path / "e", eff, [])).routing == "self-attention"


def test_compare_cli_table_json_and_png(tmp_path):
    a = fake_run(tmp_path / "a", tiny_config(), ROWS)
    b = fake_run(tmp_path / "b", tiny_config(model={"routing": "uniform"}), ROWS[:5])
    runner = CliRunner()
    r = runner.invoke(make_app(), ["compare", str(a), str(b), "--json", "--png",
                                   str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout.strip().splitlines()[0])
    assert doc["datasets"] == ["mnist", "affnist-synth"]
    assert [x["routing"] for x in doc["runs"]] == ["dynamic", "uniform"]
    assert [x["finished"] for x in doc["runs"]] == [True, False]
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    r = runner.invoke(make_app(), ["compare", str(a), str(b)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "test mnist" in r.stdout and "unfinished" in r.stdout
    assert "94.00%" in r.stdout and "affnist-synth" in r.stdout


def test_a_table_into_a_pipe_is_not_cut_to_80_columns(tmp_path):
    """A sweep's log or ``compare ... > file``: no terminal to fit, so every cell is whole."""
    folders = [fake_run(tmp_path / f"routing={name}",
                        tiny_config(model={"routing": name}, data={"name": "expanded-mnist"},
                                    train={"final_eval": ["affnist-synth"]}), ROWS)
               for name in ("inverted-dot-product", "self-attention")]
    r = CliRunner().invoke(make_app(), ["compare", *map(str, folders)])
    assert r.exit_code == 0, r.output
    assert "…" not in r.stdout and max(map(len, r.stdout.splitlines())) > 80
    assert "routing=inverted-dot-product" in r.stdout and "test affnist-synth" in r.stdout


def _ablation_run(folder: Path, iterations: int, seed: int, test: float | None,
                  root: str = "/data") -> Path:
    cfg = tiny_config(model={"routing": {"name": "dynamic", "iterations": iterations}},
                      data={"root": root}, train={"seed": seed})
    rows = ROWS[:5] + ([{"step": 30, "time": 125.0, "test/accuracy": test}] if test else [])
    return fake_run(folder, cfg, rows)


def test_seeds_groups_runs_of_one_config_with_mean_and_range(tmp_path):
    runs = [_ablation_run(tmp_path / "r3-s0", 3, 0, 0.990),
            _ablation_run(tmp_path / "r1-s0", 1, 0, 0.994),
            _ablation_run(tmp_path / "r3-s1", 3, 1, 0.980, root="/elsewhere"),  # same data
            _ablation_run(tmp_path / "r3-s2", 3, 2, None)]                       # unfinished
    from capsctl import seeds
    groups = [g.summary() for g in seeds.group_by_seed(runs)]
    assert [g["label"] for g in groups] == ["iterations=3", "iterations=1"]
    three, one = groups
    assert three["seeds"] == [0, 1, 2] and three["finished"] == 2
    assert three["test_errors"] == pytest.approx([0.010, 0.020])
    assert three["test_error_mean"] == pytest.approx(0.015)
    assert (three["test_error_min"], three["test_error_max"]) == pytest.approx((0.010, 0.020))
    assert three["best_val_accuracy_mean"] == pytest.approx(0.95)
    assert one["test_error_mean"] == pytest.approx(0.006) and one["runs"] == [str(runs[1])]
    r = CliRunner().invoke(make_app(), ["compare", *map(str, runs), "--seeds"],
                           env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "1.50%" in r.stdout and "1.00% - 2.00%" in r.stdout and "1 unfinished" in r.stdout
    r = CliRunner().invoke(make_app(), ["compare", *map(str, runs[:3]), "--seeds", "--json"])
    assert [g["label"] for g in json.loads(r.stdout)["groups"]] == ["iterations=3",
                                                                   "iterations=1"]
    code = ("import sys; from typer.testing import CliRunner; from capsctl.cli import app; "
            f"r = CliRunner().invoke(app, ['compare', {str(runs[0])!r}, '--seeds']); "
            "print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.split() == ["0", "False"], out.stderr  # a text command: torch not loaded
    r = CliRunner().invoke(make_app(), ["compare", str(runs[0]), "--seeds", "--png",
                                        str(tmp_path / "x.png")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_seeds_labels_fall_back_to_run_names(tmp_path):
    """Other families share few keys: each group is named by its first run."""
    from capsctl import seeds
    caps = _ablation_run(tmp_path / "caps", 3, 0, 0.99)
    cnn = fake_run(tmp_path / "cnn", tiny_config(model={"name": "cnn", "channels": [4],
                                                        "hidden": [8]}), ROWS)
    assert [g.label for g in seeds.group_by_seed([caps, cnn])] == ["caps", "cnn"]
    assert [g.label for g in seeds.group_by_seed([caps])] == ["caps"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text("- a list, not sections\n")
    with pytest.raises(CapsctlError, match="bad cannot be read") as e:  # no group without a config
        seeds.group_by_seed([caps, bad])
    assert "\n" not in str(e.value)


def test_compare_refuses_what_is_not_a_run_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "missing", tmp_path / "empty"):
        r = CliRunner().invoke(make_app(), ["compare", str(target)])
        assert r.exit_code == 2 and "error:" in r.output and len(r.output.splitlines()) == 1
    r = CliRunner().invoke(make_app(), ["compare", str(tmp_path / "empty"), "--png",
                                        str(tmp_path / "x.png")])
    assert r.exit_code == 2


# --- sweep: the grid ---------------------------------------------------------------------------

def test_vary_values_and_point_names():
    axes = sweep.parse_vary(["model.routing=dynamic,uniform", "model.decoder_hidden=[8, 16],[4]",
                             "optim.lr=1e-3"])
    assert axes[1] == ("model.decoder_hidden", ["[8, 16]", "[4]"])
    assert sweep.point_name({"model.routing": "uniform", "optim.lr": "1e-3"}, axes) == \
        "routing=uniform,lr=1e-3"
    assert sweep.point_name({"model.decoder_hidden": "[8, 16]"}, axes) == \
        "decoder_hidden=_8__16_"
    clash = sweep.parse_vary(["model.recon=1,2", "loss.recon=3"])
    assert sweep.point_name({"model.recon": "1", "loss.recon": "3"}, clash) == \
        "model.recon=1,loss.recon=3"


def test_vary_takes_nested_keys_like_set(tmp_path):
    """The ablation of Table 1 as one sweep: a key of model.routing varies like --set sets it."""
    axes = sweep.parse_vary(["model.routing.iterations=1,3", "loss.recon_weight=0,0.0005"])
    points = sweep.grid(None, axes, ["model.name=capsnet", "data.name=mnist"])
    assert [p.name for p in points] == [
        "iterations=1,recon_weight=0", "iterations=1,recon_weight=0.0005",
        "iterations=3,recon_weight=0", "iterations=3,recon_weight=0.0005"]
    assert [(p.cfg.model.routing.iterations, p.cfg.loss.recon_weight) for p in points] == \
        [(1, 0.0), (1, 0.0005), (3, 0.0), (3, 0.0005)]
    with pytest.raises(CapsctlError, match="routing.bogus"):
        sweep.grid(None, sweep.parse_vary(["model.routing.bogus=1,2"]),
                   ["model.name=capsnet", "data.name=mnist"])


@pytest.mark.parametrize("bad", ["model.routing", "routing=dynamic", "model.routing=a,,b",
                                 "model.routing=a,a", "nosection.x=1", "model.a.b.c=1",
                                 "model..iterations=1"])
def test_bad_vary_is_one_line(bad):
    with pytest.raises(CapsctlError) as e:
        sweep.parse_vary([bad])
    assert "\n" not in str(e.value)
    with pytest.raises(CapsctlError, match="twice"):
        sweep.parse_vary(["model.routing=a", "model.routing=b"])


def test_every_point_is_checked_before_anything_trains(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"routing_iterations": 2}}))
    axes = sweep.parse_vary(["model.routing=dynamic,uniform"])
    with pytest.raises(CapsctlError, match="sweep point routing=uniform: .*routing_iterations"):
        sweep.grid(path, axes)
    points = sweep.grid(path, sweep.parse_vary(["model.routing=dynamic,inverted-dot-product"]))
    assert [p.cfg.model.routing.name for p in points] == ["dynamic", "inverted-dot-product"]
    assert all(p.cfg.model.routing.iterations == 2 for p in points)


# --- sweep: running, interrupting, continuing --------------------------------------------------

def _tiny_yaml(tmp_path: Path, root: Path) -> Path:
    raw = {"model": {"conv1_channels": 8, "primary_types": 2, "primary_dim": 4, "class_dim": 6,
                     "decoder_hidden": [16, 32], "transform_init_std": 0.1},
           "data": {"val_size": 32, "root": str(root)},
           "train": {"batch_size": 16, "eval_batch_size": 64, "log_every": 2,
                     "checkpoint_every": 2, "checkpoint_minutes": 0.0, "max_steps": 6,
                     "images_every_epoch": False}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sigint_at(monkeypatch, call: int) -> list:
    """Make the trainer's step send this process SIGINT on its ``call``-th call in all (the
    trainer then finishes the step, writes last.pt and raises Interrupted)."""
    import capsctl.training.loop as loop

    calls, real = [], loop.train_step

    def step(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(loop, "train_step", step)
    return calls


def _run(points, root):
    return sweep.run_sweep(points, root, CPU, show_progress=False)


@pytest.mark.slow
def test_interrupted_sweep_continues_where_it_stopped(tmp_path, fake_mnist, monkeypatch):
    from capsctl.training import Interrupted

    points = sweep.grid(_tiny_yaml(tmp_path, fake_mnist),
                        sweep.parse_vary(["model.routing=dynamic,self-attention"]))
    root = tmp_path / "runs" / "tiny"
    calls = _sigint_at(monkeypatch, 6 + 3)  # the second point's third step
    with pytest.raises(Interrupted):
        _run(points, root)
    first, second = root / "routing=dynamic", root / "routing=self-attention"
    assert sweep.status(first, points[0].cfg) == sweep.DONE
    assert sweep.status(second, points[1].cfg) == sweep.RESUME
    assert checkpoint.load(second / "checkpoints" / "last.pt")["step"] == 3
    done_before = (first / "metrics.jsonl").read_bytes()

    monkeypatch.undo()
    calls = _sigint_at(monkeypatch, 10 ** 9)  # counts the steps, never interrupts
    folders = _run(points, root)
    assert folders == [first, second]
    assert len(calls) == 3                                     # steps 4..6 of the second
    assert (first / "metrics.jsonl").read_bytes() == done_before  # skipped, untouched
    rows = compare.compare(folders)
    assert [r.finished for r in rows] == [True, True] and [r.steps for r in rows] == [6, 6]
    steps = [r["step"] for r in compare.read_metrics(second / "metrics.jsonl")
             if "train/loss_total" in r]
    assert steps == [2, 4, 6]                                  # one run, no repeated rows

    # resumed exactly: the same weights as the point trained without a stop
    straight = _run([points[1]], tmp_path / "straight")[0]
    w_a = checkpoint.load(second / "checkpoints" / "last.pt")["model"]
    w_b = checkpoint.load(straight / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    n = len(calls)
    assert _run(points, root) == [first, second] and len(calls) == n   # all done: no step


def test_a_folder_of_another_config_is_refused(tmp_path, fake_mnist):
    points = sweep.grid(_tiny_yaml(tmp_path, fake_mnist),
                        sweep.parse_vary(["model.routing=dynamic"]))
    folder = tmp_path / "runs" / "routing=dynamic"
    other = tiny_config(model={"class_dim": 5})
    fake_run(folder, other, ROWS[:2])
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.pt").write_bytes(b"x")
    with pytest.raises(CapsctlError, match="another config .*model.class_dim"):
        sweep.status(folder, points[0].cfg)


def test_sweep_and_compare_modules_import_no_torch():
    code = ("import sys; import capsctl.cli.compare, capsctl.cli.sweep, capsctl.compare, "
            "capsctl.sweep; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
