"""Nothing lost at the edges: a run killed at any phase boundary (the last validation, best.pt,
the test, final_eval included) resumes to exactly the uninterrupted run; one run folder, one
process (an OS lock); a run that died early never blocks its name; bad input (a corrupt last.pt
training state, a batch too big, a broken final_eval dataset) and a full disk are one line
with nothing written; a second signal of either kind exits at once.

Kills are injected in-process: a hook raises ``Killed`` (a BaseException, so nothing catches
it, like kill -9) before or after the Nth file write or evaluation of the run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from capsctl import checkpoint
from capsctl.errors import CapsctlError, CheckpointError, TrainingError
from capsctl.training import Interrupted, loop, prepare_run_dir, train
from capsctl.training.rundir import RunLock, check_run_dir
from capsctl.writers import JsonlWriter
from conftest import tiny_config, write_fake_mnist

CPU = torch.device("cpu")
STEPS = 14                                 # (256 - 32 val) / 32 = 7 per epoch, 2 epochs
VOLATILE = ("time", "images_per_s")


def edge_config(model=None, **train):
    """2 epochs of 7 steps; last.pt at every epoch's end, just before its validation (the
    issue's case: a kill during the last validation), a final_eval dataset."""
    return tiny_config(model=model or {}, train={"epochs": 2, "batch_size": 32, "log_every": 2,
                                                 "checkpoint_every": 7, "final_eval": ["mnist"],
                                                 **train})


def run(cfg, folder, root, resume=False, **kw):
    return train(cfg, folder, CPU, data_root=str(root), resume=resume, show_progress=False,
                 **kw)


class Killed(BaseException):
    """A simulated kill -9: nothing catches it."""


def kill_at(monkeypatch, n: int, after: bool) -> list:
    """Raise Killed before (or after) the ``n``-th call in all (1-based) of checkpoint.save,
    evaluate and the metrics.jsonl writer: every place a phase writes or evaluates."""
    calls = []

    def wrap(real):
        def hooked(*args, **kwargs):
            calls.append(real.__name__)
            if len(calls) == n and not after:
                raise Killed(n)
            result = real(*args, **kwargs)
            if len(calls) == n and after:
                raise Killed(n)
            return result
        return hooked

    monkeypatch.setattr(loop.checkpoint, "save", wrap(checkpoint.save))
    monkeypatch.setattr(loop, "evaluate", wrap(loop.evaluate))
    monkeypatch.setattr(JsonlWriter, "log", wrap(JsonlWriter.log))
    return calls


def rows(folder: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (folder / "metrics.jsonl").read_text().splitlines()]


def same_summary(a: dict, b: dict) -> dict:
    return {k: v for k, v in a.items() if k not in ("seconds", "run_dir", "best_checkpoint")} \
        == {k: v for k, v in b.items() if k not in ("seconds", "run_dir", "best_checkpoint")}


def assert_same_run(run_dir: Path, base: Path) -> None:
    """best.pt and last.pt (weights, optimizer, position, class names) bitwise, and every
    metrics.jsonl row but its wall-clock values."""
    for name in ("last.pt", "best.pt"):
        a, b = (checkpoint.load(r / "checkpoints" / name) for r in (base, run_dir))
        for key in ("step", "epoch", "batch_in_epoch", "val_step", "best_step",
                    "best_val_accuracy", "class_names"):
            assert a.get(key) == b.get(key), (name, key)
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), f"{name}: {k}"
        if "optimizer" in a:
            for sa, sb in zip(a["optimizer"]["state"].values(),
                              b["optimizer"]["state"].values()):
                assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert rows(run_dir) == rows(base)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("edges") / "mnist")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data):
    folder = prepare_run_dir(tmp_path_factory.mktemp("base"), "base", False)
    summary = run(edge_config(), folder, data)
    return folder, summary


# --- 1. a resume finishes exactly as the uninterrupted run ----------------------------------

def test_the_baseline_has_every_phase(baseline):
    folder, summary = baseline
    r = rows(folder)
    assert [x["step"] for x in r if "val/accuracy" in x] == [7, 14]
    assert any("test/accuracy" in x for x in r) and any("test/mnist/accuracy" in x for x in r)
    assert summary["steps"] == STEPS and summary["best_val_accuracy"] >= 0
    assert list(summary["final_eval"]) == ["mnist"]
    for name in ("best.pt", "last.pt"):   # the class names travel with every checkpoint
        state = checkpoint.load(folder / "checkpoints" / name)
        assert state["class_names"] == [str(k) for k in range(10)]


