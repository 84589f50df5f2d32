"""capsctl data ...: dataset generators and downloads (a sub-app registered by register()).

The dataset readers are imported inside the commands, so `--help` stays light."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table

from capsctl.cli.options import DataRootOpt, cli_errors, data_root_text, err
from capsctl.errors import CapsctlError

data_app = typer.Typer(no_args_is_help=True, help="Make or fetch evaluation datasets "
                                                   "(affnist-synth, affnist-download).")


@data_app.command("affnist-synth")
@cli_errors
def affnist_synth(
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder to write test_batches/1.mat ... into. Default: <data root>/"
                      "affnist-synth, where `capsctl eval --dataset affnist-synth` looks.")] = None,
    per_digit: Annotated[int, typer.Option(
        "--per-digit", help="Random affine versions of every MNIST test digit, one .mat file "
                            "each (affNIST: 32). Default: 32.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the transforms. Default: 0.")] = 0,
    rotation: Annotated[float, typer.Option(
        "--rotation", help="Rotation drawn within +-this many degrees. Default: 20.")] = 20.0,
    shear: Annotated[float, typer.Option(
        "--shear", help="Horizontal shear drawn within +-this. Default: 0.2.")] = 0.2,
    scale_min: Annotated[float, typer.Option(
        "--scale-min", help="Smallest horizontal / vertical scale. Default: 0.8.")] = 0.8,
    scale_max: Annotated[float, typer.Option(
        "--scale-max", help="Largest horizontal / vertical scale. Default: 1.2.")] = 1.2,
    force: Annotated[bool, typer.Option(
        "--force", help="Move an existing test_batches/ in --out aside. Default: off.")] = False,
    data_root: DataRootOpt = None,
):
    """Make an affNIST-style test set from the MNIST test digits (the creator's recipe), in the
    official .mat layout; results on it are always labelled affnist-synth, never affNIST.

    Example: capsctl data affnist-synth --per-digit 2; capsctl eval RUN --dataset affnist-synth
    """
    from capsctl.data import affnist, mnist

    root = mnist.resolve_root(data_root_text(data_root))
    images, labels = mnist.load_split(root, "test")
    target = out if out is not None else root / "affnist-synth"
    ranges = affnist.SynthRanges(rotation, shear, scale_min, scale_max)
    started = time.perf_counter()
    with Progress(TextColumn("affnist-synth"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("", total=per_digit)
        summary = _write_synth(affnist, target, images, labels, per_digit, seed, ranges,
                               force, lambda k: bar.update(task, completed=k))
    table = Table(title="affnist-synth (not the official affNIST)")
    table.add_column("item")
    table.add_column("value", justify="right")
    table.add_row("folder", escape(str(summary["folder"])))
    table.add_row("images", f"{summary['images']:,} ({summary['digits']:,} digits x "
                            f"{per_digit})")
    table.add_row("rotation / shear", f"+-{rotation} deg / +-{shear}")
    table.add_row("scale per axis", escape(f"[{scale_min}, {scale_max}]"))
    table.add_row("seed", str(seed))
    table.add_row("time", f"{time.perf_counter() - started:.1f} s")
    err.print(table)
    if out is not None and target.resolve() != (root / "affnist-synth").resolve():
        err.print("note: `capsctl eval --dataset affnist-synth` looks in <data root>/"
                  "affnist-synth; evaluate with --data-root set to a folder holding both the "
                  "MNIST files and this one as affnist-synth/", highlight=False)


def _write_synth(affnist, target: Path, images, labels, per_digit: int, seed: int, ranges,
                 force: bool, progress) -> dict:
    """affnist.write_synth, leaving no partial ``.test_batches.writing`` folder behind when it
    fails (a full disk, Ctrl-C); a failed write names the folder. Returns its summary."""
    partial = target / f".{affnist.BATCH_DIRS['test']}.writing"
    try:
        return affnist.write_synth(target, images, labels, per_digit, seed, ranges, force,
                                   progress=progress)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror or str(e), str(partial)) from None
        raise


@data_app.command("affnist-download")
@cli_errors
def affnist_download(
    split: Annotated[str, typer.Option(
        "--split", help="test (test_batches.zip, 320,000 images) or val "
                        "(validation_batches.zip). Default: test.")] = "test",
    data_root: DataRootOpt = None,
):
    """Download and unpack the official affNIST batches into <data root>/affnist/.

    Example: capsctl data affnist-download --data-root ~/.cache/capsctl
    """
    if split not in ("test", "val"):
        raise CapsctlError(f"--split {split!r}: expected test or val")
    from capsctl.data import affnist, mnist

    root = mnist.resolve_root(data_root_text(data_root))
    err.print(f"downloading {affnist.BASE_URL}{affnist.BATCH_DIRS[split]}.zip ...")
    folder = affnist.download(root, split)
    err.print(f"affNIST {split} batches in {escape(str(folder))}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `data` command group to ``app``."""
    app.add_typer(data_app, name="data")
