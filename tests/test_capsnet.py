"""The CapsNet's parts against the paper: squash, primary capsules, routing, losses, masking."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from capsctl.config import from_dict
from capsctl.models import build_model, count_parameters
from capsctl.models.capsules import PrimaryCaps, squash
from capsctl.models.routing.dynamic import RoutedCapsules, route
from capsctl.models.losses import capsnet_losses, margin_loss, reconstruction_sse
from conftest import tiny_config


def test_squash_lengths_and_zero():
    s = torch.randn(1000, 8) * torch.logspace(-4, 2, 1000)[:, None]
    v = squash(s)
    n = v.norm(dim=-1)
    assert (n >= 0).all() and (n < 1).all()
    # |v| = |s|^2 / (1 + |s|^2)
    sn = s.norm(dim=-1)
    assert torch.allclose(n, sn ** 2 / (1 + sn ** 2), rtol=1e-4, atol=1e-6)
    z = torch.zeros(3, 8, requires_grad=True)
    out = squash(z)
    assert torch.equal(out, torch.zeros(3, 8))
    out.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_primary_capsule_is_channels_at_one_position():
    torch.manual_seed(0)
    prim = PrimaryCaps(in_channels=3, types=4, dim=5, kernel=3, stride=2)
    h = torch.randn(2, 3, 11, 11)
    a = prim.conv(h)                      # (B, types*dim, G, G)
    u = prim(h)                           # (B, types*G*G, dim)
    G = a.shape[-1]
    assert u.shape == (2, 4 * G * G, 5)
    for t, r, c in [(0, 0, 0), (3, 4, 2), (2, 1, 3)]:
        i = (t * G + r) * G + c
        expected = squash(a[:, t * 5:(t + 1) * 5, r, c])   # 5 channels, one position
        assert torch.allclose(u[:, i], expected, atol=1e-6)
    # not 5 neighbouring pixels of a single channel
    wrong = squash(a[:, 0, 0, :5])
    assert not torch.allclose(u[:, 0], wrong, atol=1e-3)


def test_couplings_sum_to_one_over_parents_each_pass():
    torch.manual_seed(0)
    u_hat = torch.randn(3, 20, 4, 6)
    v, cs = route(u_hat, 3, keep=True)
    assert v.shape == (3, 4, 6) and len(cs) == 3
    for c in cs:
        assert c.shape == (3, 20, 4)
        assert torch.allclose(c.sum(dim=2), torch.ones(3, 20), atol=1e-6)
    assert torch.allclose(cs[0], torch.full_like(cs[0], 0.25))   # b starts at zero
    assert not torch.allclose(cs[2], cs[0])                       # agreement moved it


def test_routing_is_per_example():
    """b is reset for every example: an example's output does not depend on its batch-mates."""
    torch.manual_seed(0)
    layer = RoutedCapsules(12, 5, 4, 6, iterations=3, init_std=0.5)
    u = torch.randn(4, 12, 4)
    v_batch, _ = layer(u)
    v_alone, _ = layer(u[2:3])
    assert torch.allclose(v_batch[2:3], v_alone, atol=1e-6)
    v_again, _ = layer(u)
    assert torch.equal(v_batch, v_again)              # no state carried between calls


def test_one_iteration_is_uniform_coupling():
    torch.manual_seed(0)
    u_hat = torch.randn(2, 10, 3, 4)
    v, _ = route(u_hat, 1)
    assert torch.allclose(v, squash(u_hat.sum(dim=1) / 3), atol=1e-6)


def test_gradients_flow_through_the_agreement():
    torch.manual_seed(0)
    u_hat = torch.randn(2, 10, 3, 4, requires_grad=True)
    v, _ = route(u_hat, 3)
    (g_full,) = torch.autograd.grad(v.pow(2).sum(), u_hat)

    def route_detached(uh, iters):
        b = torch.zeros(uh.shape[:3])
        for r in range(iters):
            c = torch.softmax(b, dim=2)
            vv = squash(torch.einsum("bij,bijd->bjd", c, uh))
            if r < iters - 1:
                b = b + torch.einsum("bijd,bjd->bij", uh, vv).detach()
        return vv

    (g_det,) = torch.autograd.grad(route_detached(u_hat, 3).pow(2).sum(), u_hat)
    assert not torch.allclose(g_full, g_det, atol=1e-6)


def test_parameter_count_of_the_paper_model():
    cfg = from_dict({})                              # the defaults: the paper's model on MNIST
    assert count_parameters(build_model(cfg.model)) == 8_215_568
    cfg.model.decoder = False
    assert count_parameters(build_model(cfg.model)) == 6_804_224


def test_shapes_and_masking():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg.model).eval()
    x = torch.rand(5, 1, 28, 28)
    out = model(x, keep_routing=True)
    assert out["v"].shape == (5, 10, 6) and out["scores"].shape == (5, 10)
    assert out["recon"].shape == (5, 784)
    assert len(out["routing"]) == 3 and out["routing"][0].shape == (5, model.num_primary, 10)
    # eval masks with the prediction
    pred = out["scores"].argmax(1)
    assert torch.allclose(out["recon"], model.decode(out["v"], pred))
    # training masks with the label: only that capsule reaches the decoder
    y = (pred + 1) % 10
    rec_y = model(x, y)["recon"]
    assert torch.allclose(rec_y, model.decode(out["v"], y), atol=1e-6)
    v2 = out["v"].clone()
    v2[torch.arange(5), pred] += 1.0                 # change a masked-out capsule
    assert torch.allclose(model.decode(v2, y), rec_y, atol=1e-6)


def test_margin_loss_hand_values():
    lengths = torch.tensor([[0.95, 0.05, 0.5], [0.2, 0.8, 0.0]])
    targets = F.one_hot(torch.tensor([0, 0]), 3)
    got = margin_loss(lengths, targets)
    # ex 0: present 0.95 >= 0.9 -> 0; absent 0.05 < 0.1 -> 0; absent 0.5 -> 0.5*(0.4)^2 = 0.08
    # ex 1: present (0.9-0.2)^2 = 0.49; absent 0.5*(0.7)^2 = 0.245; absent 0 -> 0
    assert torch.allclose(got, torch.tensor([0.08, 0.735]), atol=1e-6)


def test_reconstruction_and_total_scaling():
    x = torch.zeros(2, 1, 2, 2)
    recon = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    assert torch.allclose(reconstruction_sse(recon, x), torch.tensor([1.0, 0.5]))
    cfg = from_dict({}).loss
    out = {"scores": torch.tensor([[0.9, 0.0], [0.9, 0.0]]), "recon": recon}
    losses = capsnet_losses(out, {"x": x, "y": torch.tensor([0, 0])}, cfg)
    assert torch.isclose(losses["margin"], torch.tensor(0.0))
    assert torch.isclose(losses["reconstruction"], torch.tensor(0.0005 * 0.75))
    assert torch.isclose(losses["total"], losses["margin"] + losses["reconstruction"])
