"""The paper's CNN baselines (Sabour et al. 2017), ``model.name: cnn``.

Convolutions of ``model.channels`` channels, 5x5, stride 1, 'same' padding, ReLU, each followed
by a ``model.pool[i]`` x ``pool[i]`` max-pooling when that entry is above 1; then fully
connected ReLU layers of ``model.hidden`` widths, each followed by dropout (``model.dropout``),
and a ``num_classes``-way linear output trained with softmax cross-entropy.

- MNIST, Table 1 (configs/mnist-cnn.yaml): 256, 256, 128 channels, no pooling, FC 328, FC 192:
  35,445,522 parameters (the paper: 35.4M; only 'same' padding without pooling gives that count).
- affNIST (configs/affnist-cnn.yaml): the same convolutions with 2x2 max-pooling after the first
  two (40 -> 20 -> 10), FC 848, FC 192: 13,484,826 parameters, within 0.1% of the 40x40 CapsNet
  with its decoder (13,475,648). The paper says only "max-pooling and dropout, similar number of
  parameters"; this keeps the Table 1 baseline's layers and widens the first FC layer to match.

forward(x, y=None) returns {"scores": (B, K) logits in fp32}; ``y`` is accepted and ignored
(the trainer hands labels to every model, capsctl/models/contract.py).
Shape legend: B batch, C channels, S side, F flattened features, K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsctl.models.conv import Conv2d
from capsctl.models.cnn_config import CNNConfig, MultiMNISTCNNConfig

KERNEL = 5



def classifier_head(in_features: int, m: CNNConfig | MultiMNISTCNNConfig) -> nn.Sequential:
    """The fully connected part of the baselines: (FC ReLU dropout) per model.hidden, then
    one linear layer to the classes."""
    fc, width = [], in_features
    for h in m.hidden:
        fc += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(m.dropout)]
        width = h
    fc.append(nn.Linear(width, m.num_classes))
    return nn.Sequential(*fc)

class CNN(nn.Module):
    """Honours capsctl/models/contract.py: no capsules, no decoder, no routing."""

    capsule_key = None
    routing_label = None
    has_decoder = False
    routing_layout = None

    def __init__(self, m: CNNConfig):
        super().__init__()
        self.cfg = m
        pools = m.pool or [1] * len(m.channels)
        layers, channels, side = [], m.in_channels, m.input_size
        for width, pool in zip(m.channels, pools):
            layers += [Conv2d(channels, width, KERNEL, padding=KERNEL // 2),
                       nn.ReLU(inplace=True)]
            if pool > 1:
                layers.append(nn.MaxPool2d(pool))
                side //= pool
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(channels * side * side, m)

    def forward(self, x_BCSS: torch.Tensor, y: torch.Tensor | None = None,
                keep_routing: bool = False) -> dict:
        h_BF = self.features(x_BCSS).flatten(1)
        return {"scores": self.classifier(h_BF).float()}


def cnn_losses(out: dict, batch: dict, loss_cfg=None, step: int = 0) -> dict[str, torch.Tensor]:
    """Softmax cross-entropy of the logits, averaged over the batch."""
    ce = F.cross_entropy(out["scores"].float(), batch["y"])
    return {"cross_entropy": ce, "total": ce}
