"""A registry's lazy reference: ``"package.module:attribute"``, imported only when used.

The registries (models/registry.py, data/registry.py) name their modules this way so that they
stay torch-free; both resolve them here, so that neither layer imports the other for it.
Imports no capsctl module."""

from __future__ import annotations

import importlib
from typing import Any


def resolve(path: str) -> Any:
    """The object ``path`` ("package.module:attribute") names, its module imported now."""
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)
