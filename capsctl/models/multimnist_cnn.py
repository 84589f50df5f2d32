"""The paper's MultiMNIST baseline CNN (Sabour et al. 2017, section 6; the authors' code): two
convolutions of 512 and 256 channels, each followed by ReLU and 2x2 max-pooling, a fully connected
layer of 1024 (ReLU, dropout), and 10 sigmoid outputs trained on both labels (binary
cross-entropy).

Choices where the paper is silent: 5x5 kernels with "same" padding, stride 1. On the 36x36
MultiMNIST canvas this gives 36 -> 18 -> 9, a 9x9x256 = 20,736 feature vector and 24,535,306
parameters (the paper: ~24.6M). Widths come from ``model.channels`` and ``model.hidden``.

forward(x, y=None) returns {"scores": (B, K) sigmoid probabilities, "logits": (B, K)}; ``y`` is
accepted and ignored (the trainer passes labels to every model).
"""

from __future__ import annotations

import torch
from torch import nn

from capsctl.models.conv import Conv2d
from capsctl.models.cnn_config import MultiMNISTCNNConfig
from capsctl.models.cnn import classifier_head

KERNEL = 5


class MultiMNISTCNN(nn.Module):
    """Honours capsctl/models/contract.py: no capsules, no decoder, no routing."""

    capsule_key = None
    routing_label = None
    has_decoder = False
    routing_layout = None

    def __init__(self, m: MultiMNISTCNNConfig):
        super().__init__()
        self.cfg = m
        layers, channels, side = [], m.in_channels, m.input_size
        for width in m.channels:
            layers += [Conv2d(channels, width, KERNEL, padding=KERNEL // 2),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels, side = width, side // 2
        self.features = nn.Sequential(*layers)
        self.classifier = classifier_head(channels * side * side, m)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                keep_routing: bool = False) -> dict:
        logits_BK = self.classifier(self.features(x).flatten(1)).float()
        return {"scores": torch.sigmoid(logits_BK), "logits": logits_BK}
