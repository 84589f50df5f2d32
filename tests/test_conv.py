"""The convolution formulations (capsctl/models/conv.py): each computes what torch's convolution
computes (outputs and all three gradients), the choice is measured once and cached, forced by
the switch, never touches the global random state; a fp32 training run on the fast formulation
stays within 1e-4 of the pinned one over 30 steps; FLOPs per image are counted from the layer
shapes; bench reports the peak, the fractions and the profile; the GPU check refuses on a CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from capsctl import flops, step_profile as profile
from capsctl.cli import app, bench as cli_bench
from capsctl.config import load as load_config
from capsctl.models import build_model, conv
from conftest import REPO, tiny_config

runner = CliRunner()
SHAPES = [  # (in, out, kernel, stride, padding, bias, input side)
    (6, 8, 9, 2, 0, True, 20),    # PrimaryCaps' shape, small
    (3, 5, 5, 1, 2, True, 12),    # the CNN baseline's padded 5x5
    (4, 7, 3, 2, 1, False, 9),    # odd sides, no bias
]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPSCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(conv, "_choices", {})
    monkeypatch.setattr(conv, "_loaded", [False])
    return tmp_path / "cache" / "kernels" / conv.CACHE_FILE


def _grads(m, x, how, autocast):
    x = x.detach().clone().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = conv.run(m, x, how)
    (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return [y.float(), x.grad, m.weight.grad] + ([m.bias.grad] if m.bias is not None else [])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("how", ["channels-last", "wgrad-gemm"])
def test_each_formulation_computes_the_convolution_and_its_gradients(shape, how, monkeypatch):
    cin, cout, k, s, p, bias, side = shape
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)  # wgrad-gemm: one example a chunk, summed
    torch.manual_seed(0)
    m = conv.Conv2d(cin, cout, k, s, p, bias=bias).double()
    x = torch.randn(3, cin, side, side, dtype=torch.float64)
    for got, want in zip(_grads(m, x, how, False), _grads(m, x, "onednn", False)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    m = m.float()
    x = x.float()
    for got, want in zip(_grads(m, x, how, True), _grads(m, x, "onednn", True)):
        assert got.dtype == want.dtype
        assert (got - want).abs().max() <= 3e-2 * want.abs().max()  # bf16 rounding only


def test_forced_formulation_runs_where_it_applies(monkeypatch):
    plain = conv.Conv2d(4, 8, 3)
    grouped = conv.Conv2d(4, 8, 3, groups=4)
    x = torch.rand(2, 4, 8, 8, requires_grad=True)
    monkeypatch.setenv(conv.ENV_SWITCH, "wgrad-gemm")
    plain(x).sum().backward()
    grouped(x).sum().backward()
    assert plain.last == "wgrad-gemm" and grouped.last == "onednn"
    with torch.no_grad():  # inference has no weight gradient to compute
        plain(x)
    assert plain.last == "onednn"
    with conv.forced("channels-last"):
        plain(x)
    assert plain.last == "channels-last"


def test_auto_measures_once_caches_and_keeps_the_random_state(fresh_cache, monkeypatch):
    monkeypatch.setenv(conv.ENV_SWITCH, "auto")
    monkeypatch.setattr(conv, "MIN_FLOPS", 0.0)
    calls = []

    def fake_measure(c, x, options, train, reps=3):
        calls.append(tuple(options))
        return {"onednn": 3.0, "channels-last": 2.0, "wgrad-gemm": 1.0}

    monkeypatch.setattr(conv, "measure", fake_measure)
    m = conv.Conv2d(4, 8, 3, 2)
    x = torch.rand(2, 4, 9, 9, requires_grad=True)
    m(x).sum().backward()
    m(x).sum().backward()
    assert m.last == "wgrad-gemm" and calls == [conv.FORMULATIONS]
    stored = json.loads(fresh_cache.read_text())
    assert list(stored.values()) == ["wgrad-gemm"]
    # a new process reads the file and does not measure
    monkeypatch.setattr(conv, "_choices", {})
    monkeypatch.setattr(conv, "_loaded", [False])
    m(x).sum().backward()
    assert len(calls) == 1 and m.last == "wgrad-gemm"
    conv.forget()
    assert not fresh_cache.exists()
    with torch.no_grad():  # inference is a choice of its own, among the forward formulations
        m(x)
    assert calls[-1] == conv.FORMULATIONS[:2] and m.last == "channels-last"


def test_a_real_measurement_leaves_the_global_random_state_alone(fresh_cache, monkeypatch):
    monkeypatch.setenv(conv.ENV_SWITCH, "auto")
    monkeypatch.setattr(conv, "MIN_FLOPS", 0.0)
    m = conv.Conv2d(4, 8, 3, 2)
    x = torch.rand(2, 4, 9, 9, requires_grad=True)
    before = torch.get_rng_state()
    m(x).sum().backward()
    assert torch.equal(before, torch.get_rng_state())
    assert m.last in conv.FORMULATIONS and fresh_cache.is_file()


def test_small_convolutions_are_not_measured(fresh_cache, monkeypatch):
    monkeypatch.setenv(conv.ENV_SWITCH, "auto")
    monkeypatch.setattr(conv, "measure", lambda *a, **k: pytest.fail("measured"))
    m = conv.Conv2d(4, 8, 3)
    m(torch.rand(2, 4, 9, 9, requires_grad=True)).sum().backward()
    assert m.last == "onednn" and not fresh_cache.exists()


def test_the_fast_fp32_formulation_trains_within_1e_4_of_the_pinned_one(monkeypatch):
    """30 steps of a tiny CapsNet on fixed batches: the losses on wgrad-gemm stay within 1e-4
    relative of torch's convolution (which the golden run pins bitwise)."""
    cfg = tiny_config()
    losses = {}
    for how in ("onednn", "wgrad-gemm"):
        monkeypatch.setenv(conv.ENV_SWITCH, how)
        torch.manual_seed(0)
        model = build_model(cfg.model)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(30):
            x = torch.rand(8, 1, 28, 28, generator=g)
            y = torch.randint(0, 10, (8,), generator=g)
            r = model(x, y)
            loss = F.relu(0.9 - r["scores"]).pow(2).mean() + (r["recon"] - x.flatten(1)).pow(
                2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        losses[how] = torch.tensor(out, dtype=torch.float64)
        assert model.primary.conv.last == how
    rel = ((losses["wgrad-gemm"] - losses["onednn"]).abs() / losses["onednn"]).max()
    assert rel < 1e-4


def test_bad_switch_is_one_line(monkeypatch):
    monkeypatch.setenv(conv.ENV_SWITCH, "onednn")  # the command sets it for its process
    r = runner.invoke(app, ["bench", "--conv", "fastest"])
    assert r.exit_code == 2
    assert "expected auto or one of onednn, channels-last, wgrad-gemm" in r.output
    assert cli_bench.CONV_FORMULATIONS == conv.FORMULATIONS
    assert cli_bench.CONV_SWITCH == conv.ENV_SWITCH


def test_flops_of_the_paper_model_are_its_layer_shapes():
    cfg = load_config(REPO / "configs/mnist.yaml", [])
    model = build_model(cfg.model)
    r = flops.count(model, torch.rand(2, 1, 28, 28), torch.tensor([1, 2]))
    conv1 = 2 * 20 * 20 * 256 * 81
    primary = 2 * 6 * 6 * 256 * 256 * 81
    predictions = 2 * 1152 * 10 * 16 * 8
    routing = 2 * 1152 * 10 * 16 * (3 + 2)  # 3 weighted sums, 2 agreements
    decoder = 2 * (160 * 512 + 512 * 1024 + 1024 * 784)
    assert r["modules"]["CapsNet.conv1"] == conv1
    assert r["modules"]["CapsNet.primary"] == primary
    assert r["modules"]["CapsNet.decoder"] == decoder
    assert r["modules"]["CapsNet.digits"] == pytest.approx(predictions + routing, rel=0.02)
    assert r["forward"] == pytest.approx(conv1 + primary + predictions + routing + decoder,
                                         rel=1e-3)
    assert r["train"] == 3 * r["forward"] - conv1
    assert flops.conv_bound(model.conv1, model.primary.conv, torch.rand(1, 1, 28, 28)) == \
        2 * conv1 + 3 * primary


def test_bench_reports_peak_flops_fractions_and_profile(monkeypatch):
    monkeypatch.setenv(conv.ENV_SWITCH, "onednn")
    tiny = ["--set", "model.conv1_channels=8", "--set", "model.primary_types=2",
            "--set", "model.primary_dim=4", "--set", "model.class_dim=6",
            "--set", "model.decoder_hidden=[16,32]", "--batch-size", "8", "--large-batch", "16",
            "--steps", "2", "--warmup", "1"]
    r = runner.invoke(app, ["bench", *tiny, "--json", "--profile"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert set(rep["peak_gflops"]) == {"fp32"} and rep["peak_gflops"]["fp32"] > 0
    for phase in ("train", "infer", "infer_large", "conv_bound"):
        p = rep[phase]
        assert p["flops_per_image"] == rep["flops_per_image"][phase] > 0
        assert p["gflops"] == pytest.approx(p["flops_per_image"] * p["images_per_s"] / 1e9)
        assert p["fraction_of_peak"] == pytest.approx(p["gflops"] / rep["peak_gflops"]["fp32"])
    both = {"train": "onednn", "infer": "onednn"}
    assert rep["conv_formulations"] == {"mode": "onednn", "conv1": both, "primary.conv": both}
    cats = rep["profile"]["step"]["categories"]
    assert "convolution forward" in cats and "optimizer" in cats
    assert set(rep["profile"]["step"]["parts"]) >= {"forward", "loss", "backward", "optimizer"}
    assert [c["conv"] for c in rep["profile"]["convolutions"]] == ["conv1", "primary.conv"]
    r = runner.invoke(app, ["bench", *tiny, "--profile", "--conv", "wgrad-gemm",
                            "--set", "train.precision=bf16"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for text in ("matrix-product peak: bf16", "fp32", "GFLOP/s", "of peak",
                 "where a training step's time goes", "conv backward-weight",
                 "each convolution alone", "train wgrad-gemm; infer onednn (wgrad-gemm)"):
        assert text in r.stdout, text


def test_profile_categories_are_a_plain_prefix_table():
    assert profile.category("aten::mkldnn_convolution") == "convolution forward"
    assert profile.category("aten::convolution_backward") == \
        "convolution backward (data + weight)"
    assert profile.category("aten::_fused_adam_") == "optimizer"
    assert profile.category("aten::sigmoid") == profile.OTHER


def test_gpu_check_refuses_without_a_gpu(monkeypatch, capsys):
    from capsctl import device_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_check.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA device here")


FAMILIES = [  # tiny widths of every family with convolutions
    {},
    {"name": "efficient-capsnet", "conv_channels": [4, 6, 6, 8], "primary_dim": 4,
     "class_dim": 6, "decoder_hidden": [16, 32]},
    {"name": "cnn", "channels": [4, 6, 8], "hidden": [16, 12]},
    {"name": "em-capsnet", "conv1_channels": 8, "primary_types": 2, "caps1_types": 2,
     "caps2_types": 2},
]


@pytest.mark.parametrize("model", FAMILIES, ids=lambda m: m.get("name", "capsnet"))
def test_whole_models_agree_on_every_formulation(model, monkeypatch):
    """Scores, reconstructions, the loss and every parameter's gradient of a whole model are
    those of torch's convolution, on every formulation, each tensor to a fraction of its largest
    element: 1e-9 in fp64; EM capsules compute in fp32 inside (their routing's constants), and
    EM routing amplifies the last bits, so theirs to 1e-3."""
    monkeypatch.setattr(conv, "CHUNK_BYTES", 1)
    cfg = tiny_config(model=model)
    from capsctl.data.registry import DATASETS
    from capsctl.models import loss_fn

    losses_of = loss_fn(cfg, DATASETS[cfg.data.name].task)
    em = cfg.model.name == "em-capsnet"
    dtype, tol = (torch.float32, 1e-3) if em else (torch.float64, 1e-9)
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(3, 1, 28, 28, generator=g, dtype=dtype),
             "y": torch.tensor([1, 2, 3])}
    results = {}
    for name in conv.FORMULATIONS:
        monkeypatch.setenv(conv.ENV_SWITCH, name)
        torch.manual_seed(0)
        net = build_model(cfg.model).to(dtype)
        out = net(batch["x"], batch["y"])
        loss = losses_of(out, batch, 0)["total"]
        loss.backward()
        results[name] = [t.detach() for t in (out["scores"], out.get("recon", loss), loss)] + [
            p.grad for p in net.parameters() if p.grad is not None]
        assert any(isinstance(m, conv.Conv2d) and m.last == name for m in net.modules())
    for how in conv.FORMULATIONS[1:]:
        for got, want in zip(results[how], results["onednn"], strict=True):
            assert (got - want).abs().max() <= tol * want.abs().max(), how
