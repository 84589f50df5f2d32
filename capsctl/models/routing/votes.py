"""What every torch-path routing shares: the transformation matrices W_ij and the votes
(prediction vectors) u_hat_j|i = W_ij u_i, made by one batched product over the children and
stored parent-major, (B, J, I, D), so that both contractions a routing needs - the weighted sum
over the children and a dot product of every vote with one vector per parent - are batched
matrix-vector products (``combine``, ``agree``) streaming the votes once each.

Shape legend: B batch, I children, J parents, P a child's dimension, D a parent's, K = J * D,
N = B * J blocks (one per example and parent).
"""

from __future__ import annotations

import torch
from torch import nn


def wide_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when ``t`` is: the dtype of logits, softmax and squash."""
    return torch.promote_types(t.dtype, torch.float32)


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32, or in fp64 when it already is."""
    return t.to(wide_dtype(t))


def agree(m_NID: torch.Tensor, x_ND: torch.Tensor) -> torch.Tensor:
    """m_i . x for every row i of each block: (N, I, D), (N, D) -> (N, I), computed in ``m``'s
    dtype (bf16 under autocast), returned in fp32 (fp64 for fp64 ``m``). Written as the row
    vector x^T times m^T, the faster of the two equivalent forms on CPUs (the other, m x, rounds
    differently in fp32)."""
    x_N1D = x_ND.to(m_NID.dtype).unsqueeze(1)
    return wide(torch.bmm(x_N1D, m_NID.transpose(1, 2)).squeeze(1))


def combine(x_NI: torch.Tensor, m_NID: torch.Tensor) -> torch.Tensor:
    """sum_i x_i m_i for each block: (N, I), (N, I, D) -> (N, D), in ``m``'s dtype, returned in
    fp32 (fp64 for fp64 ``m``)."""
    return wide(torch.bmm(x_NI.to(m_NID.dtype).unsqueeze(1), m_NID).squeeze(1))


class Votes(nn.Module):
    """A fully connected capsule layer's W_ij (I, J, D, P) - the same parameter, name and
    layout as ``dynamic.RoutedCapsules`` - and its votes."""

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int,
                 init_std: float):
        super().__init__()
        self.W_IJDP = nn.Parameter(torch.randn(in_caps, out_caps, out_dim, in_dim) * init_std)

    def predictions_BJID(self, u_BIP: torch.Tensor) -> torch.Tensor:
        """u_hat (B, J, I, D), contiguous, differentiable: one (B x P) @ (P x J*D) product per
        child (autocast's dtype when it is on), then moved parent-major."""
        I, J, D, P = self.W_IJDP.shape
        W_IPK = self.W_IJDP.permute(0, 3, 1, 2).reshape(I, P, J * D)
        u_hat_IBK = torch.bmm(u_BIP.transpose(0, 1), W_IPK)
        return u_hat_IBK.view(I, -1, J, D).permute(1, 2, 0, 3).contiguous()

    def predictions(self, u_BIP: torch.Tensor) -> torch.Tensor:
        """u_hat (B, I, J, D): u_hat[b, i, j] = W_ij u_i (a transposed view)."""
        return self.predictions_BJID(u_BIP).transpose(1, 2)
