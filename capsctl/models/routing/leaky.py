"""Leaky routing by agreement (``dynamic`` with ``leaky: true``): Procedure 1 of Sabour,
Frosst & Hinton 2017 with a "none-of-the-above" parent in the routing softmax, as the paper's
CIFAR-10 model (the authors' code: Sarasra/models, research/capsules/models/layers.py,
``_leaky_routing``). Each child's logits get one extra zero logit, the softmax runs over the
J + 1 entries and only the first J couplings are kept, so a child can route to no parent:

  b_ij = 0; each pass: c_i = softmax([b_i1 .. b_iJ, 0])[:J], s_j = sum_i c_ij u_hat_j|i
  (+ bias_j with class_bias), v_j = squash(s_j); all passes but the last add u_hat_j|i . v_j
  to b_ij.

Plain autograd, batched torch (no C kernel); the same parameters and state-dict keys as
``dynamic.RoutedCapsules`` (W_IJDP, bias_JD with class_bias), so a checkpoint is evaluated
either way.

Shape legend: B batch, I children, J parents, P a child's dimension, D a parent's, N = B * J.
"""

from __future__ import annotations

import torch
from torch import nn

from capsctl.models.capsules import squash
from capsctl.models.routing.votes import Votes, agree, combine, wide, wide_dtype


def leaky_softmax_BJI(b_BJI: torch.Tensor) -> torch.Tensor:
    """softmax over [b_1j .. b_Jj, 0] along the parents (dim 1), the extra "none" entry
    dropped: returns c (B, J, I), each child's couplings summing to < 1."""
    B, _, I = b_BJI.shape
    none_B1I = b_BJI.new_zeros(B, 1, I)
    return torch.softmax(torch.cat([b_BJI, none_B1I], dim=1), dim=1)[:, :-1]


def leaky_route(u_hat_BJID: torch.Tensor, iterations: int, bias_JD: torch.Tensor | None = None):
    """Returns v (B, J, D) and the coupling c (B, J, I) of every pass, fp32 (fp64 for fp64
    votes); differentiable through every pass."""
    B, J, I, D = u_hat_BJID.shape
    uh_NID = u_hat_BJID.view(B * J, I, D)
    b_BJI = torch.zeros(B, J, I, dtype=wide_dtype(u_hat_BJID), device=u_hat_BJID.device)
    cs = []
    for t in range(iterations):
        c_BJI = leaky_softmax_BJI(b_BJI)
        s_BJD = combine(c_BJI.reshape(B * J, I), uh_NID).view(B, J, D)
        if bias_JD is not None:
            s_BJD = s_BJD + wide(bias_JD)
        v_BJD = squash(s_BJD)
        cs.append(c_BJI)
        if t < iterations - 1:
            b_BJI = b_BJI + agree(uh_NID, v_BJD.reshape(B * J, D)).view(B, J, I)
    return v_BJD, cs


class LeakyRoutedCapsules(Votes):
    """W_ij (and bias_JD with ``bias``), as ``RoutedCapsules``, and leaky routing by
    agreement."""

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int, iterations: int,
                 init_std: float = 0.01, bias: bool = False):
        super().__init__(in_caps, out_caps, in_dim, out_dim, init_std)
        self.iterations = iterations
        self.bias_JD = nn.Parameter(torch.zeros(out_caps, out_dim)) if bias else None

    def forward(self, u_BIP: torch.Tensor, keep_routing: bool = False):
        """v (B, J, D) fp32 and, when ``keep_routing``, the couplings c (B, I, J) of every pass
        (detached, as RoutedCapsules')."""
        v_BJD, cs = leaky_route(self.predictions_BJID(u_BIP), self.iterations, self.bias_JD)
        return v_BJD, ([c_BJI.detach().transpose(1, 2) for c_BJI in cs] if keep_routing else [])
