"""Inverted dot-product attention routing (Tsai, Srivastava, Goh & Salakhutdinov, ICLR 2020,
Procedure 1).

Votes v_ij = W_ij p_i (eq. 1, ``Votes``). The parent poses p_j start at zero, so the first pass
routes uniformly; each later pass takes the agreement a_ij = p_j . v_ij / sqrt(D) (eq. 2, the
1/sqrt(D) as in the authors' code, apple/ml-capsules-inverted-attention-routing), the routing
coefficient r_ij = softmax over the parents j of a_ij (eq. 3: the parents compete for each
child), the pose update s_j = sum_i r_ij v_ij and p_j = LayerNorm(s_j) (Procedure 1 lines 5-6).
Gradients flow through every pass.

capsctl's class capsules: the routed layer returns v_j = squash(s_j) of the last pass, so that
its length is the class probability the margin loss, prediction and decoder use (the paper
reads the class from a linear layer on the LayerNorm'd pose; a LayerNorm'd vector's length
carries no presence). The last pass's LayerNorm, whose output nothing reads, is skipped.

Shape legend: B batch, I children, J parents, D a parent's dimension, N = B * J.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from capsctl.models.capsules import squash
from capsctl.models.routing.votes import Votes, agree, combine, wide, wide_dtype


def inverted_route(u_hat_BJID: torch.Tensor, iterations: int, norm: nn.Module | None,
                   squash_fn: Callable = squash):
    """Returns v (B, J, D) and the routing coefficients r (B, J, I) of every pass, fp32 (fp64
    for fp64 votes).
    ``norm`` (LayerNorm over D) is needed when ``iterations`` > 1."""
    B, J, I, D = u_hat_BJID.shape
    uh_NID = u_hat_BJID.view(B * J, I, D)
    r_BJI = torch.full((B, J, I), 1.0 / J, dtype=wide_dtype(u_hat_BJID),
                       device=u_hat_BJID.device)
    rs = []
    for t in range(iterations):
        if t > 0:
            a_BJI = agree(uh_NID, p_BJD.reshape(B * J, D)).view(B, J, I) / math.sqrt(D)
            r_BJI = torch.softmax(a_BJI, dim=1)                     # over the parents j
        s_BJD = combine(r_BJI.view(B * J, I), uh_NID).view(B, J, D)
        rs.append(r_BJI)
        if t < iterations - 1:
            p_BJD = wide(norm(s_BJD))
    return squash_fn(s_BJD), rs


class InvertedDotProductRouting(Votes):
    """W_ij, the LayerNorm of the parent poses (when there is more than one pass) and the
    routing."""

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int, iterations: int,
                 init_std: float):
        super().__init__(in_caps, out_caps, in_dim, out_dim, init_std)
        self.iterations = iterations
        self.norm = nn.LayerNorm(out_dim) if iterations > 1 else None

    def forward(self, u_BIP: torch.Tensor, keep_routing: bool = False):
        """v (B, J, D) fp32 and, when ``keep_routing``, r (B, I, J) of every pass."""
        v_BJD, rs = inverted_route(self.predictions_BJID(u_BIP), self.iterations, self.norm)
        return v_BJD, ([r_BJI.transpose(1, 2) for r_BJI in rs] if keep_routing else [])


def build(in_caps: int, out_caps: int, in_dim: int, out_dim: int, init_std: float,
          opts) -> InvertedDotProductRouting:
    return InvertedDotProductRouting(in_caps, out_caps, in_dim, out_dim, opts.iterations,
                                     init_std)
