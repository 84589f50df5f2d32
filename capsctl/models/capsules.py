"""Capsule building blocks: the squash, capsule lengths, and primary capsules. The routed layers
(the capsules of a layer computed from the capsules below by routing) are in
capsctl/models/routing/.

Shape legend (suffixes on tensor names): B batch, I capsules, P a capsule's dimension,
C channels, T capsule types, G grid side.
"""

from __future__ import annotations

import torch
from torch import nn

from capsctl.models.conv import Conv2d
from capsctl.models.routing.votes import wide

SQUASH_EPS = 1e-8


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|, computed in fp32; a zero vector maps to zero (not NaN)."""
    s32 = wide(s)
    sq = (s32 * s32).sum(dim, keepdim=True)
    return s32 * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


def safe_norm(v: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """Vector length in fp32 with a finite gradient at zero."""
    v32 = wide(v)
    return torch.sqrt((v32 * v32).sum(dim) + eps)


class PrimaryCaps(nn.Module):
    """A convolution whose output channels are grouped into capsules.

    One capsule = the ``dim`` channels of one of the ``types`` capsule types at one grid position
    (channel index = type * dim + component). Capsule index i enumerates (type, row, col).
    """

    def __init__(self, in_channels: int, types: int, dim: int, kernel: int, stride: int,
                 scale: float = 1.0):
        super().__init__()
        self.types, self.dim, self.scale = types, dim, scale
        self.conv = Conv2d(in_channels, types * dim, kernel, stride)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a_BCGG = self.conv(h)
        B, _, G, G2 = a_BCGG.shape
        u_BTPGG = a_BCGG.view(B, self.types, self.dim, G, G2)
        u_BIP = u_BTPGG.permute(0, 1, 3, 4, 2).reshape(B, self.types * G * G2, self.dim)
        if self.scale != 1.0:
            u_BIP = u_BIP * self.scale
        return squash(u_BIP)
