"""Checkpoint format 1 (capsctl 0.1: one flat ``model``/``loss``/``data`` bag for every family)
to format 2 (capsctl 0.2: the sections of the chosen family and dataset). Torch-free.

Format 2's flat routing keys of capsnet (``routing: dynamic``, ``routing_iterations``,
``class_bias``, ``leaky_routing``) are read by the config loader itself, key by key, into the
``model.routing`` section (``models/routing.from_flat``; a YAML file and ``--set`` may still use
them), so a format-2 checkpoint needs no step of its own.

Only the stored config changes between the formats; the weights, optimizer state and training
position are the same, so a migrated checkpoint evaluates and resumes with the same numbers.
"""

from __future__ import annotations

from typing import Any

from capsctl.data.registry import DATASETS
from capsctl.fields import field_names
from capsctl.models.registry import MODELS
from capsctl.errors import ConfigError
from capsctl.models.routing import FLAT_KEYS, DynamicConfig, from_flat, set_routing

# format-1 key -> format-2 key, per family / dataset; keys not listed keep their name, and keys
# the family or dataset does not have are dropped (format 1 stored every family's defaults)
_MODEL_KEYS = {
    "em-capsnet": {"em_conv1_channels": "conv1_channels", "em_primary_types": "primary_types",
                   "em_caps1_types": "caps1_types", "em_caps2_types": "caps2_types",
                   "em_iterations": "iterations", "em_lambda": "inverse_temperature",
                   "em_lambda_rate": "inverse_temperature_rate", "em_var_floor": "var_floor",
                   "em_init_std": "init_std", "em_coordinate_addition": "coordinate_addition"},
    "cnn": {"cnn_channels": "channels", "cnn_hidden": "hidden", "cnn_pool": "pool"},
    "multimnist-cnn": {"cnn_channels": "channels", "cnn_hidden": "hidden"},
}
# format-2 keys that are no longer fields of their family: capsnet's flat routing keys, which
# the config loader moves into model.routing (``routing.from_flat``)
_FLAT_KEYS = {"capsnet": list(FLAT_KEYS)}
# keys a family gained after format 1 whose names format 1's flat bag holds for another family
# (CapsNet's decoder and reconstruction weight): dropped, so a 0.1 CNN stays without a decoder
_NEW_SINCE_1 = {"cnn": {"model": {"decoder", "decoder_hidden"}, "loss": {"recon_weight"}}}
_LOSS_KEYS = {"em-capsnet": {"spread_m_start": "m_start", "spread_m_end": "m_end",
                             "spread_m_steps": "m_steps"}}
_DATA_KEYS = {"multimnist": {"multimnist_shift": "shift", "multimnist_pad": "pad",
                             "multimnist_per_digit": "per_digit",
                             "multimnist_val_per_digit": "val_per_digit",
                             "multimnist_test_limit": "test_limit",
                             "multimnist_seed": "seed"}}


def _section(values: Any, renames: dict, keep: list[str], dropped: set[str] = frozenset()
             ) -> dict:
    if not isinstance(values, dict):
        return {}
    # a format-1 key spelled like a rename's target belonged to another family or dataset
    # (em-capsnet's conv1_channels was CapsNet's; multimnist's shift was MNIST's): dropped, so
    # the result does not depend on the order of the keys
    dropped = set(dropped) | (set(renames.values()) - set(renames))
    out = {}
    for key, value in values.items():
        new = renames.get(key, key)
        if new in keep and key not in dropped:
            out[new] = value
    return out


def config_v1_to_v2(cfg: Any) -> Any:
    """The format-2 config mapping of a format-1 one (anything unexpected is passed through for
    the config loader to refuse with its own message)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model", {}), dict) \
            or not isinstance(cfg.get("data", {}), dict):
        return cfg
    family = cfg.get("model", {}).get("name", "capsnet")
    dataset = cfg.get("data", {}).get("dataset", "mnist")
    if not isinstance(family, str) or not isinstance(dataset, str) or family not in MODELS \
            or dataset not in DATASETS or DATASETS[dataset].options is None:
        return cfg
    spec, dspec = MODELS[family], DATASETS[dataset]
    # multimnist took its own shift; format 1's data.shift (MNIST's) did not apply to it
    data_drop = {"shift"} if dataset == "multimnist" else set()
    out = dict(cfg)
    new = _NEW_SINCE_1.get(family, {})
    out["model"] = _section(cfg.get("model"), _MODEL_KEYS.get(family, {}),
                            field_names(spec.config) + _FLAT_KEYS.get(family, []),
                            new.get("model", set()))
    out["loss"] = _section(cfg.get("loss"), _LOSS_KEYS.get(family, {}),
                           field_names(spec.loss_config), new.get("loss", set()))
    data = _section(cfg.get("data"), _DATA_KEYS.get(dataset, {}), field_names(dspec.options),
                    data_drop)
    out["data"] = {"name": dataset, **data}
    return out


def nest_routing(model: Any) -> Any:
    """A stored capsnet ``model`` section (a run folder's config.yaml) with format 2's flat
    routing keys, as this version writes it: ``routing`` a mapping of the routing's name and
    keys, the flat keys gone. Anything else is returned as it is."""
    if not isinstance(model, dict) or model.get("name", "capsnet") != "capsnet" or not (
            isinstance(model.get("routing"), str) or FLAT_KEYS.keys() & model.keys()):
        return model
    try:
        opts = set_routing("model.routing", model.get("routing", {}), DynamicConfig())
        for key in FLAT_KEYS:
            if key in model:
                opts = set_routing("model.routing", from_flat(opts, key, model[key]), opts)
    except ConfigError:
        return model
    return {**{k: v for k, v in model.items() if k not in FLAT_KEYS},
            "routing": dict(vars(opts))}
