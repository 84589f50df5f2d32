"""Task kinds: what one example is labelled with, and everything that depends on it.

A dataset's spec names its kind (``DatasetSpec.task``, a string; every bundle, stream and
source carries it as ``.task``). ``get(kind)`` is that kind's ``Task`` (tasks/base.py): the
labels handed to the model, what counts as correct, the task's own metrics, the picture the
trainer logs, the synthetic batch of ``capsctl bench``, the targets its losses use. Code that
must tell kinds apart asks the Task, never the kind's name or the batch's keys.

A kind is one module of this package named as the kind, holding ``TASK`` (an instance of a
``Task`` subclass): ``single.py`` (one label, ``"y"``) and ``pair.py`` (two overlapping digits,
MultiMNIST: ``"y"``, ``"y2"`` and the two source images). Torch-free: ``kinds()`` lists the
modules without importing them; ``get`` imports one.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

SINGLE, PAIR = "single", "pair"   # the kinds of the built-in datasets
NOT_KINDS = {"base"}              # modules of this package that are not a kind


def kinds() -> tuple[str, ...]:
    """The kinds there are: the modules of this package (nothing is imported)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if m.name not in NOT_KINDS and not m.name.startswith("_")))


@functools.cache
def get(kind: str):
    """The ``Task`` of ``kind`` (imports its module, and torch)."""
    if kind not in kinds():
        raise KeyError(f"unknown task kind {kind!r}; the kinds are {', '.join(kinds())}")
    return importlib.import_module(f"{__name__}.{kind}").TASK
