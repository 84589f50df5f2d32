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

With ``model.decoder`` (off in the paper's baselines) the CNN also reconstructs its input from
its last hidden layer, class-conditionally, as DARCCC's CNN does (Frosst, Sabour & Hinton 2018:
"trained to reconstruct the image from all or part of the last hidden layer before the
softmax"): the hidden vector h (H) is placed in the block of one class of a (K, H) input whose
other blocks are zero (the masking CapsNet's decoder sees, with h standing in for every class's
capsule), then CapsNet's decoder (FC 512, FC 1024, sigmoid pixels), trained with the same
0.0005 x sum of squared errors. docs/adversarial.md says why.

forward(x, y=None) returns {"scores": (B, K) logits in fp32} and, with a decoder, "recon"
(B, C*S*S) from the block of ``y`` (training) or of the prediction; ``y`` is otherwise ignored
(the trainer hands labels to every model, capsctl/models/contract.py).
Shape legend: B batch, C channels, S side, F flattened features, K classes, H last hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsctl.models.capsnet import Decoder, masked_decode
from capsctl.models.conv import Conv2d
from capsctl.models.cnn_config import CNNConfig, CrossEntropyLossConfig, MultiMNISTCNNConfig

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
    """Honours capsctl/models/contract.py: no capsules, no routing; a decoder when
    ``model.decoder`` (its ``decode`` takes the last hidden layer repeated per class, (B, K, H),
    where a capsule model takes its class capsules)."""

    capsule_key = None
    routing_label = None
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
        hidden = m.hidden[-1] if m.hidden else channels * side * side
        self.decoder = (Decoder(m.num_classes * hidden, m.decoder_hidden,
                                m.in_channels * m.input_size ** 2) if m.decoder else None)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    def decode(self, h_BKH: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, N) from the block of ``classes_B`` alone (``masked_decode``)."""
        return masked_decode(self.decoder, h_BKH, classes_B)

    def forward(self, x_BCSS: torch.Tensor, y: torch.Tensor | None = None,
                keep_routing: bool = False) -> dict:
        f_BF = self.features(x_BCSS).flatten(1)
        h_BH = self.classifier[:-1](f_BF)        # the last hidden layer (after its dropout)
        logits_BK = self.classifier[-1](h_BH).float()
        out = {"scores": logits_BK}
        if self.decoder is not None:
            classes = y if y is not None else logits_BK.argmax(dim=1)
            h_BKH = h_BH.unsqueeze(1).expand(-1, logits_BK.shape[1], -1)
            out["recon"] = self.decode(h_BKH, classes)
        return out


def cnn_losses(out: dict, batch: dict, loss_cfg: CrossEntropyLossConfig | None = None,
               step: int = 0) -> dict[str, torch.Tensor]:
    """Softmax cross-entropy of the logits, averaged over the batch, plus ``recon_weight`` x the
    reconstruction's sum of squared errors when the model has a decoder."""
    from capsctl.models.losses import reconstruction_sse

    ce = F.cross_entropy(out["scores"].float(), batch["y"])
    losses = {"cross_entropy": ce, "total": ce}
    weight = loss_cfg.recon_weight if loss_cfg is not None else 0.0
    if "recon" in out and weight > 0:
        losses["reconstruction"] = weight * reconstruction_sse(out["recon"], batch["x"]).mean()
        losses["total"] = ce + losses["reconstruction"]
    return losses


def cross_entropy_of(scores_BK: torch.Tensor, y_B: torch.Tensor,
                     loss_cfg: CrossEntropyLossConfig | None = None) -> torch.Tensor:
    """Softmax cross-entropy per example (B,): the CNN's ``class_loss`` (registry.ModelSpec)."""
    return F.cross_entropy(scores_BK.float(), y_B, reduction="none")
