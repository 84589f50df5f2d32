"""The evaluation of checkpoints that `capsctl eval` prints: one by one, or an ensemble
averaging their scores, on their own dataset or others (a folder's classes matched by name).
The measuring itself is measure.py's ``evaluate``; the confusion matrix and its picture are
confusion.py's (both re-exported here).

Shape legend: B batch, J classes, M ensemble members.
"""

from __future__ import annotations

from pathlib import Path

import torch

from capsctl import tasks
from capsctl.confusion import (check_confusion_target, confusion_counts,  # noqa: F401
                               confusion_figure, confusion_image, confusion_png, log_confusion,
                               per_class_accuracy)
from capsctl.distributed import ONE_PROCESS, Group
from capsctl.errors import CapsctlError
from capsctl.measure import evaluate


# --- ensembles ----------------------------------------------------------------------------------

class Ensemble(torch.nn.Module):
    """Several trained models as one: ``forward(x)["scores"]`` is the mean of the members'
    scores (class-capsule lengths; the paper's 7-model MNIST ensemble), in fp32."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
        scores_MBJ = torch.stack([m(x)["scores"].float() for m in self.members])
        return {"scores": scores_MBJ.mean(0)}


# What ``scores`` means for each family (models/contract.py): an ensemble averages one kind.
SCORE_KINDS = {"capsnet": "capsule lengths", "efficient-capsnet": "capsule lengths",
               "em-capsnet": "capsule activations", "cnn": "logits",
               "multimnist-cnn": "sigmoid probabilities"}


def score_kind(model_name: str) -> str:
    """What the scores of family ``model_name`` are (a family not listed: its own kind)."""
    return SCORE_KINDS.get(model_name, f"{model_name} scores")


def check_ensemble(paths, cfgs, names: list[list[str]]) -> None:
    """Raise a one-line CapsctlError unless every member was trained on the same dataset, with
    the same classes, takes the same input and produces the same kind of score (averaging
    capsule lengths in [0, 1] with a CNN's raw logits would let the CNN decide alone)."""
    first = cfgs[0]
    for path, cfg, cls in zip(paths[1:], cfgs[1:], names[1:]):
        what = None
        if cfg.data.name != first.data.name:
            what = f"dataset {cfg.data.name} (the first: {first.data.name})"
        elif cls != names[0]:
            what = "other classes than the first"
        elif score_kind(cfg.model.name) != score_kind(first.model.name):
            raise CapsctlError(
                f"--ensemble: {path} is a {cfg.model.name} whose scores are "
                f"{score_kind(cfg.model.name)}, the first ({paths[0]}) a {first.model.name} "
                f"whose scores are {score_kind(first.model.name)}; an ensemble averages one "
                "kind of score: ensemble the two kinds separately")
        elif (cfg.model.input_size, cfg.model.in_channels) != (first.model.input_size,
                                                                first.model.in_channels):
            what = (f"{cfg.model.in_channels}x{cfg.model.input_size}x{cfg.model.input_size} "
                    f"inputs (the first: {first.model.in_channels}x{first.model.input_size}x"
                    f"{first.model.input_size})")
        if what:
            raise CapsctlError(f"--ensemble: {path} has {what}; an ensemble's checkpoints must "
                               "share the dataset, the classes and the input")


# --- checkpoints ---------------------------------------------------------------------------------

def _result(label: str, name: str, split: str, m: dict, model_name: str, step, names,
            task: str) -> dict:
    """One row of `capsctl eval`'s results (``task``: the dataset's kind, whose own metrics
    the row carries)."""
    r = {"checkpoint": label, "dataset": name, "split": split, "n": m["n"],
         "correct": m["correct"], "accuracy": m["accuracy"], "error": m["error"],
         "model": model_name, "step": step,
         **{k: m[k] for k in tasks.get(task).metrics if k in m}}
    if "confusion" in m:
        r["classes"] = list(names)
        r["per_class_accuracy"] = dict(zip(names, m["per_class_accuracy"]))
        r["confusion"] = m["confusion"]
    return r


class RelabeledSource:
    """An evaluation source whose labels are renumbered into a model's classes (``map_K``:
    the model's index of each of the source's classes): a folder holding the model's classes
    in another order, or a subset of them, is scored by name."""

    def __init__(self, source, map_K: list[int], device):
        self.source = source
        self.map_K = torch.tensor(map_K, dtype=torch.long, device=device)
        self.task, self.name = source.task, getattr(source, "name", None)
        self.default_limit = source.default_limit

    def __len__(self) -> int:
        return len(self.source)

    def _relabel(self, batch: dict) -> dict:
        out = dict(batch)
        for key in tasks.get(self.task).label_keys:
            out[key] = self.map_K[out[key]]
        return out

    def batches(self, batch_size: int, limit: int | None = None):
        for batch in self.source.batches(batch_size, limit):
            yield self._relabel(batch)

    def get(self, idx: torch.Tensor) -> dict:
        return self._relabel(self.source.get(idx))


def eval_source(name: str, split: str, cfg, device, data_root, model_names: list[str] | None):
    """The evaluation source of dataset ``name`` for a model of ``cfg`` whose classes are
    ``model_names`` (None: not stored in its checkpoint, labels taken as they are). Where the
    dataset's classes come from its files (a ``folder`` dataset) they are matched to the
    model's by name: the same names in any order, or a subset of them, are scored as the
    model's classes; other names are one line (classes.label_map)."""
    import dataclasses

    from capsctl.classes import dataset_class_names, label_map
    from capsctl.data.build import _options as data_options, build_eval
    from capsctl.data.registry import DATASETS

    spec = DATASETS.get(name)
    if model_names is None or spec is None or spec.classes_of is None:
        return build_eval(name, split, cfg, device, data_root)
    data_cfg = dataclasses.replace(cfg, data=data_options(name, cfg))
    data_names = dataset_class_names(data_cfg, data_root)
    if data_names is None:   # no folder to read yet: the builder says what is missing
        return build_eval(name, split, cfg, device, data_root)
    map_K = label_map(model_names, data_names, f"dataset {name}")
    if map_K is None:
        return build_eval(name, split, cfg, device, data_root)
    subset_cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, num_classes=len(data_names)))   # the folder's own count, for its builder
    return RelabeledSource(build_eval(name, split, subset_cfg, device, data_root), map_K,
                           device)


