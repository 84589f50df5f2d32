"""Model registry: ``model.name`` -> (module class, loss function). Plain dicts."""

from __future__ import annotations

from torch import nn

from capsctl.config import Config, ModelConfig
from capsctl.models.capsnet import CapsNet
from capsctl.models.cnn import CNN, cnn_losses
from capsctl.models.em_capsnet import EMCapsNet, em_losses
from capsctl.models.losses import capsnet_losses, multilabel_bce_losses, multimnist_losses
from capsctl.models.multimnist_cnn import MultiMNISTCNN

# model.name -> module class built from ModelConfig
MODELS: dict[str, type[nn.Module]] = {"capsnet": CapsNet, "em-capsnet": EMCapsNet,
                                       "multimnist-cnn": MultiMNISTCNN, "cnn": CNN}
# model.name -> fn(out, batch, cfg: Config, step: int) -> dict of named scalar terms incl. "total"
LOSSES = {
    # two-digit batches (MultiMNIST, with "y2") take the two-label loss; MNIST is unchanged
    "capsnet": lambda out, batch, cfg, step: (multimnist_losses if "y2" in batch
                                              else capsnet_losses)(out, batch, cfg.loss),
    "multimnist-cnn": lambda out, batch, cfg, step: multilabel_bce_losses(out, batch),
    "em-capsnet": em_losses,
    "cnn": lambda out, batch, cfg, step: cnn_losses(out, batch),
}


def build_model(m: ModelConfig) -> nn.Module:
    return MODELS[m.name](m)


def loss_fn(cfg: Config):
    """The loss function of the configured model: ``fn(out, batch, step=0) -> dict of terms``
    (``step`` serves losses with schedules, e.g. a rising margin)."""
    fn = LOSSES[cfg.model.name]
    return lambda out, batch, step=0: fn(out, batch, cfg, step)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
