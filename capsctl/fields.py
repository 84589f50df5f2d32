"""Config fields: a dataclass field carries its help text and valid range (``field``), and
``coerce`` checks a value against a field's type and range. Torch-free, imported by every
section's dataclass (model families, loss terms, datasets, optimizer, trainer)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from capsctl.errors import ConfigError


def field(default, help: str, *, min=None, max=None, choices=None, gt=None):
    """A config key: a dataclass field with its documentation and valid range (what every
    section's dataclass makes its keys with; ``coerce`` checks a value against it)."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "gt": gt}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def suggest(key: str, candidates: list[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _check_number(key: str, value: Any, tp) -> Any:
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        if abs(value) >= 2 ** 63:  # no count, size or seed of capsctl is that large
            raise ConfigError(f"config key '{key}' must be below 2**63, got an integer of "
                              f"{len(str(abs(value)))} digits")
        return value
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        raise ConfigError(f"config key '{key}' must be a finite number, got an integer "
                          f"of {len(str(abs(value)))} digits") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
    return value


def _check_range(key: str, value: Any, meta: dict) -> None:
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(meta['choices'])}; "
                          f"got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"config key '{key}' must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"config key '{key}' must be <= {meta['max']}, got {value!r}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"config key '{key}' must be > {meta['gt']}, got {value!r}")


def coerce(key: str, value: Any, tp, meta: dict) -> Any:
    """Check ``value`` against the field type ``tp`` and range ``meta``; return it normalised.
    A list's items are checked against the same range (``min`` etc.) as the list."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return coerce(key, value, [a for a in args if a is not type(None)][0], meta)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [coerce(f"{key}[{i}]", v, args[0], meta) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    elif tp in (int, float):
        value = _check_number(key, value, tp)
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    _check_range(key, value, meta)
    return value


def set_field(obj: Any, section: str, name: str, value: Any) -> None:
    """Set ``obj.name`` (a field of the dataclass ``obj``) after checking ``value``; an unknown
    name is an error listing the section's keys."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    if name not in hints and hasattr(obj, "moved_key"):  # an old key, now in a nested section
        name, value = obj.moved_key(name, value)
    if name not in hints:
        keys = field_names(cls)
        raise ConfigError(f"unknown config key '{section}.{name}'"
                          f"{suggest(f'{section}.{name}', [f'{section}.{k}' for k in keys])}; "
                          f"{section} keys: {', '.join(keys)}")
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}[name]
    if meta.get("nested"):  # a section of its own (model.routing): its setter checks the keys
        setattr(obj, name, meta["nested"](f"{section}.{name}", value, getattr(obj, name)))
        return
    setattr(obj, name, coerce(f"{section}.{name}", value, hints[name], meta))
