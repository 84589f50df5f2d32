"""``capsctl compare RUN... --seeds``: the runs grouped by their config with ``train.seed`` (and
``data.root``, where the files lie) left out, one row per group: its runs and seeds, the mean
and the range of the test error over them, the mean best validation accuracy and wall time.
What a results table with several seeds reports (docs/results.md): the numbers of each run come
from ``compare`` (its folder's config.yaml and metrics.jsonl), nothing is re-evaluated.

A group is labelled by the config keys whose values differ between the groups (as ``sweep``
names its points: ``iterations=1,recon_weight=0``), or by its first run's name where that
label would not be short and distinct (a single group, several model families).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsctl.errors import CapsctlError

IGNORED = ("train.seed", "data.root")   # what varies between seeds, and where the data lies
MAX_LABEL = 60


@dataclass
class SeedGroup:
    """One group of runs of one config; the lists follow the runs' order, the test errors and
    best validation accuracies of the runs that have them."""

    label: str
    runs: list[str]
    seeds: list[Any]
    dataset: str | None
    finished: int
    test_errors: list[float] = field(default_factory=list)
    best_val_accuracies: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The group as plain data with its means and ranges (None where no run has a value)."""
        mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
        return {"label": self.label, "runs": self.runs, "seeds": self.seeds,
                "dataset": self.dataset, "finished": self.finished,
                "test_errors": self.test_errors, "test_error_mean": mean(self.test_errors),
                "test_error_min": min(self.test_errors, default=None),
                "test_error_max": max(self.test_errors, default=None),
                "best_val_accuracy_mean": mean(self.best_val_accuracies),
                "wall_s_mean": mean(self.wall_s)}


def flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``section.key`` (and ``section.group.key``) -> value."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def group_by_seed(folders: list[Path]) -> list[SeedGroup]:
    """The runs of ``folders`` grouped by config without the seed, in first-seen order."""
    from capsctl import compare
    from capsctl.runfolder import RunFolder

    rows = compare.compare(folders, count_parameters=False)
    configs: list[dict[str, Any]] = []
    for row in rows:
        if row.unreadable:
            raise CapsctlError(f"compare --seeds: {row.run} cannot be read ({row.unreadable})")
        configs.append(flat(compare.read_config(RunFolder(Path(row.run)).config)))
    keyed: dict[str, list[int]] = {}
    for k, cfg in enumerate(configs):
        rest = {key: v for key, v in cfg.items() if key not in IGNORED}
        keyed.setdefault(json.dumps(rest, sort_keys=True, default=str), []).append(k)
    labels = _labels([configs[members[0]] for members in keyed.values()],
                     [rows[members[0]].name for members in keyed.values()])
    groups = []
    for label, members in zip(labels, keyed.values()):
        group = SeedGroup(label, [rows[k].run for k in members],
                          [configs[k].get("train.seed") for k in members],
                          rows[members[0]].dataset, sum(rows[k].finished for k in members))
        for k in members:
            test = rows[k].test.get(rows[k].dataset or "test")
            if test is not None:
                group.test_errors.append(1.0 - test)
            if rows[k].best_val_accuracy is not None:
                group.best_val_accuracies.append(rows[k].best_val_accuracy)
            if rows[k].wall_s is not None:
                group.wall_s.append(rows[k].wall_s)
        groups.append(group)
    return groups


def _labels(configs: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Each group's ``key=value,...`` over the keys every group has whose values differ between
    the groups, in the config's order; the first run's name where that is not one short,
    distinct label per group (one group; other families; more than a few keys)."""
    from capsctl.sweep import point_name

    keys = [k for k in configs[0] if k not in IGNORED and all(k in c for c in configs)]
    varied = [k for k in keys if len({json.dumps(c[k], default=str) for c in configs}) > 1]
    axes = [(k, []) for k in varied]
    labels = [point_name({k: json.dumps(c[k], default=str).strip('"') for k in varied}, axes)
              for c in configs]
    one_family = len({c.get("model.name") for c in configs}) == 1
    fits = (one_family and varied and len(set(labels)) == len(labels)
            and max(map(len, labels)) <= MAX_LABEL)
    return labels if fits else names


def seeds_table(groups: list[SeedGroup]):
    """A rich Table: one row per group."""
    from rich.markup import escape
    from rich.table import Table

    from capsctl.compare import duration

    table = Table(title="capsctl compare --seeds")
    for col in ("group", "runs", "seeds", "test error mean", "range", "best val mean",
                "wall mean"):
        table.add_column(col, justify="left" if col in ("group", "seeds") else "right")
    pct = lambda x: "-" if x is None else f"{x:.2%}"  # noqa: E731
    for g in groups:
        s = g.summary()
        runs = f"{len(g.runs)}" + ("" if g.finished == len(g.runs) else
                                   f" ({len(g.runs) - g.finished} unfinished)")
        spread = "-" if s["test_error_min"] is None else \
            f"{s['test_error_min']:.2%} - {s['test_error_max']:.2%}"
        table.add_row(escape(g.label), runs, escape(", ".join(map(str, g.seeds))),
                      pct(s["test_error_mean"]), spread, pct(s["best_val_accuracy_mean"]),
                      duration(s["wall_s_mean"]))
    return table
