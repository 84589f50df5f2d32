"""capsctl plot: learning curves of runs (capsctl.curves) - validation error and training loss
against epochs, several runs on one PNG chart - or their series as JSON. Reads only the run
folders' metrics.jsonl (a run still training shows what it has logged); never imports torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from capsctl.cli.options import cli_errors, err, json_line, print_table
from capsctl.errors import CapsctlError


def _check_out(out: Path) -> None:
    """Refuse an --out that cannot be a PNG file before anything is read."""
    from capsctl.paths import nearest_existing, writable_folder

    if out.is_dir():
        raise CapsctlError(f"--out {out} is a folder; give a file name such as "
                           f"{out / 'curves.png'}")
    folder = nearest_existing(out.parent)
    if not writable_folder(folder):
        raise CapsctlError(f"--out {out}: cannot write into {folder}")


def summary_table(runs: list, unit: str) -> Table:
    """A row per run: points drawn, its last position, best validation error (where), test."""
    from capsctl.curves import best_at

    table = Table(title="capsctl plot")
    for col in ("run", "val points", "loss points", f"last {unit}", "best val error",
                "test error"):
        table.add_column(col, justify="left" if col == "run" else "right")
    col = 0 if unit == "epoch" else 1
    for c in runs:
        last = max((p[col] for p in c.val_error + c.train_loss), default=None)
        best = "-" if c.best_val_error is None else \
            f"{c.best_val_error:.2%} ({unit} {best_at(c, unit):g})"
        table.add_row(escape(c.name), str(len(c.val_error)), str(len(c.train_loss)),
                      "-" if last is None else f"{last:.4g}" + ("" if c.finished
                                                               else " (in progress)"),
                      best, "-" if c.test_error is None else f"{c.test_error:.2%}")
    return table


@cli_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(
        help="Run folders (each holds metrics.jsonl); runs still training are drawn as far as "
             "they got.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="The PNG file to write. Default: curves.png in the current folder "
                      "(none with --json unless given).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout: the x unit and each run's "
                       "series as [epoch, step, value] points. Default: a summary table.")]
    = False,
    loss: Annotated[str, typer.Option(
        "--loss", metavar="NAME",
        help="The training loss term to draw: total (default), or one the runs log, e.g. "
             "margin (comparable between runs with and without reconstruction), "
             "reconstruction, cross_entropy.")] = "total",
):
    """Learning curves: validation error (log scale) and training loss (log scale) against
    epochs, one colour per run, with a legend (best validation error and its epoch, test
    error).

    Examples: capsctl plot runs/a runs/b --out curves.png; capsctl plot runs/sweep/* --json;
    capsctl plot runs/t1-* --loss margin
    """
    from capsctl import curves

    png = out if out is not None else (None if as_json else Path("curves.png"))
    if png is not None:
        _check_out(png)
    drawn = curves.curves(runs, loss)
    if png is not None:
        curves.write_png(drawn, png)
    if as_json:
        json_line(curves.as_json(drawn))
    else:
        print_table(summary_table(drawn, curves.x_unit(drawn)))
    if png is not None:
        err.print(f"curves: {escape(str(png))}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the plot command to ``app``."""
    app.command()(plot)
