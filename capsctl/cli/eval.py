"""capsctl eval: parse, call capsctl.evaluate.evaluate_checkpoints, print a table (and each
class's accuracy) or JSON; ``--confusion FILE`` draws the confusion matrices, ``--ensemble``
averages the checkpoints' scores into one model.

torch is imported inside the command, so `capsctl eval --help` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from capsctl.cli.options import DataRootOpt, DeviceOpt, cli_errors, data_root_text, err, \
    join_group, json_line, print_table
from capsctl.errors import CapsctlError


def _cells(r: dict | None) -> list[str]:
    """The accuracy and error cells of one (checkpoint, dataset) result; dashes when absent."""
    if r is None:
        return ["-", "-"]
    cells = [f"{r['accuracy']:.4%}", f"{r['error']:.4%} (n={r['n']:,})"]
    if "at_least_one_accuracy" in r:  # multimnist: accuracy is the exact pair
        cells[0] += f" exact pair; >=1 correct {r['at_least_one_accuracy']:.2%}"
        cells[1] += f"; box overlap {r['bbox_overlap_of_smaller']:.1%}"
    return cells


def results_table(results: list[dict], split: str) -> Table:
    """One row per checkpoint, an accuracy and an error column per dataset."""
    table = Table(title=f"capsctl eval ({split})")
    table.add_column("checkpoint")
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    for d in datasets:
        table.add_column(f"{d} accuracy", justify="right")
        table.add_column(f"{d} error", justify="right")
    for ck in dict.fromkeys(r["checkpoint"] for r in results):
        row = [escape(ck)]
        for d in datasets:
            row += _cells(next((r for r in results
                                if r["checkpoint"] == ck and r["dataset"] == d), None))
        table.add_row(*row)
    return table


MAX_CLASS_ROWS = 62   # classes listed in a per-class table (EMNIST byclass); more: --json


def per_class_tables(results: list[dict]) -> list[Table]:
    """Each class's accuracy: a table per set of classes, a row per class, a column per result
    with a confusion matrix (none for two-label datasets; more than MAX_CLASS_ROWS classes are
    left to --json)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if "per_class_accuracy" in r and len(r["classes"]) <= MAX_CLASS_ROWS:
            groups.setdefault(tuple(r["classes"]), []).append(r)
    tables = []
    for classes, rows in groups.items():
        table = Table(title="accuracy per class")
        table.add_column("class")
        for r in rows:
            table.add_column(escape(f"{Path(r['checkpoint']).name} on {r['dataset']}"),
                             justify="right")
        for k, name in enumerate(classes):
            cells = []
            for r in rows:
                acc, n = r["per_class_accuracy"][name], sum(r["confusion"][k])
                cells.append("-" if acc is None else f"{acc:.2%} (n={n:,})")
            table.add_row(escape(name), *cells)
        tables.append(table)
    return tables


@cli_errors
def eval_(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="One or more checkpoints (.pt) or run folders (their checkpoints/best.pt).")],
    dataset: Annotated[list[str], typer.Option(
        "--dataset", help="Dataset to evaluate on, repeatable. Default: the one the model was "
                          "trained on.")] = [],
    split: Annotated[str, typer.Option(
        "--split", help="test or val. Default: test.")] = "test",
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Evaluation batch size. Default: train.eval_batch_size.")] = 0,
    limit: Annotated[int, typer.Option(
        "--limit", help="Evaluate only the first N examples (0 = all). Default: 0.")] = 0,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
    ensemble: Annotated[bool, typer.Option(
        "--ensemble", help="Average the class scores (capsule lengths) of all the checkpoints "
                           "into one prediction: one row 'ensemble of N'. They must share the "
                           "dataset, the classes and the kind of score (capsule lengths, EM "
                           "activations, a CNN's logits: one kind per ensemble). Default: one "
                           "row per checkpoint.")] = False,
    confusion: Annotated[Optional[Path], typer.Option(
        "--confusion", help="Also draw the confusion matrix of every row into this PNG file "
                            "(rows: true class, columns: prediction). Default: none.")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout (non-finite numbers as null), "
                       "with per_class_accuracy {class: accuracy} and confusion (rows: true "
                       "class, columns: prediction). Default: tables.")] = False,
):
    """Evaluate checkpoints; one row per checkpoint (or one for an --ensemble), one column per
    dataset, then each class's accuracy.

    Examples: capsctl eval runs/mnist/checkpoints/best.pt --confusion confusion.png;
    capsctl eval runs/mnist --split val --json; capsctl eval runs/m1 runs/m2 runs/m3 --ensemble
    """
    if split not in ("test", "val"):
        raise CapsctlError(f"--split {split!r}: expected test or val")
    if batch_size < 0 or limit < 0:
        raise CapsctlError("--batch-size and --limit must be >= 0")
    from capsctl import distributed
    from capsctl.evaluate import check_confusion_target, confusion_png, evaluate_checkpoints

    check_confusion_target(confusion)
    group, device = join_group(device)
    try:
        results = evaluate_checkpoints(checkpoints, dataset, split, device, batch_size or None,
                                       limit or None, data_root_text(data_root),
                                       progress_console=None if as_json else err, group=group,
                                       ensemble=ensemble)
    finally:
        distributed.shutdown()
    if not group.is_main:
        return
    if confusion is not None:
        written = confusion_png(results, confusion)
        err.print(f"confusion matrix: {escape(str(written))}", highlight=False)
    if as_json:
        json_line(results[0] if len(results) == 1 else {"results": results})
        return
    print_table(results_table(results, split))
    for table in per_class_tables(results):
        print_table(table)


def register(app: typer.Typer) -> None:
    """Add the eval command to ``app``."""
    app.command("eval")(eval_)