def _kill_points(data, tmp_path, monkeypatch) -> list[tuple[int, bool]]:
    """Before the first write (no checkpoint yet), then after every write or evaluation from
    the first validation on: phase by phase (validation, its row, best.pt, last.pt, the
    second epoch's rows, last.pt before the last validation, validation, last.pt, test, its
    row, the confusion rows, the detector's threshold in best.pt, final_eval, its row). Earlier kills: tests/test_faults.py."""
    calls = kill_at(monkeypatch, 10 ** 9, True)
    run(edge_config(), prepare_run_dir(tmp_path, "count", False), data)
    monkeypatch.undo()
    evals = [n for n, name in enumerate(calls, 1) if name == "evaluate"]
    assert len(evals) == 4 and calls[evals[1] - 3:evals[1] - 1] == ["log", "save"], calls
    return [(1, False)] + [(n, True) for n in range(evals[0], len(calls) + 1)]


def test_a_kill_at_every_phase_boundary_resumes_to_the_same_run(tmp_path, data, baseline,
                                                                monkeypatch):
    base, base_summary = baseline
    points = _kill_points(data, tmp_path, monkeypatch)
    assert len(points) == 19
    for n, after in points:
        folder = prepare_run_dir(tmp_path, f"kill-{n}-{after}", False)
        kill_at(monkeypatch, n, after)
        with pytest.raises(Killed):
            run(edge_config(), folder, data)
        monkeypatch.undo()
        summary = run(edge_config(), folder, data, resume=True)
        assert same_summary(summary, base_summary), (n, after, summary)
        assert_same_run(folder, base)


