"""Capsule building blocks: squash, primary capsules, and a capsule layer routed by agreement.

Shape legend (suffixes on tensor names):
  B batch   I child (input) capsules   J parent (output) capsules
  P child capsule dimension   D parent capsule dimension   T capsule types   G grid side
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SQUASH_EPS = 1e-8


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """v = |s|^2 / (1 + |s|^2) * s / |s|, computed in fp32; a zero vector maps to zero (not NaN)."""
    s32 = s.float()
    sq = (s32 * s32).sum(dim, keepdim=True)
    return s32 * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


def safe_norm(v: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """Vector length in fp32 with a finite gradient at zero."""
    v32 = v.float()
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
        self.conv = nn.Conv2d(in_channels, types * dim, kernel, stride)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a_BCGG = self.conv(h)
        B, _, G, G2 = a_BCGG.shape
        u_BTPGG = a_BCGG.view(B, self.types, self.dim, G, G2)
        u_BIP = u_BTPGG.permute(0, 1, 3, 4, 2).reshape(B, self.types * G * G2, self.dim)
        if self.scale != 1.0:
            u_BIP = u_BIP * self.scale
        return squash(u_BIP)


def route(u_hat_BIJD: torch.Tensor, iterations: int, bias_JD: torch.Tensor | None = None,
          keep: bool = False):
    """Routing by agreement (Sabour et al. 2017, Procedure 1), per example.

    b_ij starts at zero for every example; each of ``iterations`` passes takes the coupling
    c_ij = softmax_j(b_ij) over the parents, s_j = sum_i c_ij u_hat_j|i, v_j = squash(s_j); all but
    the last pass then add the agreement u_hat_j|i . v_j to b_ij. Gradients flow through every pass.
    Returns v (B, J, D) in fp32 and, when ``keep``, the coupling c (B, I, J) of each pass.
    """
    B, I, J, D = u_hat_BIJD.shape
    b_BIJ = u_hat_BIJD.new_zeros(B, I, J, dtype=torch.float32)
    couplings = []
    v_BJD = None
    for r in range(iterations):
        c_BIJ = torch.softmax(b_BIJ, dim=2)
        if keep:
            couplings.append(c_BIJ.detach())
        s_BJD = torch.einsum("bij,bijd->bjd", c_BIJ.to(u_hat_BIJD.dtype), u_hat_BIJD)
        if bias_JD is not None:
            s_BJD = s_BJD + bias_JD
        v_BJD = squash(s_BJD)
        if r < iterations - 1:
            agreement_BIJ = torch.einsum("bijd,bjd->bij", u_hat_BIJD, v_BJD.to(u_hat_BIJD.dtype))
            b_BIJ = b_BIJ + agreement_BIJ.float()
    return v_BJD, couplings


class RoutedCapsules(nn.Module):
    """Fully connected capsule layer: u_hat_j|i = W_ij u_i for every (child, parent), then routing."""

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int, iterations: int,
                 init_std: float = 0.01, bias: bool = False):
        super().__init__()
        self.iterations = iterations
        self.W_IJDP = nn.Parameter(torch.randn(in_caps, out_caps, out_dim, in_dim) * init_std)
        self.bias_JD = nn.Parameter(torch.zeros(out_caps, out_dim)) if bias else None

    def predictions(self, u_BIP: torch.Tensor) -> torch.Tensor:
        """u_hat (B, I, J, D): one batched contraction over the child dimension P."""
        return torch.einsum("bip,ijdp->bijd", u_BIP, self.W_IJDP)

    def forward(self, u_BIP: torch.Tensor, keep_routing: bool = False):
        return route(self.predictions(u_BIP), self.iterations, self.bias_JD, keep_routing)
