"""EM routing between matrix capsules (Hinton, Sabour & Frosst, ICLR 2018, procedure 1).

Every tensor op is batched: the votes of all children for all parents at all positions are one
tensor and each E/M step is a handful of reductions over it; no Python loop touches capsules or
positions (the only loop is over the 3 routing iterations).

Shape legend (suffixes of tensor names):
  B  examples in the batch           N  routing groups: B for a fully connected layer, B*H'*W'
  I  children of one routing group        for a convolutional one (one group per parent position)
  J  parent capsule types            H  pose components (16 = 4x4)
  P  parent positions (H'*W')        K  kernel offsets (k*k) in a convolutional patch
  T  child types                     C  child positions (H*W) of a convolutional layer
  X, Y  grid rows, columns           4, 4  a pose matrix
  G  2H: a vote and its square side by side (``vote_moments``)

Routing in one group: children i with activations a_i and votes V_ij (16 components), parents j.
  R_ij = uniform over the parents a child sends votes to
  repeat `iterations` times:
    M-step: R_ij <- R_ij a_i;  mu_jh = sum_i R_ij V_ijh / sum_i R_ij;
            sigma2_jh = sum_i R_ij (V_ijh - mu_jh)^2 / sum_i R_ij + variance floor;
            cost_jh = (beta_u_j + log sigma_jh) sum_i R_ij;
            a_j = logistic(lambda_t (beta_a_j - sum_h cost_jh))
    E-step: log p_ij = -1/2 sum_h [log(2 pi sigma2_jh) + (V_ijh - mu_jh)^2 / sigma2_jh];
            R_ij = a_j p_ij / sum over every parent u that child i votes for of a_u p_iu
  output: pose mu_j, activation a_j.

In a convolutional layer a child sits in the receptive fields of several parent positions; the
E-step normalises its R over all of them (all positions and types), not only within one patch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LOG_2PI = math.log(2 * math.pi)


def inverse_temperatures(iterations: int, lam: float, rate: float) -> list[float]:
    """lambda_t = lam * (1 - rate^(t + 1)) for t = 0..iterations-1 (rate 0 = constant lam)."""
    return [lam * (1.0 - rate ** (t + 1)) for t in range(iterations)]


def vote_moments(V_NJIH: torch.Tensor) -> torch.Tensor:
    """(N, J, I, 2H): the votes and their squares side by side. Every E and M step is then one
    batched matrix product over this tensor: no (V - mu)^2 of the votes' size is formed per
    iteration (see ``m_step``)."""
    return torch.cat([V_NJIH, V_NJIH.square()], dim=-1)


def m_step(a_NI: torch.Tensor, R_NJI: torch.Tensor, V_NJIH: torch.Tensor,
           beta_u_J: torch.Tensor, beta_a_J: torch.Tensor, lam: float, var_floor: float,
           eps: float = 1e-8, VV_NJIG: torch.Tensor | None = None):
    """One M-step. Returns (mu_NJH, sigma2_NJH, a_NJ).

    The R-weighted mean and variance come from one product of the weights with the votes'
    moments ``VV`` = [V, V^2] (``vote_moments``; made here when not given): mu = E[V],
    sigma2 = E[V^2] - mu^2 (rounding can only make it slightly negative: clamped at 0 before
    the floor is added)."""
    H = V_NJIH.shape[-1]
    VV_NJIG = vote_moments(V_NJIH) if VV_NJIG is None else VV_NJIG
    Ra_NJI = R_NJI * a_NI.unsqueeze(1)
    mass_NJ = Ra_NJI.sum(dim=-1)                                  # sum_i R_ij (scaled)
    w_NJ1I = (Ra_NJI / (mass_NJ.unsqueeze(-1) + eps)).unsqueeze(2)  # eps: a parent without votes
    m_NJG = torch.matmul(w_NJ1I, VV_NJIG).squeeze(2)
    mu_NJH, ex2_NJH = m_NJG[..., :H], m_NJG[..., H:]
    sigma2_NJH = (ex2_NJH - mu_NJH.square()).clamp_min(0.0) + var_floor
    cost_NJH = (beta_u_J.unsqueeze(-1) + 0.5 * torch.log(sigma2_NJH)) * mass_NJ.unsqueeze(-1)
    a_NJ = torch.sigmoid(lam * (beta_a_J - cost_NJH.sum(dim=-1)))
    return mu_NJH, sigma2_NJH, a_NJ


def e_step_logits(a_NJ: torch.Tensor, mu_NJH: torch.Tensor, sigma2_NJH: torch.Tensor,
                  V_NJIH: torch.Tensor, VV_NJIG: torch.Tensor | None = None) -> torch.Tensor:
    """log(a_j p_j(V_ij)) (N, J, I), the unnormalised log assignment, in the log domain.

    sum_h (V - mu)^2 / sigma2 = [V, V^2] . [-2 mu / sigma2, 1 / sigma2] + sum_h mu^2 / sigma2:
    one product with the votes' moments (clamped at 0 against rounding)."""
    VV_NJIG = vote_moments(V_NJIH) if VV_NJIG is None else VV_NJIG
    inv_NJH = sigma2_NJH.reciprocal()
    coef_NJG1 = torch.cat([-2.0 * mu_NJH * inv_NJH, inv_NJH], dim=-1).unsqueeze(-1)
    quad_NJI = torch.matmul(VV_NJIG, coef_NJG1).squeeze(-1) \
        + (mu_NJH.square() * inv_NJH).sum(-1, keepdim=True)
    log_norm_NJ = torch.log(sigma2_NJH).sum(-1) + mu_NJH.shape[-1] * LOG_2PI
    log_p_NJI = -0.5 * (quad_NJI.clamp_min(0.0) + log_norm_NJ.unsqueeze(-1))
    return torch.log(a_NJ.clamp_min(1e-30)).unsqueeze(-1) + log_p_NJI


