"""capsctl compare: several runs side by side (capsctl.compare), as a table, JSON or a PNG bar
chart. Reads only the run folders; torch is imported (by the library) only to count
parameters, never at import."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from capsctl.cli.options import cli_errors, json_line, print_table, show_comparison
from capsctl.errors import CapsctlError


@cli_errors
def compare(
    runs: Annotated[list[Path], typer.Argument(
        help="Run folders (each holds config.yaml and metrics.jsonl).")],
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout. Default: a table.")] = False,
    png: Annotated[Optional[Path], typer.Option(
        "--png", help="Also write a bar chart of the test accuracies to this PNG file. "
                      "Default: none.")] = None,
    seeds: Annotated[bool, typer.Option(
        "--seeds", help="One row per config instead of per run: runs that differ only in "
                        "train.seed (and data.root) grouped, with the mean and range of their "
                        "test error. Default: a row per run.")] = False,
):
    """One table of several runs: model, routing, parameters, train img/s, best validation
    accuracy, test accuracy per evaluated dataset, steps, wall time. Nothing is re-evaluated.

    Examples: capsctl compare runs/sweep/*; capsctl compare runs/a runs/b --json --png cmp.png;
    capsctl compare runs/t1-* --seeds
    """
    if seeds:
        if png is not None:
            raise CapsctlError("compare: --png draws one bar per run; drop --seeds or --png")
        from capsctl import seeds as seeds_mod

        groups = seeds_mod.group_by_seed(runs)
        if as_json:
            json_line({"groups": [g.summary() for g in groups]})
        else:
            print_table(seeds_mod.seeds_table(groups))
        return
    from capsctl import compare as compare_mod

    show_comparison(compare_mod.compare(runs), as_json, png)


def register(app: typer.Typer) -> None:
    """Add the compare command to ``app``."""
    app.command()(compare)
