"""Faults: real `capsctl train` processes killed (SIGKILL), interrupted (SIGINT, SIGTERM, a
double Ctrl-C) and resumed end with the same weights, bitwise, and the same metrics as one
uninterrupted run; a full disk keeps the previous checkpoint; train.nonfinite=stop|skip.

The subprocesses run a tiny CapsNet on synthetic MNIST-shaped data: 14 steps per epoch, 2
epochs. Kills are timed by polling metrics.jsonl (one row per step), never by blind sleeps.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from capsctl import atomic, checkpoint
from capsctl.errors import TrainingError
from capsctl.training import loop, prepare_run_dir, train
from conftest import tiny_config, write_fake_mnist

pytestmark = pytest.mark.slow

STEPS_PER_EPOCH, EPOCHS = 14, 2           # (256 - 32 val) / 16
TOTAL = STEPS_PER_EPOCH * EPOCHS
TINY_YAML = """\
model: {conv1_channels: 8, primary_types: 2, primary_dim: 4, class_dim: 6, decoder_hidden: [16, 32]}
data: {val_size: 32}
train:
  epochs: 2
  batch_size: 16
  eval_batch_size: 64
  log_every: 1              # one metrics row per step: what the kills are timed by
  checkpoint_every: 5       # a SIGKILL loses up to 4 steps, recomputed on resume
  checkpoint_minutes: 0
  images_every_epoch: false
