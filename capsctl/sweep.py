"""``capsctl sweep CONFIG --vary KEY=V1,V2 [--vary ...]``: the grid of configs, trained one
after another in this process (``capsctl.training.train``; under torchrun every rank walks the
same grid), each into its own run folder named by its values, then the ``compare`` table.

Folders: RUNS/NAME/<point>, the point named by its values, e.g. ``routing=uniform`` or
``routing=dynamic,routing_iterations=1`` (the last part of each key; the whole key when two
share it). Running the same sweep again continues it: a point whose folder holds its final test
row (and a row for each ``train.final_eval`` dataset) is skipped, one with checkpoints/last.pt
is resumed (also a finished one when train.epochs or max_steps changed), one without (stopped
before its first checkpoint) starts again, its folder moved aside. Every grid point's config is
loaded and checked before anything trains; a folder holding a run of another config (a rerun
with other --set values) is refused with one line naming the differing keys, or with
``--force`` moved aside and trained again.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from capsctl import config as config_mod
from capsctl.errors import CapsctlError

MAX_POINTS = 1000
NEW, RESUME, DONE, RESTART = "new", "resume", "done", "restart"


@dataclass
class Point:
    """One grid point: its ``--set`` overrides (key -> value text), its folder name, config."""

    values: dict[str, str]
    name: str
    cfg: Any = None


def _split_values(text: str) -> list[str]:
    """``a,b,[1, 2]`` -> ['a', 'b', '[1, 2]']: commas inside brackets or quotes do not split."""
    parts, depth, quote, start = [], 0, None, 0
    for k, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:k])
            start = k + 1
    return [p.strip() for p in parts + [text[start:]]]


def parse_vary(texts: list[str]) -> list[tuple[str, list[str]]]:
    """``--vary section.key=v1,v2`` options as (key, [value text, ...]); keys and values as
    ``--set`` takes them (``model.routing.iterations=1,3`` too), each value YAML."""
    axes: list[tuple[str, list[str]]] = []
    for text in texts:
        if "=" not in text:
            raise CapsctlError(f"--vary expects section.key=value1,value2,...; got {text!r}")
        key, raw = (s.strip() for s in text.split("=", 1))
        parts = key.split(".")
        if len(parts) not in (2, 3) or parts[0] not in config_mod.SECTIONS or "" in parts:
            raise CapsctlError(f"--vary {key}: keys look like --set's, section.key or "
                               "section.group.key (model.routing.iterations), with section "
                               f"one of {', '.join(config_mod.SECTIONS)}")
        if key in (k for k, _ in axes):
            raise CapsctlError(f"--vary {key} is given twice; list all its values in one: "
                               f"--vary {key}=v1,v2")
        values = _split_values(raw)
        if not raw or any(v == "" for v in values):
            raise CapsctlError(f"--vary {key}: empty value in {raw!r}")
        if len(set(values)) != len(values):
            raise CapsctlError(f"--vary {key}: a value is listed twice in {raw!r}")
        axes.append((key, values))
    if not axes:
        raise CapsctlError("sweep: give at least one --vary section.key=v1,v2")
    return axes


def _label(key: str, axes: list[tuple[str, list[str]]]) -> str:
    """The name part of ``key``: its last component, or the whole key when another varied key
    ends the same."""
    short = key.split(".")[-1]
    clash = sum(k.split(".")[-1] == short for k, _ in axes) > 1
    return key if clash else short


def point_name(values: dict[str, str], axes: list[tuple[str, list[str]]]) -> str:
    """The folder name of a grid point: ``key=value`` joined by commas, characters of a value
    outside [A-Za-z0-9._+-] replaced by '_'."""
    return ",".join(f"{_label(k, axes)}={re.sub(r'[^A-Za-z0-9._+-]', '_', v)}"
                    for k, v in values.items())[:200]


def grid(config_path: Path | None, axes: list[tuple[str, list[str]]],
         sets: list[str] = ()) -> list[Point]:
    """Every combination of the varied values (the first --vary slowest), each config loaded
    and checked: CONFIG < --set < the point's values."""
    combos = list(itertools.product(*(values for _, values in axes)))
    if len(combos) > MAX_POINTS:
        raise CapsctlError(f"sweep: the grid has {len(combos):,} points; at most {MAX_POINTS}")
    fixed = {k for k, _ in config_mod.parse_overrides(sets)}
    for key, _ in axes:
        if key in fixed:
            raise CapsctlError(f"sweep: --vary {key} and --set {key} both set it; drop one")
    points = []
    for combo in combos:
        values = {k: v for (k, _), v in zip(axes, combo)}
        overrides = list(sets) + [f"{k}={v}" for k, v in values.items()]
        name = point_name(values, axes)
        try:
            cfg = config_mod.load(config_path, overrides)
        except CapsctlError as e:
            raise CapsctlError(f"sweep point {name}: {e}") from None
        points.append(Point(values, name, cfg))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise CapsctlError("sweep: two grid points map to the same folder name; use values "
                           "that differ in letters, digits or . _ - +")
    _check_distinct(points)
    return points


