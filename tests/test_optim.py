"""capsctl's Adam (torch's fused kernel without torch.optim) against torch.optim.Adam(fused=True):
the same weights bit for bit, state dicts that move between the two, and no torch._dynamo; the
probe of the private kernel and ``build``'s fallback to torch.optim.Adam(fused=True)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from capsctl import optim
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


def test_a_training_step_does_not_import_dynamo():
    """torch.optim imports torch._dynamo (about 150 MB of resident memory) on construction, and
    so would a torch.library.custom_op's eager call: a CapsNet step (the routed layer's kernel
    operator) with the trainer's optimizer must load neither."""
    code = ("import sys, torch\n"
            "from tests.conftest import tiny_config\n"
            "from capsctl.models import build_model\n"
            "from capsctl.training import build_optimizer\n"
            "cfg = tiny_config()\n"
            "m = build_model(cfg.model)\n"
            "opt = build_optimizer(m, cfg)\n"
            "m(torch.rand(2, 1, 28, 28))['scores'].sum().backward(); opt.step()\n"
            "print(type(opt).__name__, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["FusedAdam", "False"]


@pytest.fixture
def fresh_probe(monkeypatch):
    """The probe's kept answer forgotten for this test (and restored after it)."""
    monkeypatch.setattr(optim, "_probe", {})
    monkeypatch.delenv(optim.ENV_SWITCH, raising=False)


def _no_such_op(*args, **kwargs):
    torch._no_such_fused_adam_(*args)  # AttributeError: the op is gone


def _changed_signature(params, grads, exp_avgs, exp_avg_sqs, steps, *hyper):
    torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, unknown_flag=True)


def _wrong_result(*args, **kwargs):
    pass  # runs, but does not step: the closed-form check fails


@pytest.mark.parametrize("broken", [_no_such_op, _changed_signature, _wrong_result])
def test_a_failed_probe_builds_torch_fused_adam_and_is_asked_once(fresh_probe, monkeypatch,
                                                                  broken):
    calls = []
    monkeypatch.setattr(optim, "_fused_step", lambda *a: (calls.append(1), broken(*a)))
    for _ in range(2):
        opt = optim.build(_model().parameters(), **HP)
        assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["fused"] is True
    assert len(calls) == 1  # the probe ran once; its answer was kept


def test_the_probe_passes_on_this_torch(fresh_probe):
    assert optim.fused_kernel_works()
    assert isinstance(optim.build(_model().parameters(), **HP), FusedAdam)


def test_the_switch_builds_torch_fused_adam_without_probing(fresh_probe, monkeypatch):
    monkeypatch.setenv(optim.ENV_SWITCH, "0")
    opt = optim.build(_model().parameters(), **HP)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["fused"] is True
    assert optim._probe == {}
    monkeypatch.setenv(optim.ENV_SWITCH, "1")  # read each time, never kept
    assert isinstance(optim.build(_model().parameters(), **HP), FusedAdam)


def test_the_fallback_is_bitwise_the_fast_path_and_checkpoints_cross(fresh_probe, monkeypatch):
    """build() with the switch off and on: the same weights and state after 4 steps, and a
    state_dict of 2 steps of either resumes in the other to the same 4-step weights."""
    def built(off: bool, model):
        monkeypatch.setenv(optim.ENV_SWITCH, "0" if off else "1")
        return optim.build(model.parameters(), **HP)

    runs = {}
    for off in (False, True):
        m = _model()
        opt = built(off, m)
        _train(m, opt, 4)
        runs[off] = (m, opt.state_dict())
    assert type(built(True, _model())) is not type(built(False, _model()))
    for p, q in zip(runs[False][0].parameters(), runs[True][0].parameters()):
        assert torch.equal(p, q)
    for k, s in runs[True][1]["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(runs[False][1]["state"][k][name], s[name])
    for first_off in (False, True):
        m = _model()
        o1 = built(first_off, m)
        _train(m, o1, 2)
        o2 = built(not first_off, m)
        o2.load_state_dict(o1.state_dict())
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            torch.randn(5, 1, 8, 8, generator=g)
        for _ in range(2):
            o2.zero_grad(set_to_none=True)
            m(torch.randn(5, 1, 8, 8, generator=g)).square().mean().backward()
            o2.step()
        for p, q in zip(m.parameters(), runs[False][0].parameters()):
            assert torch.equal(p, q)
