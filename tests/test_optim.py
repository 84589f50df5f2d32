"""capsctl's Adam (torch's fused kernel without torch.optim) against torch.optim.Adam(fused=True):
the same weights bit for bit, state dicts that move between the two, and no torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from capsctl.optim import FusedAdam

HP = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-3)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 3))


def _train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 1, 8, 8, generator=g)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()


def test_bitwise_equal_to_torch_fused_adam():
    a, b = _model(), _model()
    ours = FusedAdam(a.parameters(), **HP)
    ref = torch.optim.Adam(b.parameters(), fused=True, **HP)
    _train(a, ours, 4)
    _train(b, ref, 4)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert any((p - q0).abs().max() > 0 for p, q0 in zip(a.parameters(), _model().parameters()))
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert ours_sd["param_groups"] == ref_sd["param_groups"]
    for k, s in ref_sd["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours_sd["state"][k][name], s[name])


@pytest.mark.parametrize("first", ["ours", "torch"])
def test_state_dict_moves_between_the_two_and_resumes_exactly(first):
    """Train 3 steps with one optimizer, hand its state to the other, train 3 more: equal to 6
    uninterrupted steps."""
    make = {"ours": lambda ps: FusedAdam(ps, **HP),
            "torch": lambda ps: torch.optim.Adam(ps, fused=True, **HP)}
    second = "torch" if first == "ours" else "ours"
    straight = _model()
    _train(straight, make[first](straight.parameters()), 6)

    m = _model()
    o1 = make[first](m.parameters())
    _train(m, o1, 3)
    o2 = make[second](m.parameters())
    o2.load_state_dict(o1.state_dict())
    o2.param_groups[0]["lr"] = HP["lr"]
    # continue with the same data stream: steps 4-6 of seed 1
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        torch.randn(5, 1, 8, 8, generator=g)
    for _ in range(3):
        x = torch.randn(5, 1, 8, 8, generator=g)
        o2.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        o2.step()
    for p, q in zip(m.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_learning_rate_is_read_from_param_groups_each_step():
    m = _model()
    opt = FusedAdam(m.parameters(), **HP)
    opt.param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in m.parameters()]
    _train(m, opt, 1)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_mismatched_state_is_refused():
    opt = FusedAdam(_model().parameters(), **HP)
    other = torch.optim.Adam(torch.nn.Linear(3, 3).parameters(), fused=True, **HP)
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())


def test_building_the_trainers_optimizer_does_not_import_dynamo():
    """torch.optim imports torch._dynamo (about 150 MB of resident memory) on construction;
    the trainer's optimizer must not."""
    code = ("import sys, torch\n"
            "from capsctl.config import Config\n"
            "from capsctl.models import build_model\n"
            "from capsctl.train import build_optimizer\n"
            "cfg = Config()\n"
            "cfg.model.name = 'cnn'; cfg.model.cnn_channels = [4]; cfg.model.cnn_hidden = [8]\n"
            "m = build_model(cfg.model)\n"
            "opt = build_optimizer(m, cfg)\n"
            "m(torch.rand(2, 1, 28, 28))['scores'].sum().backward(); opt.step()\n"
            "print(type(opt).__name__, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["FusedAdam", "False"]
