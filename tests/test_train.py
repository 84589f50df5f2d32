"""The trainer end to end on small synthetic data: run folder, checkpoints, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from capsctl import checkpoint
from capsctl.config import Config, from_dict, to_dict
from capsctl.errors import CapsctlError, CheckpointError, TrainingError
from capsctl.training import lr_at, prepare_run_dir, train
from conftest import tiny_config

CPU = torch.device("cpu")


def run(cfg, folder, root, resume=False):
    return train(cfg, folder, CPU, data_root=str(root), resume=resume, show_progress=False)


def test_run_folder_layout_and_learning(tmp_path, fake_mnist):
    cfg = tiny_config(train={"epochs": 3}, optim={"lr": 0.01}, model={"transform_init_std": 0.1})
    folder = prepare_run_dir(tmp_path / "runs", "t", force=False)
    summary = run(cfg, folder, fake_mnist)
    assert (folder / "config.yaml").is_file()
    assert (folder / "checkpoints" / "last.pt").is_file()
    assert (folder / "checkpoints" / "best.pt").is_file()
    assert any((folder / "tb").iterdir())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss_total" in r]
    assert train_rows[-1]["train/loss_total"] < train_rows[0]["train/loss_total"]
    assert sum("val/accuracy" in r for r in rows) == 3
    assert any("test/accuracy" in r for r in rows)
    assert summary["steps"] == 3 * (224 // 16)
    assert summary["best_val_accuracy"] > 0.5      # the synthetic classes are easy
    # the checkpoint carries the resolved config: eval needs nothing else
    state = checkpoint.load(folder / "checkpoints" / "best.pt")
    assert from_dict(state["config"]) == cfg
    assert state["format_version"] == checkpoint.FORMAT_VERSION


@pytest.mark.parametrize("stop_at", [5, 14, 20])   # mid-epoch, epoch boundary, 2nd epoch
def test_resume_is_exact(tmp_path, fake_mnist, stop_at):
    cfg = tiny_config(train={"epochs": 2})
    a = prepare_run_dir(tmp_path, "a", False)
    run(cfg, a, fake_mnist)
    b = prepare_run_dir(tmp_path, "b", False)
    first = tiny_config(train={"epochs": 2, "max_steps": stop_at})
    run(first, b, fake_mnist)
    assert checkpoint.load(b / "checkpoints" / "last.pt")["step"] == stop_at
    run(cfg, b, fake_mnist, resume=True)
    wa = checkpoint.load(a / "checkpoints" / "last.pt")
    wb = checkpoint.load(b / "checkpoints" / "last.pt")
    assert wa["step"] == wb["step"] == 28
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    rows = lambda f: {r["step"]: r for r in map(json.loads, (f / "metrics.jsonl").read_text()
                                                .splitlines()) if "train/loss_total" in r}
    ra, rb = rows(a), rows(b)
    for step in ra:
        if step > stop_at:
            assert ra[step]["train/loss_total"] == rb[step]["train/loss_total"], step
            assert ra[step]["train/accuracy"] == rb[step]["train/accuracy"], step


def test_lr_schedule_matches_the_authors():
    cfg = Config()
    assert lr_at(cfg, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 2000) == pytest.approx(0.96e-3)
    assert lr_at(cfg, 1000) == pytest.approx(1e-3 * 0.96 ** 0.5)   # smooth, not staircase
    assert lr_at(cfg, 10_000_000) == pytest.approx(1e-6)           # floor


def test_run_folder_is_never_overwritten(tmp_path):
    f = prepare_run_dir(tmp_path, "r", False)
    (f / "mine.txt").write_text("keep me")
    with pytest.raises(CapsctlError, match="already exists"):
        prepare_run_dir(tmp_path, "r", False)
    prepare_run_dir(tmp_path, "r", True)
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(moved) == 1 and (moved[0] / "mine.txt").read_text() == "keep me"


def test_nonfinite_loss_stops_and_keeps_last_good(tmp_path, fake_mnist):
    cfg = tiny_config(train={"epochs": 1, "checkpoint_every": 2, "log_every": 4},
                      optim={"lr": 1e30, "min_lr": 1e30})
    folder = prepare_run_dir(tmp_path, "nan", False)
    with pytest.raises(TrainingError, match="non-finite loss at step") as e:
        run(cfg, folder, fake_mnist)
    assert "margin=" in str(e.value)
    last = folder / "checkpoints" / "last.pt"
    if last.exists():   # any checkpoint written holds finite weights
        state = checkpoint.load(last)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    cfg = tiny_config()
    from capsctl.models import build_model

    model = build_model(cfg.model)
    checkpoint.save(tmp_path / "c.pt", {"model": model.state_dict(), "config": to_dict(cfg)})
    loaded, cfg2, _ = checkpoint.load_model(tmp_path / "c.pt", CPU)
    assert cfg2 == cfg
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert not list(tmp_path.glob(".*.tmp"))            # the temp file was renamed away
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "junk.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "trunc.pt")
    checkpoint.save(tmp_path / "new.pt", {"model": {}, "config": {}})
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    state["format_version"] = 99
    torch.save(state, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="newer"):
        checkpoint.load(tmp_path / "new.pt")
    other = tiny_config(model={"class_dim": 7})
    checkpoint.save(tmp_path / "mismatch.pt", {"model": model.state_dict(),
                                               "config": to_dict(other)})
    with pytest.raises(CheckpointError, match="do not match"):
        checkpoint.load_model(tmp_path / "mismatch.pt", CPU)


def test_reconstructions_are_logged_through_the_model_contract(fake_mnist):
    from capsctl.data.build import build
    from capsctl.models import build_model
    from capsctl import tasks
    from capsctl.training.loop import _log_reconstructions

    class Images:
        def __init__(self):
            self.seen = []

        def image(self, tag, img, step):
            self.seen.append((tag, img.shape[0], step))

    cfg = tiny_config()
    data = build(cfg, CPU, str(fake_mnist))
    for model_section, want in (({}, [("reconstructions", 3, 7)]),
                                ({"name": "cnn", "channels": [4, 4], "hidden": [8],
                                  "pool": [2, 2]}, [])):   # no decoder: nothing to draw
        model = build_model(tiny_config(model=model_section).model).train()
        writer = Images()
        _log_reconstructions(model, data.val, tasks.get(data.task), writer, 7, CPU, "fp32")
        assert writer.seen == want
        assert model.training                  # back in training mode
