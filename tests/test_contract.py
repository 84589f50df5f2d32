"""Every model family satisfies capsctl/models/contract.py: build_model returns a
CapsctlModel (its declarations and forward), a family that declares a decoder can decode, one
with vector capsules has votes, and forward returns only ModelOutput's keys, with the class
capsules under the declared capsule_key and a reconstruction exactly when it has a decoder."""

from __future__ import annotations

import pytest
import torch

from capsctl.models import MODELS, build_model
from capsctl.models.contract import CanDecode, CapsctlModel, HasVotes, ModelOutput
from conftest import tiny_config

TINY = {  # one tiny config per family: a new family is added here (the test below says so)
    "capsnet": {},
    "cnn": {"model": {"name": "cnn", "channels": [4], "hidden": [8]}},
    "multimnist-cnn": {"model": {"name": "multimnist-cnn", "channels": [4], "hidden": [8]},
                       "data": {"name": "multimnist"}},
    "efficient-capsnet": {"model": {"name": "efficient-capsnet",
                                    "conv_channels": [8, 8, 8, 16]}},
    "em-capsnet": {"model": {"name": "em-capsnet", "conv1_channels": 8, "primary_types": 4,
                             "caps1_types": 3, "caps2_types": 3, "decoder": False},
                   "loss": {"recon_weight": 0.0, "m_steps": 20}},
}


def test_every_family_has_a_tiny_config_here():
    assert set(TINY) == set(MODELS)


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_family_satisfies_the_contract(family):
    torch.manual_seed(0)
    cfg = tiny_config(**TINY[family])
    model = build_model(cfg.model).eval()
    assert isinstance(model, CapsctlModel)
    assert not model.has_decoder or isinstance(model, CanDecode)
    assert model.capsule_key != "v" or isinstance(model, HasVotes)
    side, channels = cfg.model.input_size, cfg.model.in_channels
    with torch.no_grad():
        out = model(torch.rand(2, channels, side, side),
                    keep_routing=model.routing_layout is not None)
    assert set(out) <= set(ModelOutput.__annotations__), sorted(out)
    assert out["scores"].shape == (2, cfg.model.num_classes)
    assert model.capsule_key is None or model.capsule_key in out
    assert ("recon" in out) == bool(model.has_decoder)
    assert ("routing" in out) == (model.routing_layout is not None)
