"""capsctl plot: learning curves from run folders' metrics.jsonl (handwritten rows in the
trainer's format), the epoch axis, runs in progress, the PNG, --json, bad input, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from capsctl import curves
from capsctl.cli import app
from capsctl.errors import CapsctlError
from conftest import REPO

runner = CliRunner()


def train_row(step, epoch, loss):
    return {"step": step, "time": 1000.0 + step, "train/loss_total": loss,
            "train/accuracy": 0.9, "lr": 1e-3, "images_per_s": 100.0, "epoch": epoch}


def val_row(step, acc):
    return {"step": step, "time": 1000.5 + step, "val/accuracy": acc, "val/error": 1 - acc}


def write_run(folder, rows, torn=False):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + (['{"step": 9'] if torn else [])
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def finished_rows(spe=10, epochs=3, log_every=4, base=0.02):
    """A run of ``epochs`` epochs of ``spe`` steps, logging every ``log_every`` steps, validating
    at each epoch's end, tested at the end."""
    rows, step = [], 0
    for e in range(epochs):
        for _ in range(spe):
            step += 1
            if step % log_every == 0:
                rows.append(train_row(step, e, 1.0 / step))
        rows.append(val_row(step, 1 - base / (e + 1)))
    rows.append({"step": step, "time": 5000.0, "test/accuracy": 0.99, "test/error": 0.01})
    return rows


def test_the_epoch_length_comes_from_the_first_validation_row(tmp_path):
    c = curves.read_curve(write_run(tmp_path / "a", finished_rows(spe=10), torn=True))
    assert c.steps_per_epoch == 10
    assert [p[:2] for p in c.val_error] == [[1.0, 10], [2.0, 20], [3.0, 30]]
    assert c.train_loss[0] == [0.4, 4, 0.25]
    assert c.best_val_error == pytest.approx(0.02 / 3) and c.best_val_epoch == 3.0
    assert c.test_error == 0.01 and c.finished


def test_without_validation_the_training_rows_bracket_the_epoch_length(tmp_path):
    rows = [r for r in finished_rows(spe=10, log_every=5) if "train/loss_total" in r]
    c = curves.read_curve(write_run(tmp_path / "a", rows))
    assert c.steps_per_epoch == 10          # rows at step 10 (epoch 0) and 15 (epoch 1)
    assert c.val_error == [] and not c.finished and c.test_error is None


