"""Property: whatever document or value reaches the config loader, the only exception it can
raise is ConfigError (one line for the user), never a crash."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from capsctl.config import (SECTIONS, Config, ConfigError, OptimConfig, TrainConfig, from_dict,
                            load, parse_override)
from capsctl.data.registry import DATASETS, TRAINING
from capsctl.fields import field_names
from capsctl.models.registry import MODELS

SETTINGS = settings(max_examples=150, deadline=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow])

# every key of every family, loss and dataset: the fuzzer mixes keys of different families
KEYS = {"model": sorted({k for s in MODELS.values() for k in field_names(s.config)}),
        "loss": sorted({k for s in MODELS.values() for k in field_names(s.loss_config)}),
        "data": sorted({k for n in TRAINING for k in field_names(DATASETS[n].options)}),
        "optim": field_names(OptimConfig), "train": field_names(TrainConfig)}
assert list(KEYS) == list(SECTIONS)
ALL_KEYS = [f"{s}.{k}" for s, ks in KEYS.items() for k in ks]
NAMES = [*MODELS, *DATASETS]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-3, max_value=300),
    st.integers(min_value=10**300, max_value=10**400),           # beyond any float
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(NAMES),
    st.sampled_from(["capsnet", "mnist", "fp32", "bf16", "auto", "cuda:x", "1e-3", "nan", "inf",
                     "-0", "1_000", "[/]", "stop", "skip", "", "~"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
key_names = st.one_of(st.sampled_from(sorted({k for ks in KEYS.values() for k in ks})),
                      st.text(max_size=10), st.integers(), st.booleans(), st.none())
sections = st.dictionaries(key_names, values, max_size=5) | values
documents = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(list(SECTIONS)), st.text(max_size=8),
                              st.integers()), sections, max_size=5),
    values,
)


def only_config_errors(fn, *args, **kwargs):
    try:
        result = fn(*args, **kwargs)
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
        return None
    return result


@SETTINGS
@given(documents)
def test_from_dict_raises_only_config_error(doc):
    cfg = only_config_errors(from_dict, doc, source="fuzz.yaml")
    assert cfg is None or isinstance(cfg, Config)


@SETTINGS
@given(st.dictionaries(st.sampled_from(list(SECTIONS)), st.dictionaries(key_names, values,
                                                                          max_size=6),
                       min_size=1, max_size=5))
def test_valid_keys_random_values(doc):
    only_config_errors(from_dict, doc)


@SETTINGS
@given(st.sampled_from(list(MODELS)), st.sampled_from(list(TRAINING)),
       st.dictionaries(st.sampled_from(KEYS["model"]), values, max_size=4),
       st.dictionaries(st.sampled_from(KEYS["loss"]), values, max_size=3),
       st.dictionaries(st.sampled_from(KEYS["data"]), values, max_size=3))
def test_every_family_and_dataset_with_any_keys(model, dataset, m, lo, d):
    """Each family and dataset, with keys of any family (its own or another's) set to anything."""
    doc = {"model": {**m, "name": model}, "loss": lo, "data": {**d, "name": dataset}}
    cfg = only_config_errors(from_dict, doc)
    assert cfg is None or (cfg.model.name, cfg.data.name) == (model, dataset)


def _load_text(text: str | bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.yaml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        return only_config_errors(load, path)


@SETTINGS
@given(documents)
def test_yaml_of_random_documents(doc):
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, ValueError, OverflowError):
        return
    _load_text(text)


YAML_BITS = ["model:", "train:", "optim:", "  lr: ", "  epochs: ", "  batch_size: ", "- ", "? ",
             ": ", "[", "]", "{", "}", "&a ", "*a", "!!python/object:os.system ", "!!float ",
             "!!binary ", "2001-02-30", "1e400", "0x1F", "0o17", ".nan", "~", "'", '"', "\t",
             "\n", "  ", "#", "%YAML 1.1\n", "---\n", "...\n", "|\n", ">\n", "<<: *a\n"]


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(YAML_BITS), st.text(max_size=5)), max_size=25))
def test_random_yaml_text(bits):
    _load_text("".join(bits))


@SETTINGS
@given(st.binary(max_size=64))
def test_random_bytes(raw):
    _load_text(raw)


@SETTINGS
@given(st.lists(st.tuples(st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=12)),
                          st.one_of(st.sampled_from(YAML_BITS), st.text(max_size=12))),
                max_size=4))
def test_random_overrides(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    only_config_errors(load, None, overrides)
    for text in overrides + ["no-equals-sign"]:
        only_config_errors(parse_override, text)


def test_the_fuzzer_reaches_the_checks():
    """Sanity: a few hand-picked documents the strategies also produce are rejected."""
    for doc in ([1], {"model": "x"}, {"train": {"epochs": 0}}, {"optim": {"lr": 10**400}},
                {"nope": {}}, {"train": {"seed": True}}, {"model": {"name": 3}},
                {"model": {"name": "cnn", "class_dim": 4}}, {"data": {"name": "affnist"}},
                {"data": {"dataset": "mnist"}}, {"loss": {"m_start": 0.1}},
                {"model": {"name": []}}, {"data": {"name": {"a": 1}}}):  # found by the fuzzer
        try:
            from_dict(doc)
        except ConfigError:
            continue
        raise AssertionError(f"{doc!r} was accepted")
