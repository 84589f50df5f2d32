"""capsctl reconstruct, perturb and routes: pictures from a checkpoint. Each command parses its
options, calls capsctl.inspection.commands.run_* (which checks every option before writing) and
prints a summary. torch is imported inside the commands, so their --help stays light."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from capsctl.cli.options import DataRootOpt, DeviceOpt, cli_errors, data_root_text, err, \
    json_line, out, print_table
from capsctl.errors import CapsctlError

CheckpointArg = Annotated[Path, typer.Argument(
    help="A checkpoint (.pt) or a run folder (its checkpoints/best.pt); the model and its "
         "config come from it.")]
DatasetOpt = Annotated[Optional[str], typer.Option(
    "--dataset", help="Dataset to draw examples from. Default: the one the model was trained "
                      "on.")]
SplitOpt = Annotated[str, typer.Option("--split", help="test or val. Default: test.")]
OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", help="PNG file to write. Default: NAME.png in the checkpoint's run folder.")]
TbOpt = Annotated[Optional[Path], typer.Option(
    "--tb", help="TensorBoard folder for the image. Default: the run folder's tb/.")]
NoTbOpt = Annotated[bool, typer.Option(
    "--no-tb", help="Do not write the TensorBoard image. Default: written.")]
IndexOpt = Annotated[Optional[int], typer.Option(
    "--index", help="Example index in the split.")]


def _indices(values: list[str]) -> list[int]:
    """--indices values (comma-separated and/or repeated) as integers."""
    result = []
    for text in values:
        for part in text.replace(" ", "").split(","):
            if part:
                try:
                    result.append(int(part))
                except ValueError:
                    raise CapsctlError(f"--indices {text!r}: expected integers such as "
                                       "--indices 3,17,42") from None
    return result


def _written(r: dict) -> str:
    """Where the picture went, markup escaped (a path may hold square brackets)."""
    return escape(r["png"] + (f"  (TensorBoard: {r['tensorboard']})" if r["tensorboard"]
                              else ""))


@cli_errors
def reconstruct(
    checkpoint: CheckpointArg,
    dataset: DatasetOpt = None,
    split: SplitOpt = "test",
    n: Annotated[int, typer.Option(
        "--n", help="Examples per class row (or in all, with --plain). Default: 16.")] = 16,
    indices: Annotated[list[str], typer.Option(
        "--indices", help="These example indices as a plain grid (comma-separated or "
                          "repeated). Default: random examples.")] = [],
    plain: Annotated[bool, typer.Option(
        "--plain", help="A plain grid of --n random examples instead of one row per class. "
                        "Default: one row per class.")] = False,
    mask: Annotated[str, typer.Option(
        "--mask", help="Decode the capsule of the 'predicted' class or of the 'label'. "
                       "Default: predicted.")] = "predicted",
    seed: Annotated[int, typer.Option(
        "--seed", help="Seed of the random choice of examples. Default: 0.")] = 0,
    scale: Annotated[int, typer.Option(
        "--scale", help="Pixel upscaling factor, 1 to 16. Default: 2.")] = 2,
    out_: OutOpt = None,
    tb: TbOpt = None,
    no_tb: NoTbOpt = False,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
):
    """Inputs above their reconstructions (label and prediction marked, mistakes in red).

    Examples: capsctl reconstruct runs/mnist; capsctl reconstruct runs/mnist/checkpoints/best.pt
    --indices 3,17,42 --mask label --out recon.png
    """
    chosen = _indices(indices)
    from capsctl.inspection.commands import run_reconstruct

    r = run_reconstruct(checkpoint, dataset, split, n, chosen, not plain, mask, seed, out_, tb,
                        no_tb, device, data_root_text(data_root), scale)
    table = Table(title="capsctl reconstruct")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("examples", escape(f"{r['examples']} ({r['dataset']} {r['split']})"))
    if r["misclassified"] is not None:
        table.add_row("misclassified", str(r["misclassified"]))
        table.add_row("pixel MSE", f"{r['mse']:.5f} (mask: {r['mask']})")
    table.add_row("image", f"{r['size'][1]} x {r['size'][0]} px")
    table.add_row("written", _written(r))
    print_table(table)


def _change_table(examples: list[dict]) -> Table:
    """Per dimension (rows), each example's mean |pixel change| x 1000 (columns)."""
    table = Table(title="mean |pixel change| x 1000 per dimension", box=box.SIMPLE_HEAD,
                  padding=(0, 0, 0, 1), pad_edge=False, collapse_padding=True)
    table.add_column("dim", justify="right")
    for e in examples:
        table.add_column(escape(f"{e['capsule']}") + ("" if e["label"] == e["prediction"]
                                                      else "*"),
                         justify="right")
    if len(examples) > 1:
        table.add_column("mean", justify="right")
    tops = [sorted(e["change"], reverse=True)[:3] for e in examples]
    for d in range(len(examples[0]["change"])):
        values = [e["change"][d] for e in examples]
        cells = [f"[bold yellow]{1000 * v:.1f}[/]" if v in top else f"{1000 * v:.1f}"
                 for v, top in zip(values, tops)]
        if len(examples) > 1:
            cells.append(f"{1000 * sum(values) / len(values):.1f}")
        table.add_row(str(d), *cells)
    return table


