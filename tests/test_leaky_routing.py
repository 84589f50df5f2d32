"""Leaky routing (``model.routing.leaky``, dynamic only): the layer against a per-example loop
of its equations, the "none-of-the-above" mass, the default path unchanged, the config check,
the state-dict keys shared with RoutedCapsules, and two training steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from capsctl.config import from_dict
from capsctl.errors import ConfigError
from capsctl.models import build_model
from capsctl.models.capsules import squash
from capsctl.models.routing.dynamic import RoutedCapsules
from capsctl.models.routing.leaky import LeakyRoutedCapsules
from conftest import tiny_config

B, I, J, P, D = 3, 7, 4, 5, 6


def leaky_reference(u_BIP, W_IJDP, iterations, bias_JD=None):
    """One example, child and parent at a time: b_ij = 0; each pass c_i = softmax([b_i1 ..
    b_iJ, 0])[:J], s_j = sum_i c_ij u_hat_j|i (+ bias_j), v_j = squash(s_j), b_ij += u_hat_j|i .
    v_j. Returns v (B, J, D) and the couplings (B, I, J) of every pass."""
    Bn, In, _ = u_BIP.shape
    Jn = W_IJDP.shape[1]
    vs, cs = [], [[] for _ in range(iterations)]
    for b in range(Bn):
        uh = [[W_IJDP[i, j] @ u_BIP[b, i] for j in range(Jn)] for i in range(In)]
        logits = [[torch.zeros((), dtype=u_BIP.dtype) for _ in range(Jn)] for _ in range(In)]
        for r in range(iterations):
            c = []
            for i in range(In):
                e = [torch.exp(logits[i][j]) for j in range(Jn)]
                total = sum(e) + math.exp(0.0)                  # the "none" logit, 0
                c.append([e[j] / total for j in range(Jn)])
            v = []
            for j in range(Jn):
                s = sum(c[i][j] * uh[i][j] for i in range(In))
                if bias_JD is not None:
                    s = s + bias_JD[j]
                v.append(squash(s))
            cs[r].append(torch.stack([torch.stack(row) for row in c]))
            for i in range(In):
                for j in range(Jn):
                    logits[i][j] = logits[i][j] + uh[i][j] @ v[j]
        vs.append(torch.stack(v))
    return torch.stack(vs), [torch.stack(c) for c in cs]


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, I, P, generator=g, dtype=dtype)
    W = torch.randn(I, J, D, P, generator=g, dtype=dtype) * 0.5
    return u, W


@pytest.mark.parametrize("iterations,bias", [(1, False), (3, False), (3, True)])
def test_leaky_layer_matches_a_loop_of_the_equations(iterations, bias):
    u, W = _inputs()
    layer = LeakyRoutedCapsules(I, J, P, D, iterations, bias=bias).double()
    with torch.no_grad():
        layer.W_IJDP.copy_(W)
        if bias:
            layer.bias_JD.copy_(torch.randn(J, D, dtype=torch.float64))
    u_layer = u.clone().requires_grad_(True)
    v, cs = layer(u_layer, keep_routing=True)
    u_ref = u.clone().requires_grad_(True)
    W_ref = W.clone().requires_grad_(True)
    v_ref, cs_ref = leaky_reference(u_ref, W_ref, iterations, layer.bias_JD)
    assert v.dtype == torch.float64 and v.shape == (B, J, D)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    assert len(cs) == iterations
    for c, c_ref in zip(cs, cs_ref):
        assert c.shape == (B, I, J)
        torch.testing.assert_close(c, c_ref, rtol=1e-10, atol=1e-12)
    # gradients through every pass
    g = torch.randn_like(v)
    (v * g).sum().backward()
    (v_ref * g).sum().backward()
    torch.testing.assert_close(u_layer.grad, u_ref.grad, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(layer.W_IJDP.grad, W_ref.grad, rtol=1e-9, atol=1e-11)


def test_leaky_layer_gradcheck():
    u, W = _inputs()
    layer = LeakyRoutedCapsules(I, J, P, D, 3, bias=True).double()
    with torch.no_grad():
        layer.W_IJDP.copy_(W)
    u.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (u,))


def test_a_child_can_route_to_no_parent():
    u, W = _inputs()
    layer = LeakyRoutedCapsules(I, J, P, D, 3).double()
    with torch.no_grad():
        layer.W_IJDP.copy_(W)
    _, cs = layer(u, keep_routing=True)
    for c in cs:
        total = c.sum(2)                                      # over the parents
        assert (total < 1).all() and (total > 0).all()
    # first pass: every logit 0, so c_ij = 1 / (J + 1)
    torch.testing.assert_close(cs[0], torch.full((B, I, J), 1.0 / (J + 1), dtype=torch.float64))


@pytest.mark.parametrize("bias", [False, True])
def test_leaky_false_is_routed_capsules_and_the_state_dicts_match(bias):
    torch.manual_seed(0)
    plain = build_model(tiny_config(model={"routing": {"class_bias": bias}}).model).eval()
    torch.manual_seed(0)
    leaky = build_model(tiny_config(model={"routing": {"class_bias": bias, "leaky": True}}
                                    ).model)
    assert type(plain.digits) is RoutedCapsules
    assert isinstance(leaky.digits, LeakyRoutedCapsules)
    assert plain.state_dict().keys() == leaky.state_dict().keys()
    assert {"digits.W_IJDP"} | ({"digits.bias_JD"} if bias else set()) == {
        k for k in plain.state_dict() if k.startswith("digits.")}
    for k, t in plain.state_dict().items():                 # the same init from the same seed
        torch.testing.assert_close(leaky.state_dict()[k], t, rtol=0, atol=0)
    leaky.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 28, 28)
    out_plain, out_leaky = plain(x), leaky.eval()(x)
    assert out_leaky["v"].shape == out_plain["v"].shape
    assert not torch.allclose(out_leaky["v"], out_plain["v"])   # the "none" parent matters


def test_plain_dynamic_is_untouched_by_the_option():
    """leaky false builds RoutedCapsules, which gives what the C kernel gives."""
    torch.manual_seed(1)
    model = build_model(tiny_config().model).eval()
    assert model.cfg.routing.leaky is False and type(model.digits) is RoutedCapsules
    torch.manual_seed(1)
    ref = RoutedCapsules(model.num_primary, 10, 4, 6, 3)
    ref.W_IJDP.data.copy_(model.digits.W_IJDP.data)
    u = torch.rand(2, model.num_primary, 4)
    v, cs = model.digits(u, keep_routing=True)
    v_ref, cs_ref = ref(u, keep_routing=True)
    torch.testing.assert_close(v, v_ref, rtol=0, atol=0)
    for c in cs:
        torch.testing.assert_close(c.sum(2), torch.ones(2, model.num_primary))


@pytest.mark.parametrize("routing", ["uniform", "self-attention", "inverted-dot-product"])
def test_leaky_with_another_routing_is_refused_in_one_line(routing):
    for doc in ({"routing": {"name": routing, "leaky": True}},
                {"routing": routing, "leaky_routing": True}):        # the flat key of format 2
        with pytest.raises(ConfigError) as e:
            from_dict({"model": doc})
        msg = str(e.value)
        assert "\n" not in msg and f"is not an option of routing {routing}" in msg
        assert "'model.routing.leaky'" in msg and "(it belongs to dynamic)" in msg
    # format 2 listed every flat key: leaky_routing false is what every routing did
    assert from_dict({"model": {"routing": routing, "leaky_routing": False}}
                     ).model.routing.name == routing


def test_config_reads_the_option():
    assert from_dict({}).model.routing.leaky is False
    assert from_dict({"model": {"routing": {"leaky": True}}}).model.routing.leaky is True
    assert from_dict({"model": {"leaky_routing": True}}).model.routing.leaky is True


def test_tiny_capsnet_with_leaky_routing_trains(tmp_path, fake_mnist):
    from capsctl.training import prepare_run_dir, train

    cfg = tiny_config(model={"routing": {"leaky": True}}, train={"max_steps": 2, "log_every": 1})
    folder = prepare_run_dir(tmp_path / "runs", "leaky", force=False)
    summary = train(cfg, folder, torch.device("cpu"), data_root=str(fake_mnist),
                    show_progress=False)
    assert summary["steps"] == 2
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss_total"] for r in rows if "train/loss_total" in r]
    assert losses and all(math.isfinite(x) for x in losses)
