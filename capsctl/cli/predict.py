"""capsctl predict: a trained model on your own image files (PNG, JPEG, BMP, ... and .npy
arrays): parse, call capsctl.predict.predict, print a row per file or JSON lines.

torch is imported inside the command, so `capsctl predict --help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from capsctl.cli.options import DataRootOpt, DeviceOpt, cli_errors, data_root_text, err, \
    json_line, print_table


def _top(row: dict) -> str:
    return "  ".join(f"{escape(t['class'])} {t['score']:.3f}" for t in row["top_k"])


def predictions_table(result: dict) -> Table:
    """A row per file: the predicted class, its score (capsule length), the top-k classes;
    an unreadable file's row says why."""
    table = Table(title=f"capsctl predict - {escape(result['checkpoint'])} "
                        f"({escape(result['dataset'])} classes)")
    table.add_column("file")
    table.add_column("class")
    table.add_column(escape(result["score_name"]), justify="right")
    table.add_column("top-k")
    flagged = result.get("threshold") is not None
    if flagged:
        table.add_column(f"recon distance (unusual > {result['threshold']:.3g})",
                         justify="right")
    for row in result["rows"]:
        if "error" in row:
            table.add_row(escape(row["file"]), "[red]error[/]", "", escape(row["error"]),
                          *[""] * flagged)
        else:
            cells = [escape(row["file"]), escape(row["class"]), f"{row['score']:.4f}",
                     _top(row)]
            if flagged:
                cells.append(f"{row['distance']:.3f}" + (" [yellow]unusual[/]"
                                                        if row["unusual"] else ""))
            table.add_row(*cells)
    return table


@cli_errors
def predict(
    checkpoint: Annotated[Path, typer.Argument(
        help="The checkpoint (.pt) or run folder (its checkpoints/best.pt).")],
    files: Annotated[list[Path], typer.Argument(
        help="Image files (PNG, JPEG, BMP, GIF, WebP, TIFF; any size, grey or colour), .npy "
             "arrays ((H, W), (C, H, W) or (H, W, C); uint8, or floats in [0, 1]) and folders "
             "of them (searched at any depth).")],
    top_k: Annotated[int, typer.Option(
        "--top-k", help="How many of the highest-scoring classes each row lists. "
                        "Default: 3.")] = 3,
    recon: Annotated[Optional[Path], typer.Option(
        "--recon", help="Save each image as the model saw it beside its reconstruction (from "
                        "the predicted class's capsule) into this folder, as "
                        "NAME.recon.png. Default: none.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="With --recon: overwrite NAME.recon.png files that exist. Default: "
                        "refuse (one line, exit 2) and write nothing.")] = False,
    keep_going: Annotated[bool, typer.Option(
        "--keep-going", help="Predict every readable file; an unreadable one is a row marked "
                             "as an error. Default: stop at the first (one line, exit "
                             "2).")] = False,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Images per batch on the device. Default: "
                             "train.eval_batch_size.")] = 0,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object per file (JSON lines): file, class, index, score, "
                       "top_k, scores {class: score} (and recon; distance and unusual when "
                       "the checkpoint keeps a detector); or file and error. Default: a "
                       "table.")] = False,
):
    """Predict the class of your own images with a trained model, preprocessed exactly as the
    test images of the dataset it was trained on (channels, size, centre crop, scaling). A
    model with a stored detector (training keeps one; `capsctl calibrate` for older ones)
    marks an input whose reconstruction is far from it as unusual.

    Examples: capsctl predict runs/fashion shoe.jpg photos/;
    capsctl predict runs/mnist/checkpoints/best.pt digits/ --json --top-k 2
    """
    if batch_size < 0:
        from capsctl.errors import CapsctlError

        raise CapsctlError(f"--batch-size {batch_size}: expected 0 (default) or more")
    from capsctl.predict import predict as run_predict

    result = run_predict(checkpoint, files, device, batch_size or None, top_k, recon,
                         keep_going, data_root_text(data_root), force=force)
    if as_json:
        for row in result["rows"]:
            json_line(row)
    else:
        print_table(predictions_table(result))
    if result.get("threshold") is not None:
        ok = [r for r in result["rows"] if "error" not in r]
        n_unusual = sum(r["unusual"] for r in ok)
        err.print(f"{n_unusual} of {len(ok)} input(s) unusual: reconstruction distance above "
                  f"{result['threshold']:.4g}, the checkpoint's threshold (about 5% of clean "
                  "validation images are above it)", highlight=False)
    bad = sum("error" in r for r in result["rows"])
    if bad:
        err.print(f"[yellow]warning:[/] {bad} of {len(result['rows'])} file(s) could not be "
                  "read (rows marked as errors)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the predict command to ``app``."""
    app.command("predict")(predict)
