"""The routing algorithms of the CapsNet's routed layer, by name: ``ROUTINGS[name]`` is a
RoutingSpec, and each routing owns its options (the ``model.routing`` section: its ``name`` and
exactly the keys that routing reads). Torch-free (the layers are imported only when a model is
built), so ``capsctl config`` checks a routing and its keys without loading torch.

Every routing's layer is made by its spec's ``build(in_caps, out_caps, in_dim, out_dim, init_std,
options)`` and has
  forward(u_BIP, keep_routing=False) -> (v_BJD fp32, list of (B, I, J) per pass or [])
  predictions(u_BIP) -> u_hat_BIJD   (the votes W_ij u_i, for ``capsctl routes``)
so CapsNet and the inspection commands treat them alike. docs/routing.md has the equations;
docs/architecture.md the recipe for adding one (a layer file, an entry here, a config).

Shape legend: B batch, I child (primary) capsules, J parent (class) capsules, P a child's
dimension, D a parent's.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

from capsctl.errors import ConfigError
from capsctl.fields import field, field_names, set_field, suggest


@dataclass(frozen=True)
class RoutingSpec:
    """``options``: the dataclass of the routing's keys (torch-free; its ``name`` field defaults
    to the routing's name); ``build``: the function making the layer, or its "module:function"
    path (imported when a model is built); ``label``: the model's ``routing_label`` (what
    ``out["routing"]`` holds); ``summary``/``paper``: for the config reference and docs;
    ``kernel``: the CPU C kernel runs it (fp32)."""

    options: type
    build: str | Callable
    label: str
    summary: str
    paper: str
    kernel: bool = False


ROUTINGS: dict[str, RoutingSpec] = {}


def register(spec: RoutingSpec) -> RoutingSpec:
    """Add a routing under its options' name (a name taken already is an error)."""
    name = spec.options().name
    if name in ROUTINGS:
        raise ValueError(f"routing {name!r} is registered already")
    ROUTINGS[name] = spec
    return spec


def build(options: Any, in_caps: int, out_caps: int, in_dim: int, out_dim: int,
          init_std: float):
    """The routed layer ``options`` names (an ``nn.Module``; imports torch), from ``in_caps``
    children of ``in_dim`` to ``out_caps`` parents of ``out_dim``, its W_ij drawn with std
    ``init_std``."""
    fn = ROUTINGS[options.name].build
    if isinstance(fn, str):
        module, attr = fn.split(":")
        fn = getattr(importlib.import_module(module), attr)
    return fn(in_caps, out_caps, in_dim, out_dim, init_std, options)


# --- the built-in routings' options ------------------------------------------------------------

@dataclass
class DynamicConfig:
    name: str = field("dynamic", "routing by agreement (Sabour, Frosst & Hinton 2017, Procedure 1)")
    iterations: int = field(3, "routing passes (the paper: 3)", min=1, max=100)
    class_bias: bool = field(False, "learned bias added to s_j (the authors' code has one; the "
                             "paper and its parameter count do not)")
    leaky: bool = field(False, "a \"none-of-the-above\" parent in the routing softmax: one extra "
                        "zero logit per child, so a child can route to no parent (the paper's "
                        "CIFAR-10 model; the authors' code: Sarasra/models research/capsules, "
                        "layers.py _leaky_routing); runs on the batched torch path, not the C "
                        "kernel")


@dataclass
class UniformConfig:
    name: str = field("uniform", "no routing: one pass at the uniform coupling c_ij = 1/J")
    class_bias: bool = field(False, "learned bias added to s_j")


@dataclass
class SelfAttentionConfig:
    name: str = field("self-attention", "one-shot self-attention routing with learned log priors "
                      "b_ij (Efficient-CapsNet's); no options")


@dataclass
class InvertedDotProductConfig:
    name: str = field("inverted-dot-product", "parent-to-child dot-product attention with "
                      "LayerNorm (Tsai et al. 2020)")
    iterations: int = field(3, "routing passes from a uniform start (the first pass routes "
                            "uniformly; more than one adds a LayerNorm)", min=1, max=100)


register(RoutingSpec(
    DynamicConfig, "capsctl.models.routing.dynamic:build_dynamic", "coupling c_ij",
    "routing by agreement, iterations passes", "Sabour, Frosst & Hinton 2017, Procedure 1",
    kernel=True))
