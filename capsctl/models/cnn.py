"""The paper's CNN baselines (Sabour et al. 2017), ``model.name: cnn``.

Convolutions of ``model.cnn_channels`` channels, 5x5, stride 1, 'same' padding, ReLU, each followed
by a ``model.cnn_pool[i]`` x ``cnn_pool[i]`` max-pooling when that entry is above 1; then fully
connected ReLU layers of ``model.cnn_hidden`` widths, each followed by dropout (``model.dropout``),
and a ``num_classes``-way linear output trained with softmax cross-entropy.

- MNIST, Table 1 (configs/mnist-cnn.yaml): 256, 256, 128 channels, no pooling, FC 328, FC 192:
  35,445,522 parameters (the paper: 35.4M; only 'same' padding without pooling gives that count).
- affNIST (configs/affnist-cnn.yaml): the same convolutions with 2x2 max-pooling after the first
  two (40 -> 20 -> 10), FC 848, FC 192: 13,484,826 parameters, within 0.1% of the 40x40 CapsNet
  with its decoder (13,475,648). The paper says only "max-pooling and dropout, similar number of
  parameters"; this keeps the Table 1 baseline's layers and widens the first FC layer to match.

forward(x, y=None) returns {"scores": (B, K) logits in fp32}; ``y`` is accepted and ignored.
Shape legend: B batch, C channels, S side, F flattened features, K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsctl.config import ModelConfig

KERNEL = 5



def classifier_head(in_features: int, m: ModelConfig) -> nn.Sequential:
    """The fully connected part of the baselines: (FC ReLU dropout) per model.cnn_hidden, then
    one linear layer to the classes."""
    fc, width = [], in_features
    for h in m.cnn_hidden:
        fc += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(m.dropout)]
        width = h
    fc.append(nn.Linear(width, m.num_classes))
    return nn.Sequential(*fc)

class CNN(nn.Module):
    def __init__(self, m: ModelConfig):
        super().__init__()
        self.cfg = m
        pools = m.cnn_pool or [1] * len(m.cnn_channels)
        layers, channels, side = [], m.in_channels, m.input_size
        for width, pool in zip(m.cnn_channels, pools):
            layers += [nn.Conv2d(channels, width, KERNEL, padding=KERNEL // 2),
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


def cnn_losses(out: dict, batch: dict) -> dict[str, torch.Tensor]:
    """Softmax cross-entropy of the logits, averaged over the batch."""
    ce = F.cross_entropy(out["scores"].float(), batch["y"])
    return {"cross_entropy": ce, "total": ce}
