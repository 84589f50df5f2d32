"""Matrix capsules with EM routing: the E/M steps by hand, the invariants of routing, the model's
geometry, the spread loss, and a tiny train + eval run through the real trainer."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from capsctl.config import from_dict
from capsctl.data.registry import SINGLE
from capsctl.errors import ConfigError
from capsctl.models import MODELS, build_model, loss_fn
from capsctl.models.em_capsnet import (ClassCaps, EMCapsNet, coordinate_offsets, em_losses,
                                       grid_sizes, patch_child_index, spread_loss, spread_margin)
from capsctl.models.routing.em import (PatchSoftmax, e_step_logits, em_routing,
                                       inverse_temperatures, m_step)
from conftest import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The routing tensors here are tiny: one thread avoids stalls on a loaded shared CPU (the
    setting is restored for the other test files)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def em_config(**model):
    """A tiny em-capsnet config (types 4/3/3, no decoder) on top of the tiny trainer settings."""
    base = {"name": "em-capsnet", "conv1_channels": 8, "primary_types": 4,
            "caps1_types": 3, "caps2_types": 3, "decoder": False}
    base.update(model)
    return tiny_config(model=base, loss={"recon_weight": 0.0, "m_steps": 20})


# --- the E and M steps against a two-child / two-parent example worked by hand -------------

def test_m_and_e_step_by_hand():
    # children a = (1, 0.5); 1-D votes: child 0 -> (1, 2), child 1 -> (3, 2); R uniform 1/2
    a_NI = torch.tensor([[1.0, 0.5]])
    V_NJIH = torch.tensor([[[[1.0], [3.0]], [[2.0], [2.0]]]])        # (1, J=2, I=2, H=1)
    R_NJI = torch.full((1, 2, 2), 0.5)
    floor, beta_u, beta_a, lam = 0.01, 0.0, 1.0, 1.0
    mu, sigma2, a = m_step(a_NI, R_NJI, V_NJIH, torch.tensor([beta_u] * 2),
                           torch.tensor([beta_a] * 2), lam, floor)
    # R a = (0.5, 0.25) for both parents, so sum_i R_ij = 0.75;
    # parent 0: mu = (0.5*1 + 0.25*3)/0.75 = 5/3, var = (0.5*(2/3)^2 + 0.25*(4/3)^2)/0.75 = 8/9
    # parent 1: both votes are 2: mu = 2, var = 0 (+ floor)
    assert mu[0, :, 0].tolist() == pytest.approx([5 / 3, 2.0], rel=1e-6)
    assert sigma2[0, :, 0].tolist() == pytest.approx([8 / 9 + floor, floor], rel=1e-6)
    # cost = (beta_u + log sigma) * 0.75; a = logistic(lambda (beta_a - cost))
    expect_a = [1 / (1 + math.exp(-(beta_a - 0.75 * 0.5 * math.log(v))))
                for v in (8 / 9 + floor, floor)]
    assert a[0].tolist() == pytest.approx(expect_a, rel=1e-6)
    assert expect_a == pytest.approx([0.7388, 0.9386], abs=1e-4)
    # E-step: R_ij = a_j N(V_ij; mu_j, sigma2_j) / sum_u a_u N(V_iu; mu_u, sigma2_u)
    def gauss(v, m, s2):
        return math.exp(-(v - m) ** 2 / (2 * s2)) / math.sqrt(2 * math.pi * s2)
    votes = [[1.0, 2.0], [3.0, 2.0]]                                  # [child][parent]
    mus, s2s = [5 / 3, 2.0], [8 / 9 + floor, floor]
    R = torch.softmax(e_step_logits(a, mu, sigma2, V_NJIH), dim=1)[0]  # (J, I)
    for i in range(2):
        num = [expect_a[j] * gauss(votes[i][j], mus[j], s2s[j]) for j in range(2)]
        for j in range(2):
            assert R[j, i].item() == pytest.approx(num[j] / sum(num), rel=1e-5)
    # parent 1 fits both votes exactly with a tiny variance: it takes almost all of R
    assert R[1].min() > 0.9


def _centred_steps(a_NI, R_NJI, V_NJIH, beta_u_J, beta_a_J, lam, floor):
    """The M and E steps written with explicit centred votes (V - mu)^2, as in the paper."""
    Ra = R_NJI * a_NI.unsqueeze(1)
    mass = Ra.sum(-1, keepdim=True)
    w = (Ra / (mass + 1e-8)).unsqueeze(-1)
    mu = (w * V_NJIH).sum(2)
    sigma2 = (w * (V_NJIH - mu.unsqueeze(2)) ** 2).sum(2) + floor
    cost = (beta_u_J.unsqueeze(-1) + 0.5 * torch.log(sigma2)) * mass
    a = torch.sigmoid(lam * (beta_a_J - cost.sum(-1)))
    log_p = -0.5 * (((V_NJIH - mu.unsqueeze(2)) ** 2 / sigma2.unsqueeze(2)).sum(-1)
                    + torch.log(2 * math.pi * sigma2).sum(-1, keepdim=True))
    return mu, sigma2, a, torch.log(a).unsqueeze(-1) + log_p


def test_moment_form_equals_the_centred_steps_with_gradients():
    """The E and M steps from [V, V^2] products against the centred formulas: values and
    gradients (votes, activations, betas) to 1e-4 relative in fp32, on votes of spread ~1."""
    g = torch.Generator().manual_seed(5)
    V = (torch.randn(4, 3, 9, 16, generator=g) + 2.0).requires_grad_(True)
    a = torch.rand(4, 9, generator=g).requires_grad_(True)
    R = torch.softmax(torch.randn(4, 3, 9, generator=g), dim=1)
    bu = torch.randn(3, generator=g).requires_grad_(True)
    ba = torch.randn(3, generator=g).requires_grad_(True)
    mu, s2, a_out = m_step(a, R, V, bu, ba, 0.5, 1e-4)
    logits = e_step_logits(a_out, mu, s2, V)
    ref = _centred_steps(a, R, V, bu, ba, 0.5, 1e-4)
    for got, want in zip((mu, s2, a_out, logits), ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
    loss = (logits * weights).sum() + a_out.sum() + mu.sum()
    loss_ref = (ref[3] * weights).sum() + ref[2].sum() + ref[0].sum()
    for x, y in zip(torch.autograd.grad(loss, (V, a, bu, ba)),
                    torch.autograd.grad(loss_ref, (V, a, bu, ba))):
        assert y.abs().max() > 1e-3
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-3 * y.abs().max().item())


def test_inverse_temperature_schedule():
    assert inverse_temperatures(3, 0.01, 0.95) == pytest.approx(
        [0.01 * (1 - 0.95), 0.01 * (1 - 0.95 ** 2), 0.01 * (1 - 0.95 ** 3)])
    assert inverse_temperatures(2, 0.5, 0.0) == [0.5, 0.5]


# --- invariants of routing ----------------------------------------------------------------

def test_r_sums_to_one_over_parents_fully_connected():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, 4, 7, 16, generator=g)
    a = torch.rand(3, 7, generator=g)
    _, a_out, routing = em_routing(a, V, torch.zeros(4), torch.zeros(4),
                                   inverse_temperatures(3, 0.01, 0.95), 1e-4, keep_routing=True)
    assert len(routing) == 3 and routing[0].shape == (3, 7, 4)
    for R in routing:
        assert torch.allclose(R.sum(-1), torch.ones(3, 7), atol=1e-5)
        assert (R >= 0).all()
    assert ((a_out > 0) & (a_out < 1)).all()


def test_r_sums_to_one_over_all_parents_of_a_conv_child():
    # a 5x5 grid of 2 child types, K=3 stride 1 -> 3x3 parent positions of 4 types: the centre
    # child is in 9 patches, a corner child in 1; R of each child summed over every patch and
    # type must be 1 (at initialisation and after each E-step)
    B, T, J, k, side = 2, 2, 4, 3, 5
    index_PK = patch_child_index(side, side, k, 1)
    assert index_PK.shape == (9, 9)
    norm = PatchSoftmax(B, index_PK, side * side, T)
    assert norm.patches_C.view(side, side)[2, 2] == 9 and norm.patches_C[0] == 1
    g = torch.Generator().manual_seed(1)
    V = torch.randn(B * 9, J, k * k * T, 16, generator=g)
    a = torch.rand(B * 9, k * k * T, generator=g)

    def per_child(R_NJI):
        slots = R_NJI.sum(1).reshape(B, 9 * k * k, T)               # sum over parent types
        return torch.zeros(B, side * side, T).index_add(1, index_PK.reshape(-1), slots)

    assert torch.allclose(per_child(norm.uniform(V[..., 0])), torch.ones(B, side * side, T))
    _, _, routing = em_routing(a, V, torch.zeros(J), torch.zeros(J), [1.0, 1.0], 1e-4, norm,
                               keep_routing=True)
    for R_NIJ in routing:
        assert torch.allclose(per_child(R_NIJ.transpose(1, 2)), torch.ones(B, side * side, T),
                              atol=1e-5)


def test_variances_positive_even_for_identical_votes():
    V = torch.ones(2, 3, 5, 16)                 # every child votes the same: zero spread
    V[1] = torch.randn(3, 5, 16)
    a = torch.rand(2, 5)
    R = torch.full((2, 3, 5), 1 / 3)
    _, sigma2, a_out = m_step(a, R, V, torch.zeros(3), torch.zeros(3), 0.01, 1e-4)
    assert (sigma2 > 0).all()
    # variance from moments, E[V^2] - E[V]^2: exact up to fp32 rounding of the weights' sum
    torch.testing.assert_close(sigma2[0], torch.full((3, 16), 1e-4), atol=1e-6, rtol=0)
    assert torch.isfinite(a_out).all()


@pytest.mark.parametrize("activation", [0.7, 0.0])
def test_single_child_parents_stay_finite(activation):
    # one child per group (variance = floor only) and even a child with zero activation (no
    # parent gets any mass): poses, activations and gradients stay finite
    V = torch.randn(3, 2, 1, 16, requires_grad=True)
    a = torch.full((3, 1), activation, requires_grad=True)
    beta_u, beta_a = torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    mu, a_out, routing = em_routing(a, V, beta_u, beta_a, inverse_temperatures(3, 0.01, 0.95),
                                    1e-4, keep_routing=True)
    (mu.sum() + a_out.sum()).backward()
    for t in (mu, a_out, *routing, V.grad, a.grad, beta_u.grad, beta_a.grad):
        assert torch.isfinite(t).all()


# --- the model ------------------------------------------------------------------------------

def test_coordinate_addition_offsets():
    # ConvCaps2 cell r of a 28x28 input: receptive-field centre at input pixel 4r + 8 (+0.5)
    off = coordinate_offsets(3, 3, 1 / 28)
    assert off[:, 0, 0, 3].tolist() == pytest.approx([8.5 / 28, 12.5 / 28, 16.5 / 28])
    assert off[0, :, 1, 3].tolist() == pytest.approx([8.5 / 28, 12.5 / 28, 16.5 / 28])
    off[:, :, 0, 3] = 0
    off[:, :, 1, 3] = 0
    assert (off == 0).all()                     # nothing else is touched
    # in the class layer: votes with and without differ by exactly those offsets
    m = em_config().model
    layer = ClassCaps(3, 10, m)
    pose = torch.randn(2, 3, 3, 3, 16)          # (B, X, Y, T, 16)
    with_add = layer.votes(pose)
    layer.coord_add = False
    diff = (with_add - layer.votes(pose)).view(2, 10, 3, 3, 3, 4, 4)   # (B, J, T, X, Y, 4, 4)
    expect = coordinate_offsets(3, 3, 1 / 28)
    assert torch.allclose(diff, expect.expand_as(diff), atol=1e-6)


def test_spread_loss_values_and_margin_schedule():
    a = torch.tensor([[0.9, 0.5, 0.85], [0.1, 0.8, 0.3]])
    y = torch.tensor([0, 2])
    # ex 0: class 1 gap 0.4 >= m -> 0; class 2 gap 0.05 -> (0.2 - 0.05)^2
    # ex 1: class 0: a_t - a_i = 0.2 -> 0; class 1: -0.5 -> (0.2 + 0.5)^2
    assert spread_loss(a, y, 0.2).tolist() == pytest.approx([0.15 ** 2, 0.7 ** 2])
    assert spread_loss(a, y, 0.9)[0].item() == pytest.approx(0.5 ** 2 + 0.85 ** 2)
    assert spread_margin(0, 0.2, 0.9, 100) == pytest.approx(0.2)
    assert spread_margin(50, 0.2, 0.9, 100) == pytest.approx(0.55)
    assert spread_margin(1000, 0.2, 0.9, 100) == pytest.approx(0.9)
    assert spread_margin(0, 0.2, 0.9, 0) == pytest.approx(0.9)
    cfg = em_config()
    assert MODELS["em-capsnet"].losses == {SINGLE: "capsctl.models.em_capsnet:em_losses"}
    out, batch = {"scores": a}, {"y": y, "x": torch.zeros(2, 1, 28, 28)}
    early, late = em_losses(out, batch, cfg.loss, 0), em_losses(out, batch, cfg.loss, 20)
    assert early["total"].item() == pytest.approx((0.15 ** 2 + 0.7 ** 2) / 2)
    assert late["spread"].item() > early["spread"].item()
    bound = loss_fn(cfg, SINGLE)                      # the registry's loss, config bound
    assert bound(out, batch, 0)["total"].item() == pytest.approx(early["total"].item())
    assert bound(out, batch, 20)["spread"].item() == pytest.approx(late["spread"].item())


@pytest.mark.parametrize("side,grid", [(28, 3), (32, 4), (40, 6)])
def test_output_shapes(side, grid):
    # the model section alone: any side the geometry allows, whatever dataset makes it
    m = dataclasses.replace(em_config(decoder=True, decoder_hidden=[8]).model, input_size=side)
    m.check("test")
    model = build_model(m)
    assert isinstance(model, EMCapsNet)
    assert MODELS["em-capsnet"].module == "capsctl.models.em_capsnet:EMCapsNet"
    assert grid_sizes(side)[-1] == grid and model.routing_layout == (3, grid, grid)
    x = torch.rand(2, 1, side, side)
    out = model(x, torch.tensor([1, 2]), keep_routing=True)
    assert out["scores"].shape == (2, 10) and out["pose"].shape == (2, 10, 16)
    assert ((out["scores"] > 0) & (out["scores"] < 1)).all()
    assert out["recon"].shape == (2, side * side)
    assert len(out["routing"]) == 3
    for R in out["routing"]:
        assert R.shape == (2, 3 * grid * grid, 10)
        assert torch.allclose(R.sum(-1), torch.ones(2, 3 * grid * grid), atol=1e-5)
    (out["scores"].sum() + out["recon"].sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_recon_masks_label_in_training_and_prediction_at_eval():
    cfg = em_config(decoder=True, decoder_hidden=[8])
    model = build_model(cfg.model).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        pred = out["scores"].argmax(1)
        assert torch.allclose(out["recon"], model(x, pred)["recon"])
        other = (pred + 1) % 10
        assert not torch.allclose(out["recon"], model(x, other)["recon"])


def test_config_checks():
    with pytest.raises(ConfigError, match="at least 17"):
        from_dict({"model": {"name": "em-capsnet", "input_size": 16}})
    with pytest.raises(ConfigError, match="set model.input_size=32"):
        from_dict({"model": {"name": "em-capsnet", "input_size": 28},
                   "data": {"name": "smallnorb"}})
    with pytest.raises(ConfigError, match=r"loss.m_start \(0.9\) must not exceed"):
        from_dict({"model": {"name": "em-capsnet"},
                   "loss": {"m_start": 0.9, "m_end": 0.2}})
    for name in ("mnist-em", "mnist-em-small", "smallnorb-em"):
        from capsctl.config import load
        assert load(f"configs/{name}.yaml").model.name == "em-capsnet"


# --- end to end through the real trainer and evaluation ------------------------------------

def test_tiny_train_and_eval(tmp_path, fake_mnist):
    from capsctl.evaluate import evaluate_checkpoints
    from capsctl.training import prepare_run_dir, train

    cfg = em_config()
    cfg.optim.lr = 0.01
    cfg.train.epochs = 2
    folder = prepare_run_dir(tmp_path / "runs", "em", force=False)
    summary = train(cfg, folder, CPU, data_root=str(fake_mnist), show_progress=False)
    assert summary["steps"] == 2 * (224 // 16)
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    terms = [r for r in rows if "train/loss_spread" in r]
    assert terms and all(math.isfinite(r["train/loss_total"]) for r in terms)
    assert any("val/accuracy" in r for r in rows)
    best = folder / "checkpoints" / "best.pt"
    [result] = evaluate_checkpoints([best], [], "test", "cpu", 64, None, str(fake_mnist))
    assert result["model"] == "em-capsnet" and result["n"] == 64
    assert result["accuracy"] == pytest.approx(summary["test_accuracy"])
    # capsctl routes draws the class layer's R per iteration on the ConvCaps2 grid
    from capsctl.inspection.commands import run_routes

    r = run_routes(best, index=3, out=str(tmp_path / "routes.png"), no_tb=True, device="cpu",
                   data_root=str(fake_mnist))
    assert r["layout"] == {"types": 3, "height": 3, "width": 3}
    assert (tmp_path / "routes.png").stat().st_size > 0
    c = torch.tensor(r["coupling"])                      # (iterations, children, classes)
    assert c.shape == (3, 27, 10)
    assert torch.allclose(c.sum(-1), torch.ones(3, 27), atol=1e-3)
