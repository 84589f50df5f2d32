"""The routing algorithms of ``model.routing`` (capsctl/models/routing/): each layer against a
plain loop of its paper's equations (values, couplings, gradients), float64 gradchecks, bf16
autocast, the config's per-routing keys, parameter counts at the paper's widths, the model
contract ``capsctl routes`` reads, and the same checks on CUDA when there is one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capsctl.config import from_dict
from capsctl.errors import ConfigError
from capsctl.fields import field_names
from capsctl.models import build_model, count_parameters
from capsctl.models.capsules import squash
from capsctl.models.routing import FLAT_KEYS, ROUTINGS
from capsctl.models.routing import build as build_routing
from capsctl.models.routing.dynamic import RoutedCapsules
from capsctl.models.routing.inverted import InvertedDotProductRouting
from capsctl.models.routing.self_attention import SelfAttentionRouting
from conftest import tiny_config

B, I, J, P, D = 3, 7, 4, 5, 6
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _votes(u_BIP, W_IJDP):
    """u_hat[b][i][j] = W_ij u_i, as nested lists of (D,) vectors."""
    return [[[W_IJDP[i, j] @ u_BIP[b, i] for j in range(W_IJDP.shape[1])]
             for i in range(u_BIP.shape[1])] for b in range(u_BIP.shape[0])]


def uniform_reference(u_BIP, W_IJDP, bias_JD=None):
    """No routing: s_j = sum_i (1/J) u_hat_j|i (+ bias), v_j = squash(s_j)."""
    Bn, In, _ = u_BIP.shape
    Jn = W_IJDP.shape[1]
    uh = _votes(u_BIP, W_IJDP)
    vs = []
    for b in range(Bn):
        v = []
        for j in range(Jn):
            s = sum(uh[b][i][j] / Jn for i in range(In))
            v.append(squash(s + (bias_JD[j] if bias_JD is not None else 0)))
        vs.append(torch.stack(v))
    return torch.stack(vs)


def self_attention_reference(u_BIP, W_IJDP, prior_JI, squash_fn=squash):
    """Efficient-CapsNet's routing as written: for each parent j the I x I self-attention
    matrix A_j = U_j U_j^T / sqrt(D); c_ij = softmax over j of sum_k A_j[i, k]; s_j = sum_i
    (c_ij + b_ij) u_hat_j|i; v_j = squash(s_j). Returns v (B, J, D) and c (B, I, J)."""
    Bn, In, _ = u_BIP.shape
    Jn, Dn = W_IJDP.shape[1], W_IJDP.shape[2]
    uh = _votes(u_BIP, W_IJDP)
    vs, cs = [], []
    for b in range(Bn):
        row_sums = []
        for j in range(Jn):
            U = torch.stack([uh[b][i][j] for i in range(In)])          # (I, D)
            A = U @ U.T / math.sqrt(Dn)                                 # (I, I)
            row_sums.append(A.sum(1))                                   # (I,)
        logits = torch.stack(row_sums, 1)                               # (I, J)
        c = torch.stack([torch.softmax(logits[i], 0) for i in range(In)])
        v = [squash_fn(sum((c[i, j] + prior_JI[j, i]) * uh[b][i][j] for i in range(In)))
             for j in range(Jn)]
        vs.append(torch.stack(v))
        cs.append(c)
    return torch.stack(vs), torch.stack(cs)


def inverted_reference(u_BIP, W_IJDP, iterations, weight_D, bias_D):
    """Tsai et al. (2020), Procedure 1: poses p_j = 0; each pass a_ij = p_j . v_ij / sqrt(D),
    r_ij = softmax over j, s_j = sum_i r_ij v_ij, p_j = LayerNorm(s_j); capsctl's output
    v_j = squash(s_j) of the last pass. Returns v (B, J, D) and r (R, B, I, J)."""
    Bn, In, _ = u_BIP.shape
    Jn, Dn = W_IJDP.shape[1], W_IJDP.shape[2]
    uh = _votes(u_BIP, W_IJDP)
    vs, rs = [], []
    for b in range(Bn):
        p = [torch.zeros(Dn, dtype=u_BIP.dtype) for _ in range(Jn)]
        rs_b = []
        for _ in range(iterations):
            a = [[p[j] @ uh[b][i][j] / math.sqrt(Dn) for j in range(Jn)] for i in range(In)]
            r = torch.stack([torch.softmax(torch.stack(a[i]), 0) for i in range(In)])
            s = [sum(r[i, j] * uh[b][i][j] for i in range(In)) for j in range(Jn)]
            p = [F.layer_norm(s[j], (Dn,), weight_D, bias_D) for j in range(Jn)]
            rs_b.append(r)
        vs.append(torch.stack([squash(s[j]) for j in range(Jn)]))
        rs.append(torch.stack(rs_b))
    return torch.stack(vs), torch.stack(rs, 1)


def _inputs(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    u = squash(torch.randn(B, I, P, generator=g, dtype=dtype) * 2)
    return u.to(device).requires_grad_(True)


def _grads(v, params):
    return torch.autograd.grad((v * torch.linspace(-1, 1, D, device=v.device,
                                                   dtype=v.dtype)).sum(), params)


def _check(v, cs, v_ref, c_ref, g, g_ref, tol=1e-5):
    torch.testing.assert_close(v, v_ref, atol=tol, rtol=tol)
    assert len(cs) == len(c_ref)
    for c, cr in zip(cs, c_ref):
        assert c.shape == (B, I, J)
        torch.testing.assert_close(c, cr, atol=tol, rtol=tol)
    for a, b in zip(g, g_ref):
        assert b.abs().max() > 1e-5  # not trivially zero
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [False, True])
def test_uniform_equals_its_loop(device, bias):
    cfg = tiny_config(model={"routing": {"name": "uniform", "class_bias": bias}}).model
    torch.manual_seed(0)
    layer = build_routing(cfg.routing, I, J, P, D, cfg.transform_init_std).to(device)
    assert isinstance(layer, RoutedCapsules) and layer.iterations == 1  # the kernel's layer
    with torch.no_grad():
        layer.W_IJDP.normal_(0, 0.5)
        if bias:
            layer.bias_JD.normal_(0, 0.3)
    u = _inputs(device=device)
    v, cs = layer(u, keep_routing=True)
    params = [u, layer.W_IJDP] + ([layer.bias_JD] if bias else [])
    v_ref = uniform_reference(u, layer.W_IJDP, layer.bias_JD)
    _check(v, cs, v_ref, [torch.full((B, I, J), 1.0 / J, device=device)],
           _grads(v, params), _grads(v_ref, params))


@pytest.mark.parametrize("device", DEVICES)
def test_self_attention_equals_its_loop(device):
    torch.manual_seed(0)
    layer = SelfAttentionRouting(I, J, P, D, init_std=0.5).to(device)
    with torch.no_grad():
        layer.prior_JI.normal_(0, 0.2)  # the learned log priors, away from their zero start
    u = _inputs(device=device)
    v, cs = layer(u, keep_routing=True)
    params = [u, layer.W_IJDP, layer.prior_JI]
    v_ref, c_ref = self_attention_reference(u, layer.W_IJDP, layer.prior_JI)
    _check(v, cs, v_ref, [c_ref], _grads(v, params), _grads(v_ref, params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_inverted_dot_product_equals_its_loop(device, iterations):
    torch.manual_seed(0)
    layer = InvertedDotProductRouting(I, J, P, D, iterations, init_std=0.5).to(device)
    params = [layer.W_IJDP]
    weight = bias = None
    if iterations > 1:
        with torch.no_grad():
            layer.norm.weight.normal_(1, 0.3)
            layer.norm.bias.normal_(0, 0.3)
        weight, bias = layer.norm.weight, layer.norm.bias
        params += [weight, bias]
    else:
        assert layer.norm is None  # one pass: no LayerNorm is ever read
    u = _inputs(device=device)
    v, rs = layer(u, keep_routing=True)
    v_ref, r_ref = inverted_reference(u, layer.W_IJDP, iterations, weight, bias)
    assert torch.allclose(rs[0], torch.full_like(rs[0], 1.0 / J))  # the uniform start
    _check(v, rs, v_ref, list(r_ref), _grads(v, [u] + params), _grads(v_ref, [u] + params))


def test_torch_routings_pass_gradcheck_in_float64():
    torch.manual_seed(0)
    u = _inputs(torch.float64)
    for layer in (SelfAttentionRouting(I, J, P, D, init_std=0.5),
                  InvertedDotProductRouting(I, J, P, D, 3, init_std=0.5)):
        layer = layer.double()
        W = layer.W_IJDP
        assert torch.autograd.gradcheck(
            lambda u_, W_: _with_W(layer, W_, u_), (u, W), eps=1e-6, atol=1e-5)


def _with_W(layer, W_IJDP, u_BIP):
    """The layer's v with ``W_IJDP`` in place of its parameter (for gradcheck)."""
    saved = layer.W_IJDP
    try:
        del layer.W_IJDP
        layer.W_IJDP = W_IJDP
        return layer(u_BIP)[0]
    finally:
        del layer.W_IJDP
        layer.W_IJDP = saved


