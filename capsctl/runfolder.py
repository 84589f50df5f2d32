"""The run folder, in one place: the names of its files (``RunFolder``: checkpoints/last.pt,
checkpoints/best.pt, config.yaml, metrics.jsonl, tb/, .lock), the rule of which keys a resume
may change (``may_change_on_resume``), the rows of its metrics.jsonl, and what a folder holds
for a config (``RunFolder.state``: new, finished, resumable, started or foreign) - the one
answer that `capsctl train`, `capsctl sweep` and `capsctl compare` give. Every other module
asks this one; tests/test_house.py checks that no other module spells a file name of the
folder. Creating a folder and its lock are training/rundir.py's. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from capsctl.errors import CapsctlError


@dataclass(frozen=True)
class RunFolder:
    """A run folder: ``root`` and where each of its files lives."""

    root: Path

    CHECKPOINTS: ClassVar[str] = "checkpoints"
    LAST: ClassVar[str] = "last.pt"
    BEST: ClassVar[str] = "best.pt"
    CONFIG: ClassVar[str] = "config.yaml"
    METRICS: ClassVar[str] = "metrics.jsonl"
    TB: ClassVar[str] = "tb"
    LOCK: ClassVar[str] = ".lock"

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "RunFolder":
        """The run folder of a checkpoint: RUN for RUN/checkpoints/X.pt, or a folder argument
        (a run folder) as it is."""
        p = Path(checkpoint)
        if p.is_dir():
            return cls(p)
        return cls(p.parent.parent if p.parent.name == cls.CHECKPOINTS else p.parent)

    @property
    def checkpoints(self) -> Path:
        return self.root / self.CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.checkpoints / self.LAST

    @property
    def best(self) -> Path:
        return self.checkpoints / self.BEST

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def tb(self) -> Path:
        return self.root / self.TB

    @property
    def lock(self) -> Path:
        return self.root / self.LOCK

    def holds_a_run(self) -> bool:
        """config.yaml or metrics.jsonl is there (what `compare` and `plot` read)."""
        return self.config.is_file() or self.metrics.is_file()

    def is_unused(self) -> bool:
        """A folder no run wrote into yet (only an empty checkpoints/ and the lock file): made
        by prepare_run_dir, or by a run that died before writing its config. It may be
        reused."""
        try:
            names = {p.name for p in self.root.iterdir()}
            return names <= {self.LOCK, self.CHECKPOINTS} and (
                self.CHECKPOINTS not in names
                or (self.checkpoints.is_dir() and not any(self.checkpoints.iterdir())))
        except OSError:
            return False

    def stored_config(self) -> dict | None:
        """config.yaml as a mapping (None when absent); one line when it is not one."""
        from capsctl.config import read_yaml

        if not self.config.is_file():
            return None
        stored = read_yaml(self.config)
        if not isinstance(stored, dict):
            raise CapsctlError(f"{self.config} is not a config mapping; move {self.root} away")
        return stored

    def rows(self, strict: bool = False) -> list[dict]:
        """The rows of metrics.jsonl (see read_metrics)."""
        return read_metrics(self.metrics, strict)

    def is_finished(self, cfg) -> bool:
        """True when the run tested its best model: the final test row, and a row for every
        ``train.final_eval`` dataset of ``cfg``."""
        keys = {k for row in self.rows() for k in row}
        return "test/accuracy" in keys and all(f"test/{name}/accuracy" in keys
                                               for name in cfg.train.final_eval)

    def state(self, cfg) -> "FolderState":
        """What the folder holds for a run of ``cfg`` (see FolderState). Writes nothing."""
        if not self.root.exists() or self.is_unused():
            return FolderState(NEW)
        stored = self.stored_config()
        if stored is not None:
            differ = config_differences(stored, cfg)
            if differ:
                return FolderState(FOREIGN, tuple(differ))
        train = (stored or {}).get("train")
        train = train if isinstance(train, dict) else {}
        same_budget = all(train.get(k) == getattr(cfg.train, k) for k in BUDGET_KEYS)
        if same_budget and self.is_finished(cfg):
            return FolderState(FINISHED)
        return FolderState(RESUMABLE if self.last.is_file() else STARTED)


# --- which keys a resume may change: one rule for `train --resume --set` and `sweep` ---------

FIXED_TRAIN_KEYS = ("batch_size", "seed", "precision")   # they fix every number of the run
BUDGET_KEYS = ("epochs", "max_steps")                    # more of them: a finished run resumes
INCIDENTAL_KEYS = {"data.root", "data.download", "data.workers"}  # where, not what


def may_change_on_resume(key: str) -> bool:
    """The one resume rule: a resumed run may change where its data lives (data.root,
    download, workers) and the train.* keys except batch_size, seed and precision; every other
    key (model, loss, data, optim, and those three) makes another run."""
    section, _, name = key.partition(".")
    return key in INCIDENTAL_KEYS or section == "train" and name not in FIXED_TRAIN_KEYS


def check_resume_key(key: str) -> None:
    """Raise a one-line CapsctlError for a ``--set`` key a resume may not change."""
    if not may_change_on_resume(key):
        raise CapsctlError(f"--set {key}: a resume keeps the run's config; only train.* keys "
                           f"(not {', '.join(FIXED_TRAIN_KEYS)}) and "
                           f"{', '.join(sorted(INCIDENTAL_KEYS))} can change; start a new run "
                           "instead")


def _short_value(value) -> str:
    text = repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


def config_differences(stored: dict, cfg) -> list[str]:
    """The keys a resume may not change whose value in ``stored`` (a run folder's
    config.yaml) differs from ``cfg``'s, as ``section.key (stored in the folder -> asked
    now)``. Keys only one of the two has (another capsctl version) are not compared."""
    from capsctl.config import to_dict
    from capsctl.migrate import nest_routing

    mine, differ = to_dict(cfg), []
    for section in ("model", "loss", "data", "optim", "train"):
        theirs = stored.get(section) if isinstance(stored.get(section), dict) else {}
        theirs = nest_routing(theirs) if section == "model" else theirs  # format 2's flat keys
        differ += [f"{section}.{k} ({_short_value(theirs[k])} -> "
                   f"{_short_value(mine[section][k])})"
                   for k in sorted(set(mine[section]) & set(theirs))
                   if theirs[k] != mine[section][k] and not may_change_on_resume(f"{section}.{k}")]
    return differ


# --- what an existing run folder holds ------------------------------------------------------

NEW, FINISHED, RESUMABLE, STARTED, FOREIGN = "new", "finished", "resumable", "started", "foreign"


@dataclass(frozen=True)
class FolderState:
    """What an existing run folder holds compared with the config asked for now: ``kind`` is
    NEW (nothing yet), FINISHED (tested, this config and budget), RESUMABLE (this config,
    checkpoints/last.pt: unfinished, or finished with another budget), STARTED (this config,
    no checkpoint yet) or FOREIGN (another config: ``differ`` names each differing key)."""

    kind: str
    differ: tuple[str, ...] = ()


# --- metrics.jsonl ---------------------------------------------------------------------------

class Unreadable(CapsctlError):
    """A run folder's config.yaml or metrics.jsonl holds what capsctl never writes."""


