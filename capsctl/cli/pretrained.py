"""capsctl pretrained: the models committed under pretrained/ (capsctl.pretrained) - list them
(reads only their cards: never imports torch), ``export`` one from a run's checkpoint, ``check``
one against its card. A pretrained folder is accepted wherever a checkpoint is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from capsctl.cli.options import DataRootOpt, DeviceOpt, cli_errors, data_root_text, err, \
    json_line, out, print_table
from capsctl.errors import CapsctlError

RootOpt = Annotated[Optional[Path], typer.Option(
    "--root", help="The folder of pretrained models. Default: ./pretrained, else the "
                   "repository's pretrained/.")]

pretrained_app = typer.Typer(
    invoke_without_command=True,
    help="Pretrained models small enough for git (pretrained/NAME/: model.pt, card.json, "
         "slice.npz): list them, export one from a run, check one against its card. Use a "
         "folder as a checkpoint: capsctl predict pretrained/NAME digit.png")


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def _epochs(r: dict) -> str:
    """"37 of 40": the epochs trained when the checkpoint was saved, of the run's."""
    if r.get("epochs") is None:
        return "-"
    return f"{r['epochs']}" + (f" of {r['run_epochs']}" if r.get("run_epochs") else "")


def listing_table(rows: list[dict]) -> Table:
    """A row per model: name, model, data, test error (n), epochs, size, storage, command."""
    table = Table(title="capsctl pretrained")
    for col in ("name", "model", "data", "test error", "epochs", "size", "storage", "command"):
        table.add_column(col, justify="right" if col in ("test error", "epochs", "size")
                         else "left")
    for r in rows:
        if "problem" in r:
            table.add_row(escape(r["name"]), "[red]unreadable[/]", "", "", "", _size(r["bytes"]),
                          "", escape(r["problem"]))
            continue
        s = r.get("storage") or {}
        table.add_row(escape(r["name"]), escape(str(r["model"])), escape(str(r["data"])),
                      "-" if r["test_error"] is None else
                      f"{r['test_error']:.2%} (n={r['test_n']:,})",
                      _epochs(r), _size(r["bytes"]),
                      escape(f"{s.get('classifier', '?')} + decoder {s.get('decoder', '?')}"),
                      escape(r["command"] or "(not recorded)"))
    return table


@pretrained_app.callback()
@cli_errors
def pretrained(
    ctx: typer.Context,
    root: RootOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout. Default: a table.")] = False,
):
    """List the pretrained models: test error, data, epochs, size and the command that made
    each.

    Examples: capsctl pretrained; capsctl predict pretrained/efficient-capsnet-mnist digit.png;
    capsctl pretrained export runs/effcaps/checkpoints/best.pt --name effcaps-mnist
    --command "capsctl train configs/efficient-capsnet.yaml --set train.epochs=40"
    """
    if ctx.invoked_subcommand is not None:
        return
    from capsctl.pretrained import listing, repo_folder

    rows = listing(root)
    if as_json:
        json_line({"root": str(root or repo_folder()), "models": rows})
        return
    if not rows:
        out.print(f"no pretrained models in {escape(str(root or repo_folder()))}",
                  highlight=False)
        return
    print_table(listing_table(rows))


