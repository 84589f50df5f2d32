"""The CNN baselines: parameter counts of the paper's models, shapes, pooling, dropout, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capsctl.config import ConfigError, from_dict, load
from capsctl.data.registry import SINGLE
from capsctl.models import MODELS, build_model, count_parameters, loss_fn
from capsctl.models.cnn import CNN
from conftest import REPO, tiny_config


def meta_model(cfg):
    with torch.device("meta"):  # shapes and counts without allocating 35M weights
        return build_model(cfg.model)


def test_table1_baseline_has_35445522_parameters():
    cfg = load(REPO / "configs" / "mnist-cnn.yaml")
    model = meta_model(cfg)
    assert isinstance(model, CNN)
    assert count_parameters(model) == 35_445_522  # the paper's 35.4M
    out = model(torch.empty(3, 1, 28, 28, device="meta"))
    assert out["scores"].shape == (3, 10)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())


def test_affnist_cnn_matches_the_40x40_capsnet_size():
    cnn = meta_model(load(REPO / "configs" / "affnist-cnn.yaml"))
    caps = meta_model(load(REPO / "configs" / "affnist-capsnet.yaml"))
    assert count_parameters(cnn) == 13_484_826
    assert count_parameters(caps) == 13_475_648  # 4,608 primary capsules, decoder out 1,600
    assert caps.num_primary == 4608
    assert abs(count_parameters(cnn) / count_parameters(caps) - 1) < 0.01
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in cnn.modules()) == 2
    assert sum(isinstance(m, torch.nn.Dropout) for m in cnn.modules()) == 2
    assert cnn(torch.empty(2, 1, 40, 40, device="meta"))["scores"].shape == (2, 10)


def tiny_cnn(size=28, pool=(), dropout=0.5):
    """A tiny cnn on MNIST (28) or expanded MNIST (40)."""
    return tiny_config(model={"name": "cnn", "input_size": size, "channels": [4, 6],
                              "hidden": [12, 8], "pool": list(pool), "dropout": dropout},
                       data={"name": "mnist" if size == 28 else "expanded-mnist"})


@pytest.mark.parametrize("size,pool,features", [(28, (), 6 * 28 * 28), (40, (2, 2), 6 * 10 * 10),
                                                (40, (1, 4), 6 * 10 * 10)])
def test_shapes_pooling_and_dropout(size, pool, features):
    cfg = tiny_cnn(size, pool)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert model.classifier[0].in_features == features
    x = torch.rand(5, 1, size, size)
    out = model(x, torch.zeros(5, dtype=torch.long))  # labels accepted and ignored
    assert set(out) == {"scores"} and out["scores"].shape == (5, 10)
    assert out["scores"].dtype == torch.float32
    model.eval()
    assert torch.equal(model(x)["scores"], model(x)["scores"])  # no dropout in eval
    model.train()
    assert not torch.equal(model(x)["scores"], model(x)["scores"])  # dropout in training


def test_cross_entropy_loss_and_gradients():
    cfg = tiny_cnn()
    assert MODELS["cnn"].losses == {SINGLE: "capsctl.models.cnn:cnn_losses"}
    model = build_model(cfg.model)
    batch = {"x": torch.rand(6, 1, 28, 28), "y": torch.tensor([0, 1, 2, 3, 4, 5])}
    out = model(batch["x"], batch["y"])
    losses = loss_fn(cfg, SINGLE)(out, batch)
    assert set(losses) == {"cross_entropy", "total"}
    assert torch.allclose(losses["total"], F.cross_entropy(out["scores"], batch["y"]))
    losses["total"].backward()
    assert model.features[0].weight.grad.abs().sum() > 0


def test_bad_pooling_is_a_config_error():
    base = {"model": {"name": "cnn", "channels": [4, 4]}}
    with pytest.raises(ConfigError, match="one window per conv"):
        from_dict({**base, "model": {**base["model"], "pool": [2]}})
    with pytest.raises(ConfigError, match="to nothing"):
        from_dict({**base, "model": {**base["model"], "pool": [8, 8]}})
    with pytest.raises(ConfigError, match=r"'model.pool\[0\]' must be >= 1"):
        from_dict({**base, "model": {**base["model"], "pool": [0, 1]}})
    with pytest.raises(ConfigError, match=r"unknown config key 'model.cnn_pool' \(did you mean "
                                          r"'model.pool'\?\)"):
        from_dict({"model": {"name": "cnn", "cnn_pool": [2, 2, 1]}})