MAX_TIME = 1e11        # a row's "time" is Unix seconds: 0 up to the year 5138
MAX_STEP = 2 ** 63


def _non_finite(text: str):
    raise ValueError(f"non-finite number {text}")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:30]} beyond a float")
    return value


def _check_row(row: dict, n: int, path: Path) -> None:
    """Unreadable unless the row's step and time are what the trainer writes."""
    step, when = row["step"], row.get("time")
    if not 0 <= step < MAX_STEP:
        raise Unreadable(f"{path.name} line {n}: step {str(step)[:30]} is not a step count")
    if when is not None and (isinstance(when, bool) or not isinstance(when, (int, float))
                             or not 0 <= when < MAX_TIME):
        raise Unreadable(f"{path.name} line {n}: time {str(when)[:30]} is not a time in "
                         "seconds")


def read_metrics(path: Path, strict: bool = False) -> list[dict]:
    """The rows of metrics.jsonl; a torn or foreign line (a kill mid-write) is skipped.
    ``strict``: a row with a number capsctl never writes (Infinity, NaN, 1e400, a time that
    is not Unix seconds, a negative step) raises Unreadable naming the line."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return rows
    for n, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            continue
        if strict:
            try:
                json.loads(line, parse_constant=_non_finite, parse_float=_finite_float)
            except ValueError as e:
                raise Unreadable(f"{Path(path).name} line {n}: {e}") from None
            _check_row(row, n, Path(path))
        rows.append(row)
    return rows


def finished(rows: list[dict]) -> bool:
    """True when the run tested its best model: the final ``test/accuracy`` row is there."""
    return any(isinstance(r.get("test/accuracy"), (int, float)) for r in rows)
