"""Self-attention routing (Mazzia, Salvetti & Chiaberge 2021, Efficient-CapsNet), one shot.

For each parent j, the votes U_j (I x D) attend to each other: A_j = U_j U_j^T / sqrt(D) (I x I);
child i's logit for parent j is the sum of its row of A_j, i.e. u_hat_j|i . (sum_k u_hat_j|k) /
sqrt(D) (so the I x I matrix is never formed); the coupling c_ij = softmax over the parents j of
those logits; then s_j = sum_i (c_ij + b_ij) u_hat_j|i with b_ij learned log priors (J x I,
zero at the start), and v_j = squash(s_j). No iterations. As the authors' code (EscVM/
Efficient-CapsNet, utils/layers.py FCCaps).

Shape legend: B batch, I children, J parents, D a parent's dimension, N = B * J.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from capsctl.models.capsules import squash
from capsctl.models.routing.votes import Votes, agree, combine, wide, wide_dtype


def self_attention_route(u_hat_BJID: torch.Tensor, prior_JI: torch.Tensor,
                         squash_fn: Callable = squash):
    """Returns v (B, J, D) and the coupling c (B, J, I) (softmax over J, before the prior is
    added), both fp32 (fp64 for fp64 votes)."""
    B, J, I, D = u_hat_BJID.shape
    uh_NID = u_hat_BJID.view(B * J, I, D)
    total_ND = u_hat_BJID.sum(2, dtype=wide_dtype(u_hat_BJID)).view(B * J, D)  # sum_k u_hat_j|k
    logits_BJI = agree(uh_NID, total_ND).view(B, J, I) / math.sqrt(D)
    c_BJI = torch.softmax(logits_BJI, dim=1)
    w_NI = (c_BJI + wide(prior_JI)).view(B * J, I)
    return squash_fn(combine(w_NI, uh_NID).view(B, J, D)), c_BJI


class SelfAttentionRouting(Votes):
    """W_ij, the log priors b_ij (``prior_JI``) and the one-shot self-attention routing."""

    def __init__(self, in_caps: int, out_caps: int, in_dim: int, out_dim: int, init_std: float,
                 squash_fn: Callable = squash):
        super().__init__(in_caps, out_caps, in_dim, out_dim, init_std)
        self.prior_JI = torch.nn.Parameter(torch.zeros(out_caps, in_caps))
        self.squash_fn = squash_fn

    def forward(self, u_BIP: torch.Tensor, keep_routing: bool = False):
        """v (B, J, D) fp32 and, when ``keep_routing``, [c (B, I, J)] (one pass)."""
        v_BJD, c_BJI = self_attention_route(self.predictions_BJID(u_BIP), self.prior_JI,
                                            self.squash_fn)
        return v_BJD, ([c_BJI.transpose(1, 2)] if keep_routing else [])


def build(in_caps: int, out_caps: int, in_dim: int, out_dim: int, init_std: float,
          opts) -> SelfAttentionRouting:
    return SelfAttentionRouting(in_caps, out_caps, in_dim, out_dim, init_std)