"""
VOLATILE = ("time", "images_per_s")       # wall-clock values, the only ones allowed to differ


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    write_fake_mnist(root / "mnist")
    (root / "tiny.yaml").write_text(TINY_YAML)
    return root


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("CAPSCTL_DEBUG", None)
    return env


def start(work: Path, name: str | None = None, resume: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-m", "capsctl", "train", "--no-progress", "--device", "cpu",
            "--data-root", str(work / "mnist")]   # bitwise equality is a CPU guarantee
    if resume is not None:
        args += ["--resume", str(resume)]
    else:
        args += [str(work / "tiny.yaml"), "--run-dir", str(work / "runs"), "--name", name]
    return subprocess.Popen(args, cwd=work, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def train_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:      # a line being written right now
            pass
    return [r for r in rows if "train/loss_total" in r]


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 90) -> int:
    """Poll metrics.jsonl until a training row with ``step`` or later appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [r["step"] for r in train_rows(run)]
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None:
            pytest.fail(f"training exited (rc {proc.returncode}) before step {step}: "
                        f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no metrics row for step {step} within {timeout} s")


def comparable(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def baseline(work):
    """The uninterrupted run, started at once and awaited only when first compared against."""
    proc = start(work, "baseline")
    done = {}

    def get() -> Path:
        if not done:
            rc, err = finish(proc)
            assert rc == 0, err[-2000:]
            done["run"] = work / "runs" / "baseline"
        return done["run"]

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_same_as_baseline(run: Path, base: Path) -> None:
    for name in ("last.pt", "best.pt"):
        a, b = (checkpoint.load(r / "checkpoints" / name) for r in (base, run))
        assert a["step"] == b["step"] and a["best_step"] == b["best_step"], name
        assert a["model"].keys() == b["model"].keys()
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), f"{name}: {k} differs"
    a, b = (checkpoint.load(r / "checkpoints" / "last.pt") for r in (base, run))
    assert a["step"] == TOTAL
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # the metrics file reads as one run: every row (train losses, val and test accuracy) equal
    ra, rb = comparable(base), comparable(run)
    assert [r["step"] for r in ra if "val/accuracy" in r] == [14, 28]
    assert ra == rb
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_sigint_and_sigterm_finish_the_step_and_resume_exactly(work, baseline):
    run = work / "runs" / "sig"
    proc = start(work, "sig")
    wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    rc, err = finish(proc)
    assert rc == 130, err[-2000:]
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert 3 <= state["step"] < STEPS_PER_EPOCH and state["epoch"] == 0
    assert 0 < state["batch_in_epoch"] < STEPS_PER_EPOCH, "the stop should be mid-epoch"
    assert f"stopped by SIGINT at step {state['step']}" in err
    assert f"capsctl train --resume {run}" in err
    assert "Traceback" not in err

    proc = start(work, resume=run)
    wait_for_step(proc, run, STEPS_PER_EPOCH + 3)         # second epoch, mid-way
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 143, err[-2000:]
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and 0 < state["batch_in_epoch"] < STEPS_PER_EPOCH
    assert "stopped by SIGTERM" in err

    rc, err = finish(start(work, resume=run))
    assert rc == 0, err[-2000:]
    assert_same_as_baseline(run, baseline())


def test_sigkill_at_any_moment_loses_at_most_one_interval(work, baseline):
    run = work / "runs" / "kill"
    proc = start(work, "kill")
    wait_for_step(proc, run, 6)                           # last.pt (step 5) exists
    proc.kill()
    proc.wait()
    state = checkpoint.load(run / "checkpoints" / "last.pt")   # still loadable
    assert state["step"] >= 5 and state["step"] % 5 == 0

    # then at a random moment of the resumed process, a checkpoint write included
    delay = random.uniform(0.0, 1.0)
    proc = start(work, resume=run)
    wait_for_step(proc, run, state["step"] + 1)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["step"] >= 5, f"killed {delay:.2f} s in"

    rc, err = finish(start(work, resume=run))
    assert rc == 0, f"killed {delay:.2f} s in: {err[-2000:]}"
    assert_same_as_baseline(run, baseline())


def test_second_ctrl_c_exits_at_once_without_corrupting(work, baseline):
    run = work / "runs" / "double"
    proc = start(work, "double")
    wait_for_step(proc, run, 6)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    rc, err = finish(proc)
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err
    checkpoint.load(run / "checkpoints" / "last.pt")     # never torn
    rc, err = finish(start(work, resume=run))
    assert rc == 0, err[-2000:]
    assert_same_as_baseline(run, baseline())


def test_two_ctrl_c_during_one_long_native_call_still_exit_at_once(tmp_path):
    """Both SIGINTs arrive while the main thread is inside one long C call (a matmul), so Python
    runs the handler once for the two: the deliveries are still counted and it exits at once."""
    script = tmp_path / "two_sigints.py"
    script.write_text(textwrap.dedent("""
        import os, signal, threading, time, torch
        from capsctl.training.signals import SignalStop
        a = torch.randn(3000, 3000)
        with SignalStop():
            def fire():
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGINT)
            threading.Thread(target=fire).start()
            t0 = time.monotonic()
            torch.mm(a, a)
            print(f"survived; the matmul took {time.monotonic() - t0:.2f} s")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=_env())
    assert done.returncode == 128 + signal.SIGINT, done.stdout + done.stderr


# --- in-process: disk full, non-finite losses ------------------------------------------------

CPU = torch.device("cpu")


def _train(cfg, folder, root, **kw):
    return train(cfg, folder, CPU, data_root=str(root), show_progress=False, **kw)


@pytest.mark.parametrize("fail_in", ["torch.save", "os.replace"])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, fake_mnist, monkeypatch, fail_in):
    cfg = tiny_config(train={"epochs": 1, "checkpoint_every": 3})
    folder = prepare_run_dir(tmp_path, "full", False)
    real_save, real_replace, saves = torch.save, os.replace, []

    def save(obj, f, *a, **k):
        if len(saves) >= 2 and fail_in == "torch.save":
            f.write(b"partial")                          # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    def replace(src, dst):
        if str(dst).endswith(".pt"):
            saves.append(dst)
            if len(saves) > 2 and fail_in == "os.replace":
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.torch, "save", save)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(TrainingError, match="cannot write checkpoint .*last.pt: No space left on "
                                            "device; the previous checkpoint is intact"):
        _train(cfg, folder, fake_mnist)
    monkeypatch.undo()
    state = checkpoint.load(folder / "checkpoints" / "last.pt")
    assert state["step"] == 6                           # the second save, intact
    assert not list((folder / "checkpoints").glob(".*.tmp"))
    assert TrainingError.exit_code == 1


def _poisoned_losses(monkeypatch, bad_steps: set[int]) -> None:
    """Make the loss of the given steps NaN (still differentiable)."""
    real = loop.loss_fn

    def make(cfg, task):
        fn = real(cfg, task)

        def losses(out, batch, step):
            result = fn(out, batch, step)
            if step in bad_steps:
                result = {k: v * float("nan") for k, v in result.items()}
            return result
        return losses

    monkeypatch.setattr(loop, "loss_fn", make)


def test_nonfinite_stop_is_the_default_and_names_step_and_terms(tmp_path, fake_mnist,
                                                               monkeypatch):
    _poisoned_losses(monkeypatch, {7})
    cfg = tiny_config(train={"epochs": 1, "checkpoint_every": 5, "log_every": 4})
    assert cfg.train.nonfinite == "stop"
    folder = prepare_run_dir(tmp_path, "stop", False)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 7 \(margin=nan, .*"
                                            r"total=nan\); stopped"):
        _train(cfg, folder, fake_mnist)
    state = checkpoint.load(folder / "checkpoints" / "last.pt")
    assert state["step"] == 5                            # the last good one
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_nonfinite_skip_drops_the_batch_without_a_step(tmp_path, fake_mnist, monkeypatch):
    _poisoned_losses(monkeypatch, {3, 4, 9})
    cfg = tiny_config(train={"epochs": 1, "log_every": 7, "nonfinite": "skip"})
    folder = prepare_run_dir(tmp_path, "skip", False)
    summary = _train(cfg, folder, fake_mnist)
    assert summary["steps"] == STEPS_PER_EPOCH
    rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["train/skipped_nonfinite"] for r in rows if "train/skipped_nonfinite" in r]
    assert skipped == [2, 1]                             # steps 3, 4 | step 9
    assert all(r["train/loss_total"] is not None for r in rows if "train/loss_total" in r)
    state = checkpoint.load(folder / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    # a skipped batch takes no optimizer step: Adam counted 14 - 3 steps
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {STEPS_PER_EPOCH - 3.0}
