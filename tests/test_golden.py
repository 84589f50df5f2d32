"""The redesigned trainer reproduces the golden run of the release before it (capsctl 0.1.0,
tests/fixtures/format1/make.py): every logged loss term, the final weights, and the 10 steps
resumed from that release's format-1 last.pt."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from capsctl import checkpoint
from capsctl.training import prepare_run_dir, train
from conftest import cpu_kind, tiny_config, write_fake_mnist

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "format1"
GOLDEN = json.loads((FIXTURES / "golden.json").read_text())
CPU = torch.device("cpu")
LOSS_ATOL = 1e-6
SUM_RTOL = 1e-6


def golden_config():
    """make.py's golden_config, built through today's tiny_config."""
    return tiny_config(train={"epochs": 3, "max_steps": 30, "log_every": 1,
                              "checkpoint_every": 10, "seed": 0},
                       optim={"lr": 0.01}, model={"transform_init_std": 0.1})


def weights_digest(model_state: dict) -> dict:
    """make.py's digest: per-tensor float64 sums and one sha256 over the sorted tensors."""
    sums = {k: float(v.double().sum()) for k, v in model_state.items()}
    h = hashlib.sha256()
    for k in sorted(model_state):
        h.update(k.encode())
        h.update(model_state[k].detach().contiguous().numpy().tobytes())
    return {"sums": sums, "sha256": h.hexdigest()}


def logged_losses(folder: Path, after: int = 0) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith("train/loss_") or k == "step"}
            for r in rows if "train/loss_total" in r and r["step"] > after]


def assert_losses_match(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w), g["step"]
        for k in w:
            assert abs(g[k] - w[k]) <= LOSS_ATOL, (g["step"], k, g[k], w[k])


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # as make.py ran: the summation order of one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_mnist(tmp_path_factory.mktemp("golden") / "mnist")


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory, data, one_thread) -> Path:
    folder = prepare_run_dir(tmp_path_factory.mktemp("runs"), "golden", force=False)
    train(golden_config(), folder, CPU, data_root=str(data), show_progress=False)
    return folder


def test_golden_config_is_the_recorded_one():
    # make.py's config, as the format-1 checkpoint recorded it, migrated: the same run
    state = checkpoint.load(FIXTURES / "capsnet-last.pt")
    assert checkpoint.config_of(state) == golden_config()


def test_every_logged_loss_matches_the_golden_run(golden_run):
    assert_losses_match(logged_losses(golden_run), GOLDEN["losses"])


def test_final_weights_match_the_golden_run(golden_run):
    """Per-tensor sums within 1e-6 on any build; bitwise (sha256) on the torch build the golden
    run was made with (the one `make install` pins), on every kind of CPU for which release
    0.1.0's own golden run is recorded (make.py run there: golden.json's sha256_by_cpu)."""
    state = checkpoint.load(golden_run / "checkpoints" / "last.pt")
    assert state["step"] == 30
    got, want = weights_digest(state["model"]), GOLDEN["weights"]
    assert set(got["sums"]) == set(want["sums"])
    for k, v in want["sums"].items():
        assert math.isclose(got["sums"][k], v, rel_tol=SUM_RTOL, abs_tol=1e-12), \
            (k, got["sums"][k], v)
    known = want["sha256_by_cpu"]
    assert want["sha256"] == known[GOLDEN["made_with"]["cpu"]]
    if torch.__version__ == GOLDEN["made_with"]["torch"] and cpu_kind() in known:
        assert got["sha256"] == known[cpu_kind()]


def test_resuming_the_format1_checkpoint_matches_the_golden_run(tmp_path, data, one_thread):
    folder = prepare_run_dir(tmp_path, "resumed", force=False)
    last = folder / "checkpoints" / "last.pt"
    shutil.copy(FIXTURES / "capsnet-last.pt", last)
    cfg = checkpoint.config_of(checkpoint.load(last))   # format 1, migrated on load
    cfg.train.max_steps = 40
    summary = train(cfg, folder, CPU, data_root=str(data), resume=True, show_progress=False)
    assert summary["steps"] == 40
    assert_losses_match(logged_losses(folder, after=30), GOLDEN["resumed_losses"])
    state = checkpoint.load(last)
    assert state["step"] == 40 and state["format_version"] == checkpoint.FORMAT_VERSION