@cli_errors
def perturb(
    checkpoint: CheckpointArg,
    index: IndexOpt = None,
    digit: Annotated[Optional[str], typer.Option(
        "--digit", help="A confidently classified example of class K (among the first 1,000 of "
                        "the split), or 'all' for one of each class. Default: all (unless "
                        "--index).")] = None,
    label: Annotated[bool, typer.Option(
        "--label", help="Perturb the capsule of the label instead of the prediction. Default: "
                        "the prediction.")] = False,
    range_: Annotated[float, typer.Option(
        "--range", help="Largest offset added to a dimension (finite, > 0). Default: 0.25.")]
    = 0.25,
    step: Annotated[float, typer.Option(
        "--step", help="Offset step; --range must be a multiple of it, at most 101 columns. "
                       "Default: 0.05.")] = 0.05,
    dataset: DatasetOpt = None,
    split: SplitOpt = "test",
    scale: Annotated[Optional[int], typer.Option(
        "--scale", help="Pixel upscaling factor, 1 to 16. Default: 3 for one example, 2 for "
                        "several.")] = None,
    out_: OutOpt = None,
    tb: TbOpt = None,
    no_tb: NoTbOpt = False,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
):
    """Perturb each dimension of a class capsule and decode (the paper's Figure 4).

    Prints, per dimension, the mean absolute pixel change over the range.
    Examples: capsctl perturb runs/mnist; capsctl perturb runs/mnist --digit 6 --range 0.3
    --step 0.1
    """
    from capsctl.inspection.commands import run_perturb

    r = run_perturb(checkpoint, index, digit, label, range_, step, dataset, split, out_, tb,
                    no_tb, device, data_root_text(data_root), scale)
    examples = r["examples"]
    print_table(_change_table(examples))
    out.print("columns: the perturbed capsule of example "
              + ", ".join(f"#{e['index']}" for e in examples)
              + "; * misclassified; bold: the 3 largest per example", highlight=False)
    err.print(f"written: {_written(r)}", highlight=False, soft_wrap=True)


def _routes_table(r: dict) -> Table:
    """Per class: its score, its share of the couplings after each pass, its agreement."""
    table = Table(title=escape(f"capsctl routes: {r['dataset']} {r['split']} #{r['index']}, "
                               f"label {r['label']}, predicted {r['prediction']}"))
    table.add_column("class", justify="right")
    table.add_column(escape(r["score"]), justify="right")
    for k in range(len(r["coupling_share"])):
        table.add_column(f"share, pass {k + 1}", justify="right")
    if "agreement_total" in r:
        table.add_column("agreement", justify="right")
    for j, length in enumerate(r["scores"]):
        row = [str(j), f"{length:.3f}"] + [f"{p[j]:.4f}" for p in r["coupling_share"]]
        if "agreement_total" in r:
            row.append(f"{r['agreement_total'][j]:+.3f}")
        style = "bold yellow" if j == r["prediction"] else None
        table.add_row(*row, style=style)
    return table


def _summary_table(r: dict) -> Table:
    """Per routing pass: how far the coefficients are from uniform (routes --summary)."""
    J = r["parents"]
    table = Table(title=f"capsctl routes --summary: {r['routing']} routing, {r['dataset']} "
                        f"{r['split']}, first {r['examples']:,} examples, {r['children']:,} "
                        f"children -> {J} parents")
    for col in ("pass", f"mean c to predicted (uniform {1 / J:.4f})", "largest c to predicted",
                "entropy / log J (uniform 1)", "children > 0.5 to one parent"):
        table.add_column(col, justify="right")
    for k in range(len(r["entropy"])):
        table.add_row(str(k + 1), f"{r['to_predicted'][k]:.4f}",
                      f"{r['largest_to_predicted'][k]:.3f}", f"{r['entropy'][k]:.4f}",
                      f"{100 * r['decided'][k]:.2f}%")
    return table


@cli_errors
def routes(
    checkpoint: CheckpointArg,
    index: Annotated[Optional[int], typer.Option(
        "--index", help="Example index in the split. Default: 0.")] = None,
    digit: Annotated[Optional[str], typer.Option(
        "--digit", help="Instead of --index: a confidently classified example of class K (a "
                        "class number or name).")]
    = None,
    dataset: DatasetOpt = None,
    split: SplitOpt = "test",
    scale: Annotated[int, typer.Option(
        "--scale", help="Pixel upscaling factor of the input, 1 to 16. Default: 3.")] = 3,
    out_: OutOpt = None,
    tb: TbOpt = None,
    no_tb: NoTbOpt = False,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the numbers (couplings per pass, agreement, scores) as one JSON "
                       "object on stdout. Default: a table.")] = False,
    summary: Annotated[Optional[int], typer.Option(
        "--summary", help="Instead of one example's picture: how far the coefficients of every "
                          "pass are from uniform over the first N examples of the split "
                          "(numbers only, nothing written). Default: off.")] = None,
):
    """Coupling coefficients after each routing pass as heat maps on the primary grid, per class,
    beside the input; and the agreement u_hat . v per class.

    Examples: capsctl routes runs/mnist --index 7; capsctl routes runs/mnist --digit 3 --json;
    capsctl routes runs/mnist --summary 1000
    """
    from capsctl.inspection.commands import run_routes, run_routes_summary

    if summary is not None:
        given = [flag for flag, value in (("--index", index), ("--digit", digit), ("--out", out_),
                                          ("--tb", tb)) if value is not None]
        if given:
            raise CapsctlError(f"--summary prints numbers over N examples; {given[0]} belongs "
                               "to the one-example picture: leave one of the two out")
        r = run_routes_summary(checkpoint, summary, dataset, split, device,
                               data_root_text(data_root))
        if as_json:
            json_line(r)
        else:
            print_table(_summary_table(r))
        return
    r = run_routes(checkpoint, index, digit, dataset, split,
                   out_, tb, no_tb, device, data_root_text(data_root), scale)
    if as_json:
        json_line(r)
        return
    print_table(_routes_table(r))
    err.print(f"written: {_written(r)}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add reconstruct, perturb and routes to ``app``."""
    app.command("reconstruct")(reconstruct)
    app.command("perturb")(perturb)
    app.command("routes")(routes)