register(RoutingSpec(
    UniformConfig, "capsctl.models.routing.dynamic:build_uniform", "coupling c_ij",
    "no routing: c_ij = 1/J, one pass", "Gu & Tresp 2020 (no routing)", kernel=True))
register(RoutingSpec(
    SelfAttentionConfig, "capsctl.models.routing.self_attention:build", "attention c_ij",
    "one-shot self-attention routing with learned log priors b_ij",
    "Mazzia, Salvetti & Chiaberge 2021 (Efficient-CapsNet), self-attention routing"))
register(RoutingSpec(
    InvertedDotProductConfig, "capsctl.models.routing.inverted:build", "routing r_ij",
    "parent-to-child dot-product attention with LayerNorm, iterations passes from a uniform "
    "start", "Tsai, Srivastava, Goh & Salakhutdinov 2020, Procedure 1, eqs. 1-3"))


# --- the model.routing section of a config -----------------------------------------------------

FLAT_KEYS = {"routing_iterations": ("iterations", 3), "class_bias": ("class_bias", False),
             "leaky_routing": ("leaky", False)}
"""capsnet's flat routing keys before each routing had its own options (configs and checkpoints
of format 2): ``model.KEY`` -> (``model.routing.KEY``, the value every routing took for it)."""


def owners(key: str) -> list[str]:
    """The routings that have the option ``key``."""
    return [n for n, s in ROUTINGS.items() if key in field_names(s.options)]


def _not_an_option(section: str, name: str, key: str) -> ConfigError:
    keys = [k for k in field_names(ROUTINGS[name].options) if k != "name"]
    old = next((f" (formerly model.{k})" for k, (new, _) in FLAT_KEYS.items()
                if new == key != k), "")
    belongs = owners(key)
    where = (f" (it belongs to {', '.join(belongs)})" if belongs else
             suggest(f"{section}.{key}", [f"{section}.{k}" for k in keys]))
    return ConfigError(f"config key '{section}.{key}'{old} is not an option of routing {name}"
                       f"{where}; {name} takes: {', '.join(keys) or 'no keys but name'}")


def _switched(section: str, current: Any, name: str) -> Any:
    """``name``'s default options, taking the keys ``current`` set away from its defaults (a
    sweep over ``model.routing`` keeps the file's iterations); one it lacks is refused."""
    new, base = ROUTINGS[name].options(), type(current)()
    for f in dataclasses.fields(current):
        value = getattr(current, f.name)
        if f.name == "name" or value == getattr(base, f.name):
            continue
        if f.name not in field_names(type(new)):
            raise _not_an_option(section, name, f.name)
        setattr(new, f.name, value)
    return new


def set_routing(section: str, value: Any, current: Any) -> Any:
    """The options ``section`` (model.routing) takes from ``value``: a routing's name, or a
    mapping of its keys (``name`` picks the routing, default the current one). A key of another
    routing is one line naming its owners."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{section}' must be a routing's name ({', '.join(ROUTINGS)})"
                          f" or a mapping of its keys, got {value!r}")
    name = value.get("name", current.name)
    if not isinstance(name, str) or name not in ROUTINGS:
        raise ConfigError(f"config key '{section}.name' must be one of {', '.join(ROUTINGS)}; "
                          f"got {name!r}{suggest(str(name), list(ROUTINGS))}")
    opts = dataclasses.replace(current) if name == current.name else \
        _switched(section, current, name)
    for key, v in value.items():
        if key == "name":
            continue
        if str(key) not in field_names(type(opts)):
            raise _not_an_option(section, name, str(key))
        set_field(opts, section, str(key), v)
    return opts


def from_flat(current: Any, key: str, value: Any) -> dict | None:
    """The ``model.routing`` mapping that the flat key ``model.KEY`` of format 2 stands for (None:
    ``key`` is not one). Old configs list every flat key: one the current routing lacks is
    dropped at the value every routing took, and refused otherwise."""
    if key not in FLAT_KEYS:
        return None
    new, old_default = FLAT_KEYS[key]
    if new not in field_names(type(current)) and value == old_default \
            and type(value) is type(old_default):
        return {}
    return {new: value}


def reference_tables() -> list[tuple[str, type]]:
    """(title, options class) of every routing, for the config reference."""
    return [(f"{name} - {spec.summary}", spec.options) for name, spec in ROUTINGS.items()]
