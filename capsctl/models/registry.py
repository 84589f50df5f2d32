"""Model families by name: ``MODELS[model.name]`` is a ModelSpec. Plain dict, torch-free (the
module and loss functions are imported only when a model is built), so ``capsctl config``
checks a config without loading torch.

To add a family: write its config dataclass (``<family>_config.py``, with ``check(source)``),
its ``nn.Module`` honouring ``capsctl/models/contract.py``, its loss function(s), and add one
entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from capsctl.lazy import resolve
from capsctl.models.contract import CapsctlModel
from capsctl.models.capsnet_config import CapsNetConfig, MarginLossConfig
from capsctl.models.cnn_config import (CNNConfig, CrossEntropyLossConfig, MultiMNISTCNNConfig,
                                       NoLossConfig)
from capsctl.models.efficient_config import EfficientCapsNetConfig
from capsctl.models.em_config import EMCapsNetConfig, SpreadLossConfig
from capsctl.tasks import PAIR, SINGLE


@dataclass(frozen=True)
class ModelSpec:
    """One family: ``config`` is the ``model`` section's dataclass, ``loss_config`` the ``loss``
    section's; ``module`` and ``losses`` (one per task kind the family can learn) are
    "module:attribute" paths. A loss is ``fn(out, batch, loss_cfg, step) -> dict`` of named
    scalar terms including ``total``. ``class_loss`` ("module:attribute", one-label tasks) is
    the family's classification loss alone, per example: ``fn(scores_BJ, y_B, loss_cfg) ->
    (B,)`` (what ``capsctl attack`` ascends); None where the family has none (two labels)."""

    config: type
    loss_config: type
    module: str
    losses: dict[str, str]
    summary: str
    class_loss: str | None = None


MODELS: dict[str, ModelSpec] = {
    "capsnet": ModelSpec(CapsNetConfig, MarginLossConfig, "capsctl.models.capsnet:CapsNet",
                         {SINGLE: "capsctl.models.losses:capsnet_losses",
                          PAIR: "capsctl.models.losses:multimnist_losses"},
                         "CapsNet with dynamic routing (Sabour et al. 2017)",
                         "capsctl.models.losses:margin_loss_of"),
    "em-capsnet": ModelSpec(EMCapsNetConfig, SpreadLossConfig,
                            "capsctl.models.em_capsnet:EMCapsNet",
                            {SINGLE: "capsctl.models.em_capsnet:em_losses"},
                            "matrix capsules with EM routing (Hinton et al. 2018)",
                            "capsctl.models.em_capsnet:spread_loss_of"),
    "cnn": ModelSpec(CNNConfig, CrossEntropyLossConfig, "capsctl.models.cnn:CNN",
                     {SINGLE: "capsctl.models.cnn:cnn_losses"},
                     "the paper's CNN baseline (softmax cross-entropy)",
                     "capsctl.models.cnn:cross_entropy_of"),
    "multimnist-cnn": ModelSpec(MultiMNISTCNNConfig, NoLossConfig,
                                "capsctl.models.multimnist_cnn:MultiMNISTCNN",
                                {PAIR: "capsctl.models.losses:multilabel_bce_losses"},
                                "the paper's MultiMNIST CNN baseline (sigmoid outputs)"),
    "efficient-capsnet": ModelSpec(EfficientCapsNetConfig, MarginLossConfig,
                                   "capsctl.models.efficient_capsnet:EfficientCapsNet",
                                   {SINGLE: "capsctl.models.losses:capsnet_losses"},
                                   "Efficient-CapsNet: depthwise primary capsules, "
                                   "self-attention routing (Mazzia et al. 2021)",
                                   "capsctl.models.losses:margin_loss_of"),
}


def spec(name: str) -> ModelSpec:
    return MODELS[name]


def build_model(model_cfg) -> CapsctlModel:
    """The ``nn.Module`` of ``model_cfg`` (a family's config dataclass), on the CPU; it honours
    capsctl/models/contract.py (tests/test_contract.py checks every family)."""
    return resolve(MODELS[model_cfg.name].module)(model_cfg)


def loss_fn(cfg, task: str) -> Callable:
    """The configured family's loss for ``task``: ``fn(out, batch, step=0) -> dict`` of named
    scalar terms incl. ``total`` (``step`` serves losses with schedules, e.g. a rising margin)."""
    fn = resolve(MODELS[cfg.model.name].losses[task])
    loss_cfg = cfg.loss
    return lambda out, batch, step=0: fn(out, batch, loss_cfg, step)


def class_loss_fn(cfg) -> Callable | None:
    """The configured family's per-example classification loss ``fn(scores_BJ, y_B) -> (B,)``
    (ModelSpec.class_loss), or None where it has none."""
    path = MODELS[cfg.model.name].class_loss
    if path is None:
        return None
    fn, loss_cfg = resolve(path), cfg.loss
    return lambda scores_BJ, y_B: fn(scores_BJ, y_B, loss_cfg)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