@pytest.mark.parametrize("name", ["self-attention", "inverted-dot-product"])
def test_bf16_autocast_is_close_to_fp32(name):
    cfg = tiny_config(model={"routing": name}).model
    torch.manual_seed(0)
    layer = build_routing(cfg.routing, 64, 10, 8, 16, cfg.transform_init_std)
    with torch.no_grad():
        layer.W_IJDP.normal_(0, 0.3)
    u = squash(torch.randn(4, 64, 8) * 2)
    v32, _ = layer(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v16, _ = layer(u)
    assert v16.dtype == torch.float32  # squash and the returned capsules stay fp32
    torch.testing.assert_close(v16, v32, atol=3e-2, rtol=3e-2)


# --- the config --------------------------------------------------------------------------------

ALL_OPTIONS = sorted({k for s in ROUTINGS.values() for k in field_names(s.options)} - {"name"})


def test_each_routing_has_exactly_its_options_and_refuses_the_others():
    """A key of another routing is one line naming the routing it belongs to; the routing's
    own keys are listed."""
    assert ALL_OPTIONS == ["class_bias", "iterations", "leaky"]
    for name, spec in ROUTINGS.items():
        assert from_dict({"model": {"routing": name}}).model.routing == spec.options()
        own = [k for k in field_names(spec.options) if k != "name"]
        for key in ALL_OPTIONS:
            value = 2 if key == "iterations" else True
            raw = {"model": {"routing": {"name": name, key: value}}}
            if key in own:
                assert getattr(from_dict(raw).model.routing, key) == value
                continue
            with pytest.raises(ConfigError) as e:
                from_dict(raw)
            msg = str(e.value)
            owners = [n for n, s in ROUTINGS.items() if key in field_names(s.options)]
            assert "\n" not in msg and f"'model.routing.{key}'" in msg
            assert f"is not an option of routing {name} (it belongs to {', '.join(owners)})" \
                in msg
            assert msg.endswith(f"{name} takes: {', '.join(own) or 'no keys but name'}")


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_format_2_flat_keys_land_in_the_routing(name):
    """configs and checkpoints of format 2 keep loading: the flat keys at the value every
    routing took pass for every routing; away from it, they are the routing's own key (or
    refused, as before)."""
    own = field_names(ROUTINGS[name].options)
    flat = {"routing": name, "routing_iterations": 3, "class_bias": False,
            "leaky_routing": False}
    assert from_dict({"model": flat}).model.routing == ROUTINGS[name].options()
    for key, (new, _) in FLAT_KEYS.items():
        value = 2 if key == "routing_iterations" else True
        raw = {"model": {**flat, key: value}}
        if new in own:
            assert getattr(from_dict(raw).model.routing, new) == value
        else:
            with pytest.raises(ConfigError, match=f"'model.routing.{new}'.*not an option"):
                from_dict(raw)


def test_a_routing_key_on_the_command_line():
    from capsctl.config import load

    cfg = load(None, ["model.routing=inverted-dot-product", "model.routing.iterations=2"])
    assert cfg.model.routing == ROUTINGS["inverted-dot-product"].options(iterations=2)
    assert load(None, ["model.routing_iterations=1"]).model.routing.iterations == 1
    with pytest.raises(ConfigError, match="it belongs to dynamic, inverted-dot-product"):
        load(None, ["model.routing=self-attention", "model.routing.iterations=2"])


def test_switching_routing_keeps_the_keys_both_have():
    """A sweep over model.routing keeps the file's iterations where the routing has them."""
    from capsctl.config import set_key

    cfg = from_dict({"model": {"routing": {"iterations": 3, "class_bias": True}}})
    set_key(cfg, "model.routing", "uniform")             # iterations at dynamic's default
    assert cfg.model.routing == ROUTINGS["uniform"].options(class_bias=True)
    cfg = from_dict({"model": {"routing": {"iterations": 2}}})
    set_key(cfg, "model.routing", "inverted-dot-product")
    assert cfg.model.routing.iterations == 2
    with pytest.raises(ConfigError, match="'model.routing.iterations'.*routing self-attention"):
        set_key(cfg, "model.routing", "self-attention")


def test_unknown_routing_lists_the_choices():
    with pytest.raises(ConfigError, match="inverted-dot-product"):
        from_dict({"model": {"routing": "em"}})


def test_default_routing_is_dynamic_with_its_old_state_dict_keys():
    model = build_model(from_dict({}).model)
    assert model.cfg.routing.name == "dynamic" and isinstance(model.digits, RoutedCapsules)
    assert model.digits.iterations == 3
    keys = set(model.state_dict())
    assert {"digits.W_IJDP", "conv1.weight", "primary.conv.weight"} <= keys
    assert not any(k.startswith("digits.") and k != "digits.W_IJDP" for k in keys)


@pytest.mark.parametrize("name,extra", [("dynamic", 0), ("uniform", 0),
                                        ("self-attention", 10 * 1152),    # log priors b_ij
                                        ("inverted-dot-product", 2 * 16)])  # LayerNorm
def test_parameter_counts_at_the_paper_widths(name, extra):
    with torch.device("meta"):
        model = build_model(from_dict({"model": {"routing": name}}).model)
    assert count_parameters(model) == 8_215_568 + extra


# --- the model contract (capsctl routes) -------------------------------------------------------

@pytest.mark.parametrize("name", list(ROUTINGS))
def test_every_routing_gives_routes_what_it_draws(name):
    torch.manual_seed(0)
    model = build_model(tiny_config(model={"routing": name}).model).eval()
    x = torch.rand(2, 1, 28, 28)
    out = model(x, keep_routing=True)
    T, H, W = model.routing_layout
    passes = out["routing"]
    expected = getattr(model.cfg.routing, "iterations", 1)
    assert len(passes) == expected
    for c in passes:
        assert c.shape == (2, T * H * W, 10)
        torch.testing.assert_close(c.sum(2), torch.ones(2, T * H * W))  # over the parents
    assert model.routing_label == ROUTINGS[name].label
    assert model.votes(x).shape == (2, T * H * W, 10, model.cfg.class_dim)
    assert "routing" not in model(x)


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_every_routing_trains(name):
    """A few steps of Adam on one batch lower the loss: gradients reach every parameter."""
    from capsctl.models import loss_fn

    cfg = tiny_config(model={"routing": name, "transform_init_std": 0.1})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    losses_of = loss_fn(cfg, "single")
    batch = {"x": torch.rand(8, 1, 28, 28), "y": torch.arange(8) % 10}
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(6):
        total = losses_of(model(batch["x"], batch["y"]), batch)["total"]
        opt.zero_grad()
        total.backward()
        first = first if first is not None else float(total.detach())
        opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert float(total.detach()) < first
