"""docs/architecture.md's recipe "To add a routing", followed literally by a test-only file: this
file is the routing's two files in one (step 1: the layer and ``build``; step 2: its options
dataclass and the ``register`` line) and step 3's config is a mapping. Nothing in capsctl names
the routing: it registers with its own options, its key is refused by the other routings and
theirs by it, the config reference gets its table, and a CapsNet with it trains a step, writes a
checkpoint and loads it back.

Shape legend: B batch, I children, J parents, P a child's dimension, D a parent's, N = B * J.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from capsctl import checkpoint
from capsctl import config as C
from capsctl.errors import ConfigError
from capsctl.fields import field
from capsctl.models import build_model
from capsctl.models.capsules import squash
from capsctl.models.routing import ROUTINGS, RoutingSpec, register
from capsctl.models.routing.votes import Votes, agree, combine, wide
from conftest import REPO, tiny_config

NAME = "mean-agreement"


# --- step 1: capsctl/models/routing/<name>.py, the layer and build --------------------------------

class MeanAgreementRouting(Votes):
    """One pass: each child's coupling to parent j is the softmax over the parents of its vote's
    agreement with the parent's mean vote, divided by ``temperature``:
    c_ij = softmax_j(u_hat_j|i . mean_k u_hat_j|k / temperature), v_j = squash(sum_i c_ij
    u_hat_j|i)."""

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int, init_std: float,
                 temperature: float):
        super().__init__(in_caps, out_caps, in_dim, out_dim, init_std)
        self.temperature = temperature

    def forward(self, u_BIP: torch.Tensor, keep_routing: bool = False):
        u_hat_BJID = self.predictions_BJID(u_BIP)
        B, J, I, D = u_hat_BJID.shape
        uh_NID = u_hat_BJID.view(B * J, I, D)
        mean_ND = wide(u_hat_BJID.mean(2)).view(B * J, D)
        c_BJI = torch.softmax(agree(uh_NID, mean_ND).view(B, J, I) / self.temperature, dim=1)
        v_BJD = squash(combine(c_BJI.view(B * J, I), uh_NID).view(B, J, D))
        return v_BJD, ([c_BJI.transpose(1, 2)] if keep_routing else [])


def build(in_caps: int, out_caps: int, in_dim: int, out_dim: int, init_std: float,
          options) -> MeanAgreementRouting:
    return MeanAgreementRouting(in_caps, out_caps, in_dim, out_dim, init_std,
                                options.temperature)


# --- step 2: its options dataclass and one register line (routing/__init__.py) --------------------

@dataclass
class MeanAgreementConfig:
    name: str = field(NAME, "one pass: couplings from each vote's agreement with the mean vote")
    temperature: float = field(1.0, "divides the agreement before the softmax over the parents",
                               gt=0)


@pytest.fixture
def registered():
    spec = register(RoutingSpec(MeanAgreementConfig, f"{__name__}:build", "coupling c_ij",
                                "one pass from the agreement with the mean vote", "none (a test)"))
    yield spec
    del ROUTINGS[NAME]


# --- step 3: a config ----------------------------------------------------------------------------

CONFIG = {"routing": {"name": NAME, "temperature": 0.5}}


def test_the_routing_needs_no_line_in_capsules_or_the_capsnet_config(registered):
    for path in ("capsctl/models/capsules.py", "capsctl/models/capsnet_config.py",
                 "capsctl/models/capsnet.py", "capsctl/models/routing/__init__.py"):
        assert NAME not in (REPO / path).read_text() and "temperature" not in \
            (REPO / path).read_text(), path
    assert ROUTINGS[NAME] is registered


def test_it_registers_with_its_own_options(registered):
    cfg = C.from_dict({"model": CONFIG})
    assert cfg.model.routing == MeanAgreementConfig(temperature=0.5)
    assert C.from_dict({"model": {"routing": NAME}}).model.routing.temperature == 1.0
    assert C.load(None, [f"model.routing={NAME}", "model.routing.temperature=2"]
                  ).model.routing.temperature == 2.0
    with pytest.raises(ConfigError, match="'model.routing.temperature' must be > 0"):
        C.from_dict({"model": {"routing": {"name": NAME, "temperature": 0}}})
    tables = dict(C.reference())
    assert [k for k, _, _ in tables[f"model.routing: {NAME} - {registered.summary}"]] == \
        ["model.routing.name", "model.routing.temperature"]


@pytest.mark.parametrize("doc,needle", [
    ({"name": NAME, "iterations": 2},
     f"'model.routing.iterations' (formerly model.routing_iterations) is not an option of "
     f"routing {NAME} (it belongs to dynamic, inverted-dot-product); {NAME} takes: temperature"),
    ({"name": "dynamic", "temperature": 2.0},
     f"'model.routing.temperature' is not an option of routing dynamic (it belongs to {NAME}); "
     "dynamic takes: iterations, class_bias, leaky"),
])
def test_a_key_of_another_routing_is_one_line_naming_its_owner(registered, doc, needle):
    with pytest.raises(ConfigError) as e:
        C.from_dict({"model": {"routing": doc}})
    assert "\n" not in str(e.value) and needle in str(e.value)


def test_the_layer_reads_its_option(registered):
    cfg = tiny_config(model={**CONFIG, "transform_init_std": 0.5})
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    assert type(model.digits) is MeanAgreementRouting and model.digits.temperature == 0.5
    assert model.routing_label == "coupling c_ij"
    x = torch.rand(2, 1, 28, 28)
    out = model(x, keep_routing=True)
    (c,) = out["routing"]
    assert c.shape == (2, model.num_primary, 10)
    torch.testing.assert_close(c.sum(2), torch.ones(2, model.num_primary))   # over the parents
    model.digits.temperature = 50.0                       # nearer the uniform 1/J
    (c_hot,) = model(x, keep_routing=True)["routing"]
    assert (c_hot - 0.1).abs().max() < 0.5 * (c - 0.1).abs().max()


def test_a_capsnet_with_it_trains_a_step_and_loads_back(registered, tmp_path, fake_mnist):
    from capsctl.training import prepare_run_dir, train

    cfg = tiny_config(model={**CONFIG, "transform_init_std": 0.1},
                      train={"max_steps": 1, "log_every": 1})
    folder = prepare_run_dir(tmp_path / "runs", NAME, force=False)
    summary = train(cfg, folder, torch.device("cpu"), data_root=str(fake_mnist),
                    show_progress=False)
    assert summary["steps"] == 1
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss_total"] for r in rows if "train/loss_total" in r]
    assert len(losses) == 1 and 0 < losses[0] < 10
    last = Path(folder) / "checkpoints" / "last.pt"
    model, loaded, _ = checkpoint.load_model(last, torch.device("cpu"))
    assert loaded.model.routing == MeanAgreementConfig(temperature=0.5)
    assert type(model.digits) is MeanAgreementRouting
