"""Class names: what a model's class capsule k means, for tables, pictures and predictions.

A checkpoint written by ``capsctl train`` stores them (``state["class_names"]``, a list of str
taken from the dataset at train time: a ``folder`` dataset's names come from its files). Older
checkpoints did not: their names come from the dataset registry (``DatasetSpec.class_names``),
and where even that does not know (a ``folder`` dataset whose ROOT is not given) they are the
class numbers "0", "1", ... Torch-free.
"""

from __future__ import annotations

from capsctl.data.registry import DATASETS
from capsctl.errors import CheckpointError, DataError

MAX_NAME = 200   # characters of a stored name (a folder name); longer ones are refused


def dataset_class_names(cfg, root_flag: str | None = None) -> list[str] | None:
    """The class names of ``cfg``'s dataset as training sees them (``--data-root`` may say
    where a ``folder`` dataset is): a list of str, or None when they cannot be known yet."""
    names = DATASETS[cfg.data.name].class_names(cfg.data, root_flag)
    return None if names is None else [str(n) for n in names]


def numbered(num_classes: int) -> list[str]:
    """"0", "1", ... "num_classes - 1": the names when nothing better is known."""
    return [str(k) for k in range(num_classes)]


def class_names_of(cfg, state: dict | None = None, root_flag: str | None = None) -> list[str]:
    """The model's class names: ``state["class_names"]`` when the checkpoint stores them, else
    the registry's for ``cfg.data`` (``root_flag``: a ``folder`` dataset's ROOT), else the class
    numbers. Always ``cfg.model.num_classes`` of them; a stored list that is not that many
    different strings is a one-line CheckpointError."""
    j = cfg.model.num_classes
    stored = (state or {}).get("class_names")
    if stored is not None:
        if (not isinstance(stored, (list, tuple)) or len(stored) != j
                or not all(isinstance(n, str) and 0 < len(n) <= MAX_NAME for n in stored)
                or len(set(stored)) != j):
            raise CheckpointError(f"the checkpoint's class_names are not a list of {j} "
                                  f"different names (1 to {MAX_NAME} characters each)")
        return list(stored)
    names = dataset_class_names(cfg, root_flag)
    return names if names is not None and len(names) == j else numbered(j)


def short(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters (an ellipsis marks a cut)."""
    return name if len(name) <= width else name[:max(1, width - 1)] + "\u2026"


def _listed(names, limit: int = 8) -> str:
    shown = ", ".join(short(n, 40) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def label_map(model_names: list[str], data_names: list[str], what: str) -> list[int] | None:
    """Match a dataset's classes to a model's by name: None when they are the same list (label
    k is the model's class k), else ``[model index of data class k for each k]`` when the data
    holds a subset of the model's classes. Data classes the model does not know are a one-line
    DataError naming the difference (``what``: the dataset, for the message)."""
    if list(data_names) == list(model_names):
        return None
    unknown = [n for n in data_names if n not in model_names]
    if unknown:
        absent = [n for n in model_names if n not in data_names]
        raise DataError(f"{what} has classes the checkpoint does not know: {_listed(unknown)}"
                        + (f" (and lacks the checkpoint's {_listed(absent)})" if absent else "")
                        + f"; the checkpoint's classes are {_listed(model_names)}: evaluate on "
                        "a folder of those classes (all, or a subset), named as in training")
    return [model_names.index(n) for n in data_names]