def test_a_run_in_its_first_epoch_is_drawn_against_steps_with_the_others(tmp_path):
    early = write_run(tmp_path / "early", [train_row(2, 0, 0.5), train_row(4, 0, 0.3)])
    done = write_run(tmp_path / "done", finished_rows())
    runs = curves.curves([early, done])
    assert runs[0].steps_per_epoch is None and curves.x_unit(runs) == "step"
    r = runner.invoke(app, ["plot", str(early), str(done), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    assert "last step" in r.output and "(in progress)" in r.output


def test_a_resumed_run_keeps_the_last_row_of_each_step(tmp_path):
    rows = finished_rows()
    rows.insert(0, train_row(4, 0, 7.0))    # an older row for step 4, rewritten after it
    c = curves.read_curve(write_run(tmp_path / "a", rows))
    assert [p for p in c.train_loss if p[1] == 4] == [[0.4, 4, 0.25]]


def _colours(png):
    rgb = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return {tuple(p) for p in rgb.tolist()}


def test_plot_draws_every_run_in_its_colour_with_a_legend(tmp_path):
    a = write_run(tmp_path / "a", finished_rows(base=0.02))
    b = write_run(tmp_path / "b", finished_rows(base=0.05)[:-1])  # not tested yet
    out = tmp_path / "sub" / "curves.png"
    r = runner.invoke(app, ["plot", str(a), str(b), "--out", str(out)])
    assert r.exit_code == 0, r.output
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 900 and img.height > 300
    seen = _colours(out)
    assert curves.COLOURS[0] in seen and curves.COLOURS[1] in seen
    assert curves.COLOURS[2] not in seen
    assert "0.67% (epoch 3)" in r.output and "(in progress)" in r.output
    assert curves.legend_line(curves.read_curve(a), "epoch") == \
        "a   best val 0.67% (epoch 3)   test 1.00%"


def test_plot_json_holds_the_series(tmp_path):
    a = write_run(tmp_path / "a", finished_rows())
    r = runner.invoke(app, ["plot", str(a), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["x"] == "epoch" and doc["point"] == ["epoch", "step", "value"]
    run = doc["runs"][0]
    assert run["name"] == "a" and run["steps_per_epoch"] == 10
    assert run["val_error"][0][:2] == [1.0, 10] and len(run["train_loss"]) == 7
    assert not (tmp_path / "curves.png").exists()   # --json alone writes no picture


def test_plot_on_a_real_tiny_run(tmp_path, fake_mnist):
    import torch

    from capsctl.training.loop import train
    from conftest import tiny_config

    cfg = tiny_config(train={"epochs": 2, "log_every": 4})
    train(cfg, tmp_path / "run", torch.device("cpu"), data_root=str(fake_mnist),
          show_progress=False)
    c = curves.read_curve(tmp_path / "run")
    assert c.steps_per_epoch == 14          # (256 - 32) / 16 steps an epoch
    assert [p[0] for p in c.val_error] == [1.0, 2.0] and c.finished
    assert all(0 < p[0] <= 2 for p in c.train_loss)


@pytest.mark.parametrize("case", ["missing", "not-a-run", "empty", "out-is-folder", "none"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    run = write_run(tmp_path / "run", finished_rows())
    args = {"missing": [str(tmp_path / "nope")],
            "not-a-run": [str(tmp_path)],
            "empty": [str(write_run(tmp_path / "e", [{"step": 1, "lr": 0.1}]))],
            "out-is-folder": [str(run), "--out", str(tmp_path)],
            "none": []}[case]
    r = runner.invoke(app, ["plot", *args])
    assert r.exit_code == 2
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert "Traceback" not in r.output


def test_loss_draws_the_term_asked_for_and_refuses_one_the_run_lacks(tmp_path):
    rows = [dict(train_row(s, 0, 1.0 / s), **{"train/loss_margin": 0.5 / s,
                                               "train/loss_reconstruction": 0.5 / s})
            for s in (4, 8)] + [val_row(10, 0.98)]
    run = write_run(tmp_path / "recon", rows)
    for asked in ("margin", "train/loss_margin"):
        c = curves.read_curve(run, asked)
        assert c.loss == "margin" and [p[2] for p in c.train_loss] == [0.125, 0.0625]
    assert [p[2] for p in curves.read_curve(run).train_loss] == [0.25, 0.125]
    r = runner.invoke(app, ["plot", str(run), "--loss", "margin", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["runs"][0]["train_loss"][1][2] == 0.0625
    other = write_run(tmp_path / "cnn", [train_row(4, 0, 0.3), val_row(10, 0.9)])
    r = runner.invoke(app, ["plot", str(run), str(other), "--loss", "margin",
                            "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "logs no training loss 'margin'; its terms: total" in r.output
    assert not (tmp_path / "c.png").exists()


def test_extreme_values_still_draw(tmp_path):
    rows = [train_row(2, 0, 5e-324), train_row(4, 0, 1e308), val_row(4, 1.0), val_row(8, 0.5),
            train_row(2 ** 62, 1, 0.1)]
    run = write_run(tmp_path / "x", rows)
    r = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "x.png").width > 900


def test_the_library_refuses_no_runs():
    with pytest.raises(CapsctlError, match="at least one"):
        curves.curves([])


def test_log_ticks_and_ranges():
    assert curves.log_range([0.003, 0.02]) == (0.001, 0.1)
    assert curves.log_range([0.0]) == (0.1, 1.0)
    ticks = curves.log_ticks(0.001, 0.1)
    assert [v for v, major in ticks if major] == pytest.approx([0.001, 0.01, 0.1])
    assert curves.nice_step(40) == 5 and curves.nice_step(3.5) == 0.5


def test_plot_does_not_import_torch(tmp_path):
    run = write_run(tmp_path / "a", finished_rows())
    script = ("import sys\nfrom typer.testing import CliRunner\nfrom capsctl.cli import app\n"
              f"r = CliRunner().invoke(app, ['plot', {str(run)!r}, '--out', "
              f"{str(tmp_path / 'c.png')!r}])\n"
              "print(r.exit_code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert done.stdout.split() == ["0", "False"], done.stdout + done.stderr