class ParentSoftmax:
    """Normalisation over the parents of each child of a fully connected layer: R over J."""

    def uniform(self, like_NJI: torch.Tensor) -> torch.Tensor:
        return torch.full_like(like_NJI, 1.0 / like_NJI.shape[1])

    def normalise(self, logits_NJI: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_NJI, dim=1)


class PatchSoftmax:
    """Normalisation over every parent (position and type) a child of a convolutional layer
    votes for: the child at grid cell c appears in several patches (one per parent position p,
    at kernel offset k); its R over all (p, k: patch p covers c at k) and J sums to 1.
    Children of a routing group are ordered (k, t): I = K * T; groups N = B * P."""

    def __init__(self, batch: int, child_index_PK: torch.Tensor, num_cells: int, types: int):
        self.B, self.T, self.C = batch, types, num_cells
        self.index = child_index_PK.reshape(-1)                   # (P*K,) -> grid cell c
        self.P, self.K = child_index_PK.shape
        ones = torch.ones(self.index.shape[0], device=self.index.device)
        self.patches_C = torch.zeros(num_cells, device=ones.device).index_add_(0, self.index, ones)

    def uniform(self, like_NJI: torch.Tensor) -> torch.Tensor:
        J = like_NJI.shape[1]
        per_PK = (1.0 / (self.patches_C[self.index] * J)).to(like_NJI.dtype)
        per_PKT = per_PK.view(self.P, 1, self.K, 1).expand(self.P, J, self.K, self.T)
        return per_PKT.reshape(1, self.P, J, self.K * self.T).expand(self.B, -1, -1, -1) \
            .reshape(like_NJI.shape)

    def normalise(self, logits_NJI: torch.Tensor) -> torch.Tensor:
        J = logits_NJI.shape[1]
        logits_BPJKT = logits_NJI.reshape(self.B, self.P, J, self.K, self.T)
        lse_BQT = torch.logsumexp(logits_BPJKT, dim=2).reshape(self.B, self.P * self.K, self.T)
        # log-sum-exp over the patches of each cell: shift by the cell's max (a constant for
        # the gradient), add the exponentials per cell, shift back
        idx_BQT = self.index.view(1, -1, 1).expand_as(lse_BQT)
        peak_BCT = torch.full((self.B, self.C, self.T), -torch.inf, device=lse_BQT.device,
                              dtype=lse_BQT.dtype)
        peak_BCT = peak_BCT.scatter_reduce(1, idx_BQT, lse_BQT.detach(), "amax")
        peak_BQT = peak_BCT[:, self.index]
        total_BCT = torch.zeros_like(peak_BCT).index_add(1, self.index,
                                                         torch.exp(lse_BQT - peak_BQT))
        log_norm_BQT = torch.log(total_BCT[:, self.index]) + peak_BQT
        log_norm_BP1KT = log_norm_BQT.view(self.B, self.P, 1, self.K, self.T)
        return torch.exp(logits_BPJKT - log_norm_BP1KT).reshape(logits_NJI.shape)


def em_routing(a_NI: torch.Tensor, V_NJIH: torch.Tensor, beta_u_J: torch.Tensor,
               beta_a_J: torch.Tensor, lambdas: list[float], var_floor: float,
               norm=None, keep_routing: bool = False):
    """Route children (activations ``a_NI``, votes ``V_NJIH``, parent-major) to parents.

    Returns (mu_NJH, a_NJ, routing) where routing is the list, per iteration, of the R_NIJ the
    E-step of that iteration computed (only with ``keep_routing``; otherwise the last E-step,
    whose R no M-step uses, is skipped).
    """
    norm = norm or ParentSoftmax()
    R_NJI = norm.uniform(V_NJIH[..., 0])
    VV_NJIG = vote_moments(V_NJIH)
    routing = []
    iterations = len(lambdas)
    for t, lam in enumerate(lambdas):
        mu_NJH, sigma2_NJH, a_NJ = m_step(a_NI, R_NJI, V_NJIH, beta_u_J, beta_a_J, lam,
                                          var_floor, VV_NJIG=VV_NJIG)
        if t < iterations - 1 or keep_routing:
            R_NJI = norm.normalise(e_step_logits(a_NJ, mu_NJH, sigma2_NJH, V_NJIH, VV_NJIG))
            if keep_routing:
                routing.append(R_NJI.detach().transpose(1, 2))
    return mu_NJH, a_NJ, routing


class EMRouting(nn.Module):
    """The learned part of routing: beta_u and beta_a per parent type (shared over positions)."""

    def __init__(self, parent_types: int, iterations: int, lam: float, rate: float,
                 var_floor: float):
        super().__init__()
        self.beta_u = nn.Parameter(torch.zeros(parent_types))
        self.beta_a = nn.Parameter(torch.zeros(parent_types))
        self.lambdas = inverse_temperatures(iterations, lam, rate)
        self.var_floor = var_floor

    def forward(self, a_NI, V_NJIH, norm=None, keep_routing: bool = False):
        return em_routing(a_NI.float(), V_NJIH.float(), self.beta_u.float(), self.beta_a.float(),
                          self.lambdas, self.var_floor, norm, keep_routing)
