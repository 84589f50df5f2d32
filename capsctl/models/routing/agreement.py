"""Routing by agreement (``dynamic``) and its first pass alone (``uniform``): both are the
``RoutedCapsules`` layer of ``capsules.py`` (the C kernel on a CPU, fp32), ``uniform`` with one
pass, whose coupling is b_ij = 0 -> c_ij = softmax_j(0) = 1/J (Sabour et al. 2017, Procedure 1
line 4 with no update): s_j = (1/J) sum_i u_hat_j|i, v_j = squash(s_j). ``dynamic`` with
``leaky_routing`` is ``leaky.LeakyRoutedCapsules`` instead (batched torch, no C kernel)."""

from __future__ import annotations

from torch import nn

from capsctl.models.capsules import RoutedCapsules
from capsctl.models.routing.leaky import LeakyRoutedCapsules


def build_dynamic(in_caps: int, out_caps: int, in_dim: int, out_dim: int, m) -> nn.Module:
    """Procedure 1 with ``m.routing_iterations`` passes (the paper: 3): ``RoutedCapsules``, or
    ``LeakyRoutedCapsules`` (the same parameters) when ``m.leaky_routing``."""
    if m.leaky_routing:
        return LeakyRoutedCapsules(in_caps, out_caps, in_dim, out_dim, m.routing_iterations,
                                   m.transform_init_std, m.class_bias)
    return RoutedCapsules(in_caps, out_caps, in_dim, out_dim, m.routing_iterations,
                          m.transform_init_std, m.class_bias)


def build_uniform(in_caps: int, out_caps: int, in_dim: int, out_dim: int, m) -> RoutedCapsules:
    """No routing: one pass at the uniform coupling c_ij = 1/J."""
    return RoutedCapsules(in_caps, out_caps, in_dim, out_dim, 1, m.transform_init_std,
                          m.class_bias)