@pytest.mark.parametrize("signal_at", [7, STEPS])   # an epoch's end; inside the last step
def test_sigint_in_the_last_step_of_an_epoch_or_run_resumes_exactly(tmp_path, data, baseline,
                                                                   monkeypatch, signal_at):
    calls, real = [], loop.train_step

    def step(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(loop, "train_step", step)
    folder = prepare_run_dir(tmp_path, "sig", False)
    with pytest.raises(Interrupted):
        run(edge_config(), folder, data)
    monkeypatch.undo()
    assert checkpoint.load(folder / "checkpoints" / "last.pt")["step"] == signal_at
    summary = run(edge_config(), folder, data, resume=True)
    assert same_summary(summary, baseline[1]), summary
    assert summary["best_step"] >= 0
    assert_same_run(folder, baseline[0])


def test_a_finished_run_resumed_repeats_only_the_test(tmp_path, data, baseline):
    folder = prepare_run_dir(tmp_path, "again", False)
    run(edge_config(), folder, data)
    summary = run(edge_config(), folder, data, resume=True)
    assert same_summary(summary, baseline[1])
    assert_same_run(folder, baseline[0])


# --- 2. one run folder, one process ---------------------------------------------------------

def test_a_locked_run_folder_refuses_a_second_trainer_resume_and_force(tmp_path, data):
    folder = prepare_run_dir(tmp_path, "busy", False)
    run(edge_config(epochs=1, final_eval=[]), folder, data)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    lock = RunLock(folder).acquire()                   # "another process" training in it
    try:
        pid = f"PID {os.getpid()}"
        for attempt in (lambda: run(edge_config(epochs=2), folder, data, resume=True),
                        lambda: run(edge_config(), folder, data, force=True),
                        lambda: check_run_dir(tmp_path, "busy", True),
                        lambda: check_run_dir(tmp_path, "busy", False)):
            with pytest.raises(CapsctlError, match=f"is in use: {pid} is training in it") as e:
                attempt()
            assert "\n" not in str(e.value)
        assert [p.name for p in tmp_path.iterdir()] == ["busy"]     # not moved aside
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    finally:
        lock.release()
    run(edge_config(epochs=2, final_eval=[]), folder, data, resume=True)   # free again


def _cli(*args, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("CAPSCTL_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", "capsctl", "train", "--no-progress",
                             "--device", "cpu", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_processes_never_share_a_run_folder(tmp_path, data):
    (tmp_path / "long.yaml").write_text(textwrap.dedent("""\
        model: {conv1_channels: 8, primary_types: 2, primary_dim: 4, class_dim: 6,
                decoder_hidden: [16, 32]}
        data: {val_size: 32}
        train: {epochs: 500, batch_size: 16, log_every: 1, checkpoint_every: 5,
                checkpoint_minutes: 0, images_every_epoch: false}
        """))
    common = ("--data-root", str(data))
    new = (str(tmp_path / "long.yaml"), "--run-dir", str(tmp_path / "runs"), "--name", "one")
    first = _cli(*new, *common, cwd=tmp_path)
    second = _cli(*new, *common, cwd=tmp_path)        # started at once: one of them loses
    folder = tmp_path / "runs" / "one"
    losers = []
    try:
        deadline = time.monotonic() + 120
        while not (folder / "checkpoints" / "last.pt").is_file():
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        while first.poll() is None and second.poll() is None:   # the loser stops at its claim
            assert time.monotonic() < deadline, "both trainers still running after 120 s"
            time.sleep(0.05)
        running = [p for p in (first, second) if p.poll() is None]
        assert len(running) == 1, "exactly one trainer keeps the folder"
        winner = running[0]
        loser = second if winner is first else first
        losers.append(loser.communicate(timeout=60)[1])
        assert loser.returncode == 2
        for args in ((*new, *common), ("--resume", str(folder), *common),
                     (*new, "--force", *common)):
            out = _cli(*args, cwd=tmp_path)
            losers.append(out.communicate(timeout=120)[1])
            assert out.returncode == 2, losers[-1]
        for err in losers:
            lines = [x for x in err.splitlines() if x.strip()]
            assert len(lines) == 1 and "Traceback" not in err, err
        for err in losers[1:]:
            assert f"is in use: PID {winner.pid} is training in it" in err, err
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["one"]
    finally:
        for p in (first, second):
            if p.poll() is None:
                p.kill()
                p.wait()
    resumed = _cli("--resume", str(folder), "--set", "train.epochs=1", *common, cwd=tmp_path)
    err = resumed.communicate(timeout=120)[1]              # the kernel released the lock
    assert resumed.returncode == 0, err[-2000:]


# --- 3. a run that dies early never blocks its name; bad input leaves nothing ----------------

def test_an_unused_folder_is_reused_and_config_only_restarts(tmp_path, data, baseline):
    folder = tmp_path / "early"
    (folder / "checkpoints").mkdir(parents=True)         # died right after mkdir
    (folder / ".lock").write_text("999999\n")
    check_run_dir(tmp_path, "early", False)              # a rerun may take the name
    run(edge_config(), folder, data)
    assert_same_run(folder, baseline[0])


def test_a_batch_too_big_for_memory_is_one_line_before_the_folder(tmp_path, data,
                                                                  monkeypatch):
    from capsctl.models.capsnet import CapsNet

    def forward(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(CapsNet, "forward", forward)
    with pytest.raises(CapsctlError, match="a training batch of 32 images does not fit in "
                                           "memory .* lower train.batch_size"):
        run(edge_config(), tmp_path / "runs" / "oom", data)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("model", [{}, {"name": "cnn", "channels": [4, 4], "hidden": [8],
                                      "pool": [2, 2]}])   # the CNN's dropout draws numbers
def test_the_first_batch_check_leaves_the_run_unchanged(data, model):
    from capsctl.data.build import build
    from capsctl.models import build_model, loss_fn
    from capsctl.training import build_optimizer
    from capsctl.distributed import ONE_PROCESS

    cfg = edge_config(model=model)
    bundle = build(cfg, CPU, str(data))
    net = build_model(cfg.model)
    opt = build_optimizer(net, cfg)
    before, rng = {k: v.clone() for k, v in net.state_dict().items()}, torch.get_rng_state()
    n = loop._first_batch_fits(net, opt, bundle, loss_fn(cfg, bundle.task), ONE_PROCESS, 32, cfg,
                               CPU)
    assert n >= 1 and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_final_eval_problems_stop_the_run_before_its_folder(tmp_path, data):
    with pytest.raises(CapsctlError, match="affnist"):     # 40x40 images for a 28x28 model
        run(edge_config(final_eval=["affnist-synth"]), tmp_path / "runs" / "x", data)
    broken = write_fake_mnist(tmp_path / "broken")
    (broken / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    cfg = edge_config(final_eval=["mnist"])
    cfg.data.root = str(data)
    # the run's own data is fine; the final_eval set is read from the broken root
    from capsctl.data import build as build_mod

    real = build_mod.build_eval

    def from_broken(name, split, cfg, device, root_flag=None):
        return real(name, split, cfg, device, str(broken))

    loop_build_eval, loop.build_eval = loop.build_eval, from_broken
    try:
        with pytest.raises(CapsctlError, match="t10k-labels"):
            run(cfg, tmp_path / "runs" / "y", data)
    finally:
        loop.build_eval = loop_build_eval
    assert not (tmp_path / "runs").exists()


def test_a_run_folder_that_cannot_be_made_is_one_line_and_nothing(tmp_path, data):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CapsctlError, match="cannot create run folder"):
        check_run_dir(tmp_path / "file", "r", False)
    with pytest.raises(CapsctlError, match="cannot create run folder"):
        run(edge_config(), tmp_path / "file" / "r", data)
    assert (tmp_path / "file").read_text() == "not a folder"


# --- 4. a corrupt last.pt is one line, and the run folder stays as it was -------------------

def _corruptions() -> dict:
    """name -> a function mutating a last.pt state dict in place."""
    def opt_state(fn):
        return lambda s: fn(s["optimizer"]["state"][0])

    return {
        "exp_avg shape": opt_state(lambda o: o.update(exp_avg=torch.zeros(3))),
        "exp_avg a list": opt_state(lambda o: o.update(exp_avg=[0.0])),
        "step an int tensor": opt_state(lambda o: o.update(step=torch.tensor(3))),
        "no moments": opt_state(lambda o: o.pop("exp_avg_sq")),
        "state index": lambda s: s["optimizer"]["state"].update({99: {}}),
        "param list": lambda s: s["optimizer"]["param_groups"][0].update(params=["a"]),
        "lr nan": lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")),
        "betas": lambda s: s["optimizer"]["param_groups"][0].update(betas=(2.0,)),
        "optimizer a list": lambda s: s.update(optimizer=[1, 2]),
        "log_accum keys": lambda s: s.update(log_accum={"sum": torch.zeros(2)}),
        "log_accum shape": lambda s: s["log_accum"].update(sum=torch.zeros(7)),
        "log_accum type": lambda s: s.update(log_accum=[1]),
        "metrics_bytes negative": lambda s: s.update(metrics_bytes=-5),
        "metrics_bytes text": lambda s: s.update(metrics_bytes="big"),
        "absurd step": lambda s: s.update(step=10 ** 12),
        "step off its epoch": lambda s: s.update(step=s["step"] + 1),
        "best_step after step": lambda s: s.update(best_step=s["step"] + 5),
        "best accuracy nan": lambda s: s.update(best_val_accuracy=float("nan")),
        "val_step text": lambda s: s.update(val_step="7"),
        "rng a list": lambda s: s.update(rng=[1]),
        "rng wrong size": lambda s: s.update(rng={"cpu": torch.zeros(3, dtype=torch.uint8)}),
        "class_names": lambda s: s.update(class_names=[1, 2]),
        "weights shape": lambda s: s["model"].update({next(iter(s["model"])): torch.zeros(1)}),
    }


def test_a_corrupt_training_state_is_one_line_and_changes_nothing(tmp_path, data):
    folder = prepare_run_dir(tmp_path, "c", False)
    run(edge_config(epochs=1, max_steps=5, final_eval=[]), folder, data)   # mid-epoch last.pt
    last = folder / "checkpoints" / "last.pt"
    good = checkpoint.load(last)
    assert good["log_accum"], "a partial logging interval is stored"
    cases = _corruptions()
    for name, mutate in cases.items():
        state = checkpoint.load(last)
        mutate(state)
        state.pop("format_version")
        checkpoint.save(last, state)
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        with pytest.raises(CheckpointError) as e:
            run(edge_config(epochs=1, final_eval=[]), folder, data, resume=True)
        assert "\n" not in str(e.value) and str(last) in str(e.value), name
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before, name
    assert len(cases) == 23
    checkpoint.save(last, {k: v for k, v in good.items() if k != "format_version"})
    run(edge_config(epochs=1, final_eval=[]), folder, data, resume=True)     # the good one


# --- 5. a full disk at the start: one line, no temporary files ------------------------------

def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_writing_config_yaml_names_it_and_leaves_no_temp(tmp_path, data,
                                                                   monkeypatch):
    from capsctl.training import rundir

    real = Path.write_text

    def write_text(self, *a, **k):
        if self.name.endswith(".tmp"):
            real(self, "partial")
            _enospc()
        return real(self, *a, **k)

    monkeypatch.setattr(rundir.Path, "write_text", write_text)
    with pytest.raises(TrainingError, match=r"cannot write .*config.yaml: No space left"):
        run(edge_config(), tmp_path / "full", data)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [".lock", "checkpoints"]
    run(edge_config(epochs=1, final_eval=[]), tmp_path / "full", data)   # the name is free


def test_disk_full_in_tensorboard_is_one_line_without_a_thread_traceback(tmp_path, data,
                                                                         monkeypatch, capfd):
    from tensorboard.summary.writer import record_writer

    real, calls = record_writer.RecordWriter.write, []

    def write(self, data_):
        calls.append(1)
        if len(calls) > 3:
            _enospc()
        return real(self, data_)

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    with pytest.raises(TrainingError, match=r"cannot write .*tb: No space left on device"):
        run(edge_config(), tmp_path / "tb-full", data)
    time.sleep(0.2)
    assert "Traceback" not in capfd.readouterr().err

    import torch.utils.tensorboard as tb

    monkeypatch.setattr(tb, "SummaryWriter", _enospc)      # the event file cannot be made
    with pytest.raises(TrainingError, match=r"cannot write .*tb-full2/tb: No space left"):
        run(edge_config(), tmp_path / "tb-full2", data)


def test_affnist_synth_on_a_full_disk_leaves_no_partial_folder(tmp_path, data, monkeypatch):
    from typer.testing import CliRunner

    from capsctl.cli import app
    from capsctl.data import affnist_mat

    real, calls = affnist_mat.write_mat, []

    def write_mat(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(affnist_mat, "write_mat", write_mat)
    out = tmp_path / "synth"
    result = CliRunner().invoke(app, ["data", "affnist-synth", "--per-digit", "3", "--out",
                                      str(out), "--data-root", str(data)])
    assert result.exit_code == 1, result.output
    assert "No space left on device" in result.output and ".test_batches.writing" in \
        result.output
    assert not out.exists() or not any(p.name.endswith(".writing") for p in out.iterdir())


# --- 6. a second signal of either kind exits at once ---------------------------------------

@pytest.mark.parametrize("under_agent,want", [(False, 128 + signal.SIGTERM), (True, 0)])
def test_sigint_then_sigterm(tmp_path, under_agent, want):
    """Outside torchrun a SIGTERM after a SIGINT is a second signal: exit at once. Under
    torchrun it is the agent passing the same Ctrl-C on: the step finishes (exit 0 here)."""
    script = tmp_path / "int_term.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, time
        from capsctl.training.signals import SignalStop
        with SignalStop(under_agent={under_agent}) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert stop.received == signal.SIGINT
        print("finished the step")
        os._exit(0)
    """))
    env = dict(os.environ)
    env.pop("TORCHELASTIC_RUN_ID", None)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == want, done.stdout + done.stderr


def test_a_signal_while_a_stopped_process_exits_does_not_kill_it(tmp_path):
    """After a stop (last.pt written), the interpreter's shutdown would put the default
    handler back - death by the signal, not exit 130 - so a second Ctrl-C that arrives then
    is ignored: the process is exiting anyway, with the first signal's code."""
    script = tmp_path / "int_exit.py"
    script.write_text(textwrap.dedent("""
        import atexit, os, signal, sys, time
        from capsctl.training.signals import SignalStop

        def late():  # registered first, so it runs after the hooks registered below
            print(*(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT,
                                                                     signal.SIGTERM)))
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            print("still exiting")
            sys.stdout.flush()

        atexit.register(late)
        with SignalStop(under_agent=False) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.received == signal.SIGINT
        sys.exit(130)
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 130, done.stdout + done.stderr
    assert done.stdout.split() == ["True", "True", "still", "exiting"], \
        done.stdout + done.stderr