def _check_distinct(points: list[Point]) -> None:
    """Refuse two grid points with the same config (``--vary train.seed=1,01``: both are 1 as
    YAML 1.2 values), which would train one run twice under two names."""
    seen: dict[str, Point] = {}
    for p in points:
        key = config_mod.dump(p.cfg)
        if key in seen:
            first = seen[key]
            k = next(k for k in p.values if p.values[k] != first.values[k])
            raise CapsctlError(f"sweep: points {first.name} and {p.name} are the same config "
                               f"(--vary {k}: {first.values[k]!r} and {p.values[k]!r} are one "
                               "value as YAML 1.2); list each value once")
        seen[key] = p


def status(folder: Path, cfg, force: bool = False) -> str:
    """What a rerun does with a grid point's folder: NEW (none yet), DONE (finished with this
    config: skip), RESUME (checkpoints/last.pt; also a finished run whose budget, train.epochs
    or max_steps, changed) or RESTART (a folder without a checkpoint; with ``force`` also one
    holding a run of another config, moved aside). A folder of another config without
    ``force`` is a one-line error naming the differing keys (``RunFolder.state``: the answer
    `capsctl train` gives too, by the one resume rule of capsctl/runfolder.py)."""
    from capsctl import runfolder

    state = runfolder.RunFolder(folder).state(cfg)
    if state.kind == runfolder.FOREIGN:
        if force:
            return RESTART
        raise CapsctlError(f"sweep: {folder} holds a run of another config "
                           f"({', '.join(state.differ[:5])}; in the folder -> asked now); rerun "
                           "with --force to train it again (the old folder is moved aside), or "
                           "choose another --name")
    return {runfolder.NEW: NEW, runfolder.FINISHED: DONE, runfolder.RESUMABLE: RESUME,
            runfolder.STARTED: RESTART}[state.kind]


def check_same_run(folder: Path, cfg) -> None:
    """Refuse ``folder`` when its config.yaml describes another run than ``cfg`` (see
    status)."""
    status(folder, cfg)


def run_sweep(points: list[Point], root: Path, device, *, data_root: str | None = None,
              console=None, show_progress: bool = True, group=None,
              say: Callable[[str], None] = lambda msg: None, force: bool = False) -> list[Path]:
    """Train every grid point into ``root``/<point> one after another (skipping finished ones,
    resuming interrupted ones). Every point's folder is checked first: one holding a run of
    another config stops the sweep before anything trains, unless ``force`` (then it is moved
    aside and trained again). Returns the folders in grid order. Raises the trainer's
    Interrupted when a signal stops a run (its last.pt is written: rerun to continue)."""
    from capsctl import distributed
    from capsctl.training import train

    group = group or distributed.ONE_PROCESS
    distributed.agree(lambda: [status(root / p.name, p.cfg, force) for p in points], group)
    folders = []
    for k, p in enumerate(points, 1):
        folder = root / p.name
        state = distributed.agree(lambda: status(folder, p.cfg, force), group)
        say(f"[{k}/{len(points)}] {p.name}: " + {NEW: "training", DONE: "finished, skipped",
                                                  RESUME: "resuming from checkpoints/last.pt",
                                                  RESTART: "starting again (the old folder "
                                                           "moved aside)"}[state])
        if state != DONE:
            train(p.cfg, folder, device, data_root=data_root, resume=state == RESUME,
                  console=console, show_progress=show_progress, force=state == RESTART,
                  group=group)
        folders.append(folder)
    return folders
