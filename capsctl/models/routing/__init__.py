"""Routing algorithms by name: ``ROUTINGS[model.routing]`` is a RoutingSpec. Torch-free (the
modules are imported only when a model is built), so ``capsctl config`` checks a routing choice
and its keys without loading torch.

Every routing is a module built by ``build(name, in_caps, out_caps, in_dim, out_dim, m)`` (``m``
the CapsNetConfig) with
  forward(u_BIP, keep_routing=False) -> (v_BJD fp32, list of (B, I, J) per pass or [])
  predictions(u_BIP) -> u_hat_BIJD   (the votes W_ij u_i, for ``capsctl routes``)
so CapsNet and the inspection commands treat them alike. docs/routing.md has the equations.

Shape legend: B batch, I child (primary) capsules, J parent (class) capsules, P a child's
dimension, D a parent's.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

ITERATIONS, CLASS_BIAS, LEAKY = "routing_iterations", "class_bias", "leaky_routing"
ROUTING_KEYS = (ITERATIONS, CLASS_BIAS, LEAKY)
"""CapsNetConfig keys that only some routings read; a routing refuses a non-default value of
one it does not read (``unused_keys``)."""


@dataclass(frozen=True)
class RoutingSpec:
    """``build``: "module:function" making the layer; ``keys``: the ROUTING_KEYS it reads;
    ``label``: the model's ``routing_label`` (what ``out["routing"]`` holds); ``kernel``: the
    CPU C kernel runs it (fp32); ``summary``/``paper``: for the config reference and docs."""

    build: str
    keys: tuple[str, ...]
    label: str
    kernel: bool
    summary: str
    paper: str


ROUTINGS: dict[str, RoutingSpec] = {
    "dynamic": RoutingSpec(
        "capsctl.models.routing.agreement:build_dynamic", (ITERATIONS, CLASS_BIAS, LEAKY),
        "coupling c_ij", True, "routing by agreement, routing_iterations passes",
        "Sabour, Frosst & Hinton 2017, Procedure 1"),
    "uniform": RoutingSpec(
        "capsctl.models.routing.agreement:build_uniform", (CLASS_BIAS,), "coupling c_ij", True,
        "no routing: c_ij = 1/J, one pass", "Gu & Tresp 2020 (no routing)"),
    "self-attention": RoutingSpec(
        "capsctl.models.routing.self_attention:build", (), "attention c_ij", False,
        "one-shot self-attention routing with learned log priors b_ij",
        "Mazzia, Salvetti & Chiaberge 2021 (Efficient-CapsNet), self-attention routing"),
    "inverted-dot-product": RoutingSpec(
        "capsctl.models.routing.inverted:build", (ITERATIONS,), "routing r_ij", False,
        "parent-to-child dot-product attention with LayerNorm, routing_iterations passes from "
        "a uniform start", "Tsai, Srivastava, Goh & Salakhutdinov 2020, Procedure 1, eqs. 1-3"),
}


def unused_keys(routing: str, values: dict, defaults: dict) -> list[str]:
    """The ROUTING_KEYS set away from their defaults that ``routing`` does not read."""
    return [k for k in ROUTING_KEYS
            if k not in ROUTINGS[routing].keys and values[k] != defaults[k]]


def build(name: str, in_caps: int, out_caps: int, in_dim: int, out_dim: int, m):
    """The routed capsule layer ``name`` from ``in_caps`` children of ``in_dim`` to ``out_caps``
    parents of ``out_dim`` (an ``nn.Module``; imports torch)."""
    module, attr = ROUTINGS[name].build.split(":")
    return getattr(importlib.import_module(module), attr)(in_caps, out_caps, in_dim, out_dim, m)
