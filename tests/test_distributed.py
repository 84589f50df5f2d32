"""Distributed data parallel on CPU (gloo, 2 processes under torchrun) equals one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO

TINY = ["--set", "model.conv1_channels=8", "--set", "model.primary_types=2",
        "--set", "model.primary_dim=4", "--set", "model.class_dim=6",
        "--set", "model.decoder_hidden=[16,32]", "--set", "train.batch_size=16",
        "--set", "data.val_size=32", "--set", "train.log_every=2",
        "--set", "optim.lr=0.01", "--set", "model.transform_init_std=0.1",
        "--set", "train.eval_batch_size=16"]
CONFIG = str(REPO / "configs" / "mnist-quick.yaml")
# The tolerance: gradients are averaged by an all-reduce, whose summation order differs from one
# process's; after 10 Adam steps the weights agree to about 1e-6.
ATOL = 1e-4


def env(**extra):
    e = dict(os.environ, OMP_NUM_THREADS="1", CAPSCTL_DIST_TIMEOUT="30")
    e.update(extra)
    return e


def capsctl(*args, nproc=1, timeout=240, **kw):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "capsctl", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "capsctl", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(),
                          cwd=REPO, **kw)


def train_args(tmp_path, name, data, steps=10):
    return ["train", CONFIG, "--run-dir", tmp_path, "--name", name, "--data-root", data,
            "--no-progress", "--set", f"train.max_steps={steps}", *TINY]


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one(tmp_path, fake_mnist):
    one = capsctl(*train_args(tmp_path, "one", fake_mnist))
    assert one.returncode == 0, one.stderr[-2000:]
    two = capsctl(*train_args(tmp_path, "two", fake_mnist), nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "two/checkpoints/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 10
    assert set(a["model"]) == set(b["model"])            # no "module." prefixes
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=ATOL), k
    ra, rb = rows(tmp_path / "one"), rows(tmp_path / "two")
    # only rank 0 writes: the same rows, not twice as many
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in ("train/loss_total", "val/accuracy", "test/accuracy"):
            if key in x:
                assert abs(x[key] - y[key]) < 1e-3, (key, x[key], y[key])
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())

    # the DDP checkpoint loads in a single-process eval, and a distributed eval agrees exactly
    ck = tmp_path / "two/checkpoints/best.pt"
    single = capsctl("eval", ck, "--data-root", fake_mnist, "--json", "--batch-size", "16")
    assert single.returncode == 0, single.stderr
    multi = capsctl("eval", ck, "--data-root", fake_mnist, "--json", "--batch-size", "16",
                    nproc=2)
    assert multi.returncode == 0, multi.stderr[-2000:]
    s, m = json.loads(single.stdout), json.loads(multi.stdout.strip().splitlines()[-1])
    assert (s["n"], s["correct"]) == (m["n"], m["correct"])

    # and it resumes on one process
    res = capsctl("train", "--resume", tmp_path / "two", "--data-root", fake_mnist,
                  "--no-progress", "--set", "train.max_steps=12")
    assert res.returncode == 0, res.stderr[-2000:]


def start_two_ranks(tmp_path, name, data, extra, ready):
    """A long 2-process run in its own session; returns (torchrun process, worker pids) once
    ``ready(run_folder)`` holds."""
    args = train_args(tmp_path, name, data, steps=100000) + ["--set", "train.epochs=1000", *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", "-m", "capsctl", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(), cwd=REPO, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ready(tmp_path / name):
        time.sleep(0.2)
    assert ready(tmp_path / name), "training never got going"
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                             text=True).stdout.split()
    assert len(workers) == 2, workers
    return proc, [int(w) for w in workers]


def finish(proc, what: str) -> str:
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"{what}: {err[-3000:]}")
    assert proc.returncode != 0
    return err


def test_a_dead_rank_ends_the_run(tmp_path, fake_mnist):
    last = tmp_path / "dead" / "checkpoints" / "last.pt"
    proc, workers = start_two_ranks(tmp_path, "dead", fake_mnist,
                                    ["--set", "train.checkpoint_every=2"],
                                    lambda run: (run / "checkpoints" / "last.pt").exists())
    os.kill(workers[-1], signal.SIGKILL)
    err = finish(proc, "the surviving rank hung after its peer died")
    assert "SIGKILL" in err or "peer" in err or "exitcode" in err, err[-2000:]
    # the run folder is still loadable
    assert torch.load(last, weights_only=True)["step"] >= 2


def test_sigterm_on_one_rank_stops_all_with_a_checkpoint(tmp_path, fake_mnist):
    def started(run):
        return (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()

    proc, workers = start_two_ranks(tmp_path, "term", fake_mnist,
                                    ["--set", "train.checkpoint_every=0"], started)
    os.kill(workers[-1], signal.SIGTERM)       # rank 1 only
    err = finish(proc, "the ranks did not stop together after SIGTERM on one of them")
    last = tmp_path / "term" / "checkpoints" / "last.pt"
    assert last.exists(), err[-2000:]               # written by rank 0 for the signal on rank 1
    assert "Resume with: capsctl train --resume" in err, err[-2000:]
    state = torch.load(last, weights_only=True)
    assert state["step"] >= 1
    res = capsctl("train", "--resume", tmp_path / "term", "--data-root", fake_mnist,
                  "--no-progress", "--set", f"train.max_steps={state['step'] + 2}",
                  "--set", "train.epochs=1000")
    assert res.returncode == 0, res.stderr[-2000:]
