"""The CapsNet of Sabour, Frosst & Hinton (2017): Conv1 -> PrimaryCaps -> DigitCaps (routed)
-> decoder from the masked class capsules.

forward(x, y=None) returns a dict:
  v        (B, J, D)  class capsule vectors (fp32)
  scores   (B, J)     their lengths, the class probabilities used for prediction
  recon    (B, C*H*W) reconstruction from the capsule of ``y`` (training) or of the prediction;
           (B, K, C*H*W) when ``y`` is (B, K): one reconstruction per listed capsule (MultiMNIST)
  routing  list of (B, I, J) coupling coefficients per pass, when ``keep_routing``

The routed layer (``digits``) is the algorithm ``model.routing.name`` names (capsctl/models/routing/),
dynamic routing by agreement by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from capsctl.models import routing
from capsctl.models.conv import Conv2d
from capsctl.models.capsnet_config import CapsNetConfig, primary_grid
from capsctl.models.capsules import PrimaryCaps, safe_norm


class Decoder(nn.Module):
    """FC ReLU layers then a sigmoid output of one image: the masked capsules -> pixels."""

    def __init__(self, in_features: int, hidden: list[int], out_features: int):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers += [nn.Linear(width, out_features), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, masked_BJD: torch.Tensor) -> torch.Tensor:
        return self.net(masked_BJD.flatten(1))


def masked_decode(decoder: nn.Module, caps_BJD: torch.Tensor, classes_B: torch.Tensor
                  ) -> torch.Tensor:
    """``decoder`` of the class capsules with every capsule but that of ``classes_B`` masked to
    zero: recon (B, N) fp32. ``classes`` (B, K) (e.g. MultiMNIST's two labels) decodes each of
    the K capsules on its own: recon (B, K, N). Every family with a decoder decodes this way."""
    if classes_B.dim() == 2:
        B, K = classes_B.shape
        caps_bJD = caps_BJD.unsqueeze(1).expand(B, K, *caps_BJD.shape[1:]).reshape(
            B * K, *caps_BJD.shape[1:])
        return masked_decode(decoder, caps_bJD, classes_B.reshape(-1)).view(B, K, -1)
    mask_BJ = F.one_hot(classes_B, caps_BJD.shape[1]).to(caps_BJD.dtype)
    return decoder(caps_BJD * mask_BJ.unsqueeze(-1)).float()


class CapsNet(nn.Module):
    """Honours capsctl/models/contract.py: vector class capsules ``v``, routing couplings."""

    capsule_key = "v"

    def __init__(self, m: CapsNetConfig):
        super().__init__()
        self.cfg = m
        self.conv1 = Conv2d(m.in_channels, m.conv1_channels, m.conv1_kernel)
        self.primary = PrimaryCaps(m.conv1_channels, m.primary_types, m.primary_dim,
                                   m.primary_kernel, m.primary_stride, m.primary_scale)
        self.grid = primary_grid(m)
        self.num_primary = m.primary_types * self.grid * self.grid
        self.digits = routing.build(m.routing, self.num_primary, m.num_classes, m.primary_dim,
                                    m.class_dim, m.transform_init_std)
        self.decoder = (Decoder(m.num_classes * m.class_dim, m.decoder_hidden,
                                m.in_channels * m.input_size ** 2) if m.decoder else None)

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    @property
    def routing_label(self) -> str:
        """What out["routing"] holds, named by the configured routing ("coupling c_ij",
        "attention c_ij", "routing r_ij")."""
        return routing.ROUTINGS[self.cfg.routing.name].label

    @property
    def routing_layout(self) -> tuple[int, int, int]:
        """(types, H, W) of the routed children: child i of out["routing"] (B, I, J) is type
        i // (H*W) at grid row (i // W) % H, column i % W (I = types * H * W)."""
        return self.cfg.primary_types, self.grid, self.grid

    def votes(self, x: torch.Tensor) -> torch.Tensor:
        """u_hat (B, I, J, D): every primary capsule's prediction for every class capsule (the
        routed layer's input; inspection only, the training path never forms it whole)."""
        return self.digits.predictions(self.primary(F.relu(self.conv1(x))))

    def encode(self, x: torch.Tensor, keep_routing: bool = False):
        """v (B, J, D) fp32 and the routing of every pass (B, I, J) (empty unless kept)."""
        h = F.relu(self.conv1(x), inplace=True)  # conv backward needs only its input
        u_BIP = self.primary(h)
        return self.digits(u_BIP, keep_routing)

    def decode(self, v_BJD: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
        """Reconstruction from the capsule of ``classes_B`` alone (``masked_decode``)."""
        return masked_decode(self.decoder, v_BJD, classes_B)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                keep_routing: bool = False) -> dict:
        v_BJD, couplings = self.encode(x, keep_routing)
        scores_BJ = safe_norm(v_BJD)
        out = {"v": v_BJD, "scores": scores_BJ}
        if self.decoder is not None:
            classes = y if y is not None else scores_BJ.argmax(dim=1)
            out["recon"] = self.decode(v_BJD, classes)
        if keep_routing:
            out["routing"] = couplings
        return out