@pretrained_app.command("export")
@cli_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(
        help="The run's checkpoint (.pt) or run folder (its checkpoints/best.pt).")],
    name: Annotated[str, typer.Option("--name", help="The model's folder name (required).")],
    command: Annotated[Optional[str], typer.Option(
        "--command", help="The exact command that trained it, kept in the card. "
                          "Default: none (listed as not recorded).")] = None,
    note: Annotated[Optional[str], typer.Option(
        "--note", help="A line for the card (machine, wall time). Default: none.")] = None,
    classifier: Annotated[str, typer.Option(
        "--classifier", help="Storage of every tensor outside the decoder: fp32 (its accuracy "
                             "is exactly the run's) or bf16. Default: fp32.")] = "fp32",
    decoder: Annotated[str, typer.Option(
        "--decoder", help="Storage of the decoder's weights: fp32, bf16, int8 (a scale per "
                          "row), int4 (a scale per 32 values) or auto (the most precise that "
                          "fits --max-mb). Default: auto.")] = "auto",
    max_mb: Annotated[float, typer.Option(
        "--max-mb", help="Largest model.pt in MB (10^6 bytes). Default: 2.")] = 2.0,
    slice_n: Annotated[int, typer.Option(
        "--slice", help="Test examples kept in slice.npz to check the model where the dataset "
                        "is absent (0: none). Default: 200.")] = 200,
    root: RootOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing folder of that name. Default: off.")] = False,
    device: Annotated[str, typer.Option(
        "--device", help="Where the card's accuracies are measured: cpu | cuda | cuda:N. "
                         "Default: cpu, where tests/test_pretrained.py checks them.")] = "cpu",
    data_root: DataRootOpt = None,
):
    """Make pretrained/NAME/ from a run's checkpoint, and record its exact test accuracy (the
    stored model evaluated as `capsctl eval` does) in its card.

    Example: capsctl pretrained export runs/effcaps/checkpoints/best.pt --name effcaps-mnist
    --command "capsctl train configs/efficient-capsnet.yaml --set train.epochs=40"
    """
    if decoder not in ("auto", "fp32", "bf16", "int8", "int4"):
        raise CapsctlError(f"--decoder {decoder!r}: expected auto, fp32, bf16, int8 or int4")
    if classifier not in ("fp32", "bf16"):
        raise CapsctlError(f"--classifier {classifier!r}: expected fp32 or bf16")
    if not 0 < max_mb <= 1000:
        raise CapsctlError(f"--max-mb {max_mb:g}: expected more than 0 (at most 1000)")
    from capsctl.pretrained import export as run_export

    card = run_export(checkpoint, name, root, classifier, decoder, int(max_mb * 1e6), command,
                      note, slice_n, device, data_root_text(data_root), force)
    t, s = card["test"], card["storage"]
    out.print(f"{escape(name)}: {card['model']} on {card['data']}, test accuracy "
              f"{t['accuracy']:.4%} ({t['correct']:,}/{t['n']:,}; the source checkpoint: "
              f"{card['source']['test_accuracy']:.4%}), model.pt {_size(s['bytes'])} "
              f"(classifier {s['classifier']}, decoder {s['decoder']})", highlight=False)
    if card.get("slice"):
        out.print(f"slice: {card['slice']['correct']}/{card['slice']['n']} of the first test "
                  "examples", highlight=False)


@pretrained_app.command("check")
@cli_errors
def check(
    folders: Annotated[list[Path], typer.Argument(help="Pretrained model folders.")],
    full: Annotated[bool, typer.Option(
        "--full", help="Also evaluate on the whole test set (the dataset must be present). "
                       "Default: the slice only.")] = False,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
):
    """Evaluate pretrained models and compare with their cards (exit 1 on a difference).

    Example: capsctl pretrained check pretrained/* --full
    """
    from capsctl.pretrained import verify

    bad = 0
    for folder in folders:
        for what, recorded, now in verify(folder, full, device, data_root_text(data_root)):
            same = recorded == now
            bad += not same
            out.print(f"{escape(str(folder))} {what}: recorded {recorded}, now {now} "
                      + ("[green]same[/]" if same else "[red]DIFFERENT[/]"), highlight=False)
    if bad:
        err.print(f"[red]error:[/] {bad} result(s) differ from the cards", highlight=False)
        raise typer.Exit(1)


@pretrained_app.command("example")
@cli_errors
def example(
    folder: Annotated[Path, typer.Argument(help="A pretrained model folder.")],
    png: Annotated[Path, typer.Option("--out", help="The PNG file to write (required).")],
    index: Annotated[int, typer.Option(
        "--index", help="Which of the folder's test examples (slice.npz). Default: 0.")] = 0,
):
    """Write one real test image kept with a pretrained model as a PNG, to try `capsctl
    predict` on.

    Example: capsctl pretrained example pretrained/efficient-capsnet-mnist --out digit.png
    """
    from capsctl.pretrained import write_example

    done = write_example(folder, index, png)
    out.print(f"{escape(done['path'])}: test example {done['index']}, label "
              f"{escape(done['label'])}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `pretrained` command group to ``app``."""
    app.add_typer(pretrained_app, name="pretrained")
