"""capsctl bench on a tiny model: every phase and field is measured and printed; the train phase
is the trainer's own step; models without Conv1 + PrimaryCaps get no bound; torch.compile falls
back with one warning."""

from __future__ import annotations

import json

import torch
from torch import nn
from typer.testing import CliRunner

from capsctl import bench
from capsctl.cli import app
from capsctl.device import compile_model, resolve
from capsctl.training import lr_at
from conftest import tiny_config

runner = CliRunner()
TINY = ["--set", "model.conv1_channels=8", "--set", "model.primary_types=2",
        "--set", "model.primary_dim=4", "--set", "model.class_dim=6",
        "--set", "model.decoder_hidden=[16,32]"]
FAST = ["--batch-size", "8", "--large-batch", "16", "--steps", "2", "--warmup", "1"]


def _check_phase(p: dict, batch: int) -> None:
    assert set(p) == set(bench.PHASE_KEYS)
    assert p["batch"] == batch
    assert p["images_per_s"] > 0 and p["step_ms"] > 0 and p["step_ms_min"] <= p["step_ms"]
    assert abs(p["images_per_s"] - batch / (p["step_ms"] / 1e3)) < 1e-6 * p["images_per_s"]
    assert p["user_ms"] >= 0 and p["sys_ms"] >= 0
    assert p["peak_mem"] > 0


def test_bench_json_has_every_key():
    r = runner.invoke(app, ["bench", *TINY, *FAST, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert set(bench.KEYS) <= set(report)
    assert report["torch"] == torch.__version__ and report["threads"] >= 1
    assert report["dtype"] == "fp32" and report["device_type"] == "cpu"
    assert report["batch_size"] == 8 and report["large_batch"] == 16 and report["steps"] == 2
    for name in ("train", "infer", "conv_bound"):
        _check_phase(report[name], 8)
    _check_phase(report["infer_large"], 16)
    assert report["train_vs_bound"] == report["train"]["images_per_s"] / \
        report["conv_bound"]["images_per_s"]
    assert 0 < report["train_vs_bound_cpu"]
    assert report["mem_kind"].startswith("peak RSS")


def test_bench_table_prints_every_field():
    r = runner.invoke(app, ["bench", *TINY, *FAST, "--set", "train.precision=bf16"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = r.stdout
    for field in ("train step", "inference", "inference, large batch", "conv-only bound",
                  "images/s", "ms/step", "user ms/step", "sys ms/step", "peak RSS",
                  "train / conv-only bound:", "by CPU time", "bf16", f"torch {torch.__version__}",
                  "threads", "compile off", "resident before the first step"):
        assert field in text, field


def test_bench_times_the_trainers_own_step_with_its_learning_rate(monkeypatch):
    real, lrs = bench.train_step, []

    def spy(step_model, opt, batch, task, losses_of, lr, step, *rest):
        lrs.append(lr)
        assert opt.param_groups[0]["lr"] != lr or step == 0
        out = real(step_model, opt, batch, task, losses_of, lr, step, *rest)
        assert opt.param_groups[0]["lr"] == lr       # set by the step itself
        return out

    monkeypatch.setattr(bench, "train_step", spy)
    cfg = tiny_config(optim={"lr_decay": 0.5, "lr_decay_steps": 1})
    bench.run(cfg, resolve("cpu"), batch_size=4, large_batch=8, steps=2, warmup=1)
    assert lrs == [lr_at(cfg, step) for step in range(3)]    # 1 warm-up + 2 timed steps
    assert lrs[0] > lrs[1] > lrs[2]


def test_bench_reports_no_bound_for_a_model_without_primary_capsules(monkeypatch):
    class TinyCNN(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
            self.head = nn.Linear(16, m.num_classes)

        def forward(self, x, y=None, keep_routing=False):
            return {"scores": torch.sigmoid(self.head(self.features(x).flatten(1)))}

    monkeypatch.setattr(bench, "build_model", TinyCNN)
    report = bench.run(tiny_config(), resolve("cpu"), batch_size=4, large_batch=8, steps=1,
                       warmup=1)
    assert report["conv_bound"] is None and report["train_vs_bound"] is None
    assert report["train_vs_bound_cpu"] is None
    _check_phase(report["train"], 4)
    _check_phase(report["infer_large"], 8)


def test_bench_rejects_bad_counts_in_one_line():
    r = runner.invoke(app, ["bench", *TINY, "--steps", "0"])
    assert r.exit_code == 2
    assert "--steps" in r.output and "Traceback" not in r.output


def test_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(model, **kw):
        def fn(*a, **k):
            raise RuntimeError("no working C++ compiler\nsecond line")
        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    warnings = []
    lin = nn.Linear(3, 2)
    step = compile_model(lin, True, warnings.append)
    x = torch.randn(4, 3)
    assert torch.equal(step(x), lin(x))
    assert torch.equal(step(x), lin(x))
    assert len(warnings) == 1 and "no working C++ compiler" in warnings[0]
    assert "second line" not in warnings[0]
    assert compile_model(lin, False, warnings.append) is lin
