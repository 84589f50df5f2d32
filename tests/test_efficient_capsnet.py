"""Efficient-CapsNet (configs/efficient-capsnet.yaml): the paper's parameter count part by part,
its squash, depthwise primary capsules, self-attention routing against the loop of its
equations, the model contract, its config checks and a few training steps."""

from __future__ import annotations

import math

import pytest
import torch

from capsctl.config import from_dict, load
from capsctl.errors import ConfigError
from capsctl.models import MODELS, build_model, count_parameters
from capsctl.models.efficient_capsnet import EfficientCapsNet, efficient_squash
from conftest import REPO, tiny_config
from test_routing_algorithms import self_attention_reference

PAPER_PARAMETERS = 161_824  # Mazzia et al. 2021, MNIST, without the reconstruction decoder
DECODER_28 = (160 * 512 + 512) + (512 * 1024 + 1024) + (1024 * 784 + 784)


def efficient(**model) -> EfficientCapsNet:
    return build_model(from_dict({"model": {"name": "efficient-capsnet", **model}}).model)


def test_parameter_count_is_the_papers_part_by_part():
    model = efficient(decoder=False)
    convs = (32 * 1 * 25 + 32) + (64 * 32 * 9 + 64) + (64 * 64 * 9 + 64) + (128 * 64 * 9 + 128)
    batch_norm = 2 * (32 + 64 + 64 + 128)      # scale and shift; running stats are buffers
    depthwise = 128 * 9 * 9 + 128
    W, priors = 16 * 10 * 16 * 8, 10 * 16
    assert convs == 130_112
    assert convs + batch_norm + depthwise + W + priors == PAPER_PARAMETERS
    assert count_parameters(model) == PAPER_PARAMETERS
    assert count_parameters(model.primary) == depthwise
    assert count_parameters(model.digits) == W + priors
    assert count_parameters(efficient()) == PAPER_PARAMETERS + DECODER_28 == 1_573_168


def test_the_shipped_config_is_the_papers_model():
    cfg = load(REPO / "configs" / "efficient-capsnet.yaml")
    assert cfg.model.name == "efficient-capsnet" and cfg.train.batch_size == 16
    with torch.device("meta"):
        assert count_parameters(build_model(cfg.model)) == 1_573_168


def test_the_squash_of_the_paper():
    s = torch.randn(500, 8) * torch.logspace(-3, 1.5, 500)[:, None]
    v = efficient_squash(s)
    n = s.norm(dim=-1)
    torch.testing.assert_close(v.norm(dim=-1), 1 - torch.exp(-n), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True), s / n[:, None])
    z = torch.zeros(2, 8, requires_grad=True)
    out = efficient_squash(z)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(2, 8)) and torch.isfinite(z.grad).all()


def test_mnist_has_16_primary_capsules_of_8_channels_each():
    torch.manual_seed(0)
    model = efficient().eval()
    assert model.routing_layout == (16, 1, 1)
    x = torch.rand(2, 1, 28, 28)
    h = model.convs(x)
    assert h.shape == (2, 128, 9, 9)
    a = model.primary.conv(h)                       # (2, 128, 1, 1): one position
    u = model.primary(h)
    assert u.shape == (2, 16, 8)
    for t in (0, 5, 15):
        torch.testing.assert_close(u[:, t], efficient_squash(a[:, 8 * t:8 * t + 8, 0, 0]))


def test_the_routing_is_the_self_attention_of_its_equations():
    torch.manual_seed(0)
    model = efficient().eval()
    with torch.no_grad():
        model.digits.prior_JI.normal_(0, 0.2)
    u = model.primary(model.convs(torch.rand(2, 1, 28, 28))).detach()
    v, (c,) = model.digits(u, keep_routing=True)
    v_ref, c_ref = self_attention_reference(u, model.digits.W_IJDP, model.digits.prior_JI,
                                            efficient_squash)
    torch.testing.assert_close(v, v_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)


def test_the_contract_and_a_40px_input():
    torch.manual_seed(0)
    model = efficient().eval()
    assert model.capsule_key == "v" and model.has_decoder and model.routing_label
    x = torch.rand(3, 1, 28, 28)
    out = model(x, keep_routing=True)
    assert out["v"].shape == (3, 10, 16) and out["recon"].shape == (3, 784)
    assert out["routing"][0].shape == (3, 16, 10)
    pred = out["scores"].argmax(1)
    torch.testing.assert_close(out["recon"], model.decode(out["v"], pred))
    assert model.decode(out["v"], torch.stack([pred, pred], 1)).shape == (3, 2, 784)
    assert model.votes(x).shape == (3, 16, 10, 16)
    big = build_model(tiny_config(model={"name": "efficient-capsnet"},
                                  data={"name": "expanded-mnist"}).model)
    assert big.routing_layout == (16, 7, 7)          # 40 -> 36 -> 34 -> 32 -> 15 -> 7
    assert big(torch.rand(2, 1, 40, 40))["recon"].shape == (2, 1600)
    assert "efficient-capsnet" in MODELS


@pytest.mark.parametrize("model,match", [
    ({"conv_kernels": [5, 3]}, "one entry per convolution"),
    ({"conv_channels": [32, 64, 64, 100]}, "multiple of"),
    ({"primary_kernel": 12}, "too small"),
])
def test_config_checks(model, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"model": {"name": "efficient-capsnet", **model}})


def test_he_initialisation_as_the_authors_code():
    torch.manual_seed(0)
    model = efficient()
    W = model.digits.W_IJDP.detach()
    std = math.sqrt(2.0 / (10 * 16 * 8))
    assert abs(float(W.std()) - std) < 0.1 * std and float(W.abs().max()) <= 2 * std / 0.8796
    assert float(model.digits.prior_JI.detach().abs().max()) == 0.0


def test_a_few_training_steps(tmp_path, fake_mnist):
    from capsctl.training import train

    cfg = tiny_config(model={"name": "efficient-capsnet", "conv_channels": [8, 8, 8, 16]},
                      data={"root": str(fake_mnist)}, train={"max_steps": 4})
    summary = train(cfg, tmp_path / "run", torch.device("cpu"), show_progress=False)
    assert summary["steps"] == 4 and 0.0 <= summary["test_accuracy"] <= 1.0