def _evaluate_on(model, cfg, label: str, model_names: list[str] | None, datasets, split: str,
                 device, batch_size, limit, data_root, progress_console, group: Group):
    """(dataset name, metrics, task kind) of ``model`` on each dataset (default: the one it
    trained on); ``model_names``: its stored class names, which a folder's classes are matched
    to."""
    from rich.markup import escape
    from rich.progress import Progress

    for name in datasets or [cfg.data.name]:
        source = eval_source(name, split, cfg, device, data_root, model_names)
        # a streamed source (MultiMNIST: 10M) evaluates a default prefix unless told
        n_max = limit if limit is not None else source.default_limit
        total = len(source) if n_max is None else min(n_max, len(source))
        bs = batch_size or cfg.train.eval_batch_size
        with Progress(console=progress_console, disable=progress_console is None,
                      transient=True) as bar:
            task = bar.add_task(escape(f"{label} on {name}"), total=total)
            m = evaluate(model, source, bs, device, cfg.train.precision, limit=n_max,
                         progress=lambda n: bar.update(task, completed=n), group=group,
                         confusion=True)
        yield name, m, source.task


def evaluate_checkpoints(paths, datasets, split: str, device_name: str | None,
                         batch_size: int | None, limit: int | None, data_root: str | None,
                         progress_console=None, group: Group = ONE_PROCESS,
                         ensemble: bool = False) -> list[dict]:
    """Evaluate every checkpoint on every dataset (default: the one it was trained on); with
    ``ensemble`` the checkpoints' scores are averaged into one model (one row per dataset,
    checkpoint "ensemble of N"). Each row has per-class accuracy ({class name: accuracy}) and
    the confusion matrix for one-label datasets."""
    from capsctl.checkpoint import load_model
    from capsctl.classes import class_names_of
    from capsctl.device import resolve

    device = resolve(device_name or "auto")
    args = (datasets, split, device, batch_size, limit, data_root, progress_console, group)
    results = []
    if ensemble:
        loaded = [load_model(p, device) for p in paths]
        names = [class_names_of(cfg, state, data_root) for _, cfg, state in loaded]
        check_ensemble(paths, [cfg for _, cfg, _ in loaded], names)
        model, cfg = Ensemble([m for m, _, _ in loaded]).eval(), loaded[0][1]
        label = f"ensemble of {len(paths)}"
        model_name = "+".join(dict.fromkeys(c.model.name for _, c, _ in loaded))
        stored = names[0] if all("class_names" in st for _, _, st in loaded) else None
        for name, m, task in _evaluate_on(model, cfg, label, stored, *args):
            results.append({**_result(label, name, split, m, model_name, None, names[0], task),
                            "checkpoints": [str(p) for p in paths]})
        return results
    for path in paths:
        model, cfg, state = load_model(path, device)
        names = class_names_of(cfg, state, data_root)
        stored = names if "class_names" in state else None
        for name, m, task in _evaluate_on(model, cfg, Path(str(path)).name, stored, *args):
            results.append(_result(str(path), name, split, m, cfg.model.name,
                                   state.get("step"), names, task))
    return results
