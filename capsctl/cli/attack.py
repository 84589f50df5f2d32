"""capsctl attack and capsctl calibrate: parse, call capsctl.adversarial.run's
``attack_checkpoints`` / ``calibrate_checkpoint``, print a table (or JSON). torch is imported
inside the commands, so their --help stays light."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from capsctl.adversarial import DEFAULT_QUANTILE, METHODS
from capsctl.cli.options import DataRootOpt, DeviceOpt, cli_errors, data_root_text, err, \
    json_line, out, print_table
from capsctl.errors import CapsctlError



def _split(text: str, what: str, kind=str) -> list:
    """A comma-separated option value as a list (one line when a value does not parse)."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise CapsctlError(f"{what} {text!r}: expected comma-separated numbers, e.g. "
                           "0.05,0.1,0.2,0.3") from None


def _check_png(option: str, path: Optional[Path]) -> None:
    """Refuse a PNG target that cannot be written, before anything runs."""
    from capsctl.paths import nearest_existing, writable_folder

    if path is None:
        return
    if path.is_dir():
        raise CapsctlError(f"{option} {path} is a folder; give a file name such as "
                           f"{path / 'attack.png'}")
    if not writable_folder(nearest_existing(path.parent)):
        raise CapsctlError(f"{option} {path}: cannot write into {nearest_existing(path.parent)}")


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def attack_table(result: dict) -> Table:
    """A row per checkpoint and attack: accuracy under attack, success, detection."""
    unit = result["eps_unit"]
    table = Table(title=f"capsctl attack (eps in {'/255' if unit == '/255' else 'pixels'})")
    for col in ("run", "attack", "eps", "accuracy", "success", "detected @thr", "clean FPR",
                "AUROC", "undetected success", "cycle detected"):
        table.add_column(col, justify="left" if col in ("run", "attack") else "right")
    for run in result["runs"]:
        table.add_row(escape(run["name"]), "none", "0", _pct(run["clean_accuracy"]),
                      *["-"] * 6)
        for r in run["attacks"]:
            eps = f"{r['eps'] * 255:.3g}" if unit == "/255" else f"{r['eps']:g}"
            table.add_row(escape(run["name"]), r["label"], eps, _pct(r["accuracy"]),
                          _pct(r["success_rate"]), _pct(r.get("detection_rate")),
                          _pct(r.get("false_positive_rate")),
                          "-" if r.get("auroc") is None else f"{r['auroc']:.3f}",
                          _pct(r.get("undetected_success_rate")),
                          _pct(r.get("cycle_detection_rate")))
    return table


@cli_errors
def attack(
    checkpoints: Annotated[list[Path], typer.Argument(
        help="One or more checkpoints (.pt), run folders or pretrained model folders.")],
    method: Annotated[str, typer.Option(
        "--method", help=f"Attacks, comma-separated: {', '.join(METHODS)} (L-inf; "
                         "docs/adversarial.md). Default: fgsm,pgd.")] = "fgsm,pgd",
    eps: Annotated[str, typer.Option(
        "--eps", help="L-inf budgets, comma-separated, in pixel units [0, 1]; values above 1 "
                      "are read as /255 (8 = 8/255), said so in the output. Default: "
                      "0.05,0.1,0.2,0.3.")] = "0.05,0.1,0.2,0.3",
    steps: Annotated[int, typer.Option(
        "--steps", help="Steps of bim, pgd and cw. Default: 10.")] = 10,
    step_size: Annotated[Optional[float], typer.Option(
        "--step-size", help="Pixels per step of bim, pgd and cw. Default: 2.5 x eps / "
                            "steps.")] = None,
    targeted: Annotated[bool, typer.Option(
        "--targeted", help="Aim every image at a random other class (success = that class). "
                           "Default: untargeted.")] = False,
    limit: Annotated[int, typer.Option(
        "--limit", help="Attack the first N test images (0 = all). Default: 1000.")] = 1000,
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Attack on this dataset's test set. Default: the model's own.")]
    = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Images per batch. Default: train.eval_batch_size, at most "
                             "250.")] = 0,
    seed: Annotated[int, typer.Option(
        "--seed", help="Seed of pgd's random starts and of --targeted's targets. Default: "
                       "0.")] = 0,
    png: Annotated[Optional[Path], typer.Option(
        "--png", help="Draw clean and adversarial images with their reconstructions and "
                      "predictions (the first checkpoint) into this PNG. Default: none.")]
    = None,
    curve: Annotated[Optional[Path], typer.Option(
        "--curve", help="Draw accuracy against eps, a line per checkpoint and method, into "
                        "this PNG. Default: none.")] = None,
    roc: Annotated[Optional[Path], typer.Option(
        "--roc", help="Draw the reconstruction detector's ROC curves into this PNG. Default: "
                      "none.")] = None,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout. Default: a table.")] = False,
):
    """White-box attacks on trained models' test sets: accuracy under attack per eps, and how
    well the reconstruction distance detects the attacks (detection rate at the stored
    threshold, AUROC, undetected success).

    Examples: capsctl attack runs/mnist --png attack.png; capsctl attack runs/capsnet
    runs/cnn --method fgsm,pgd --eps 0.05,0.1,0.2,0.3 --curve robustness.png --roc roc.png
    """
    from capsctl.adversarial.run import attack_checkpoints

    methods = _split(method, "--method")
    for option, path in (("--png", png), ("--curve", curve), ("--roc", roc)):
        _check_png(option, path)
    result = attack_checkpoints(checkpoints, methods, _split(eps, "--eps", float), steps,
                                step_size, targeted, limit or None, dataset,
                                data_root_text(data_root), device, batch_size or None, seed,
                                png, curve, roc, progress_console=None if as_json else err)
    if as_json:
        json_line(result)
        return
    print_table(attack_table(result))
    for run in result["runs"]:
        d = run["detector"]
        where = run["detector_source"]
        words = (f"threshold {d['threshold']:.4g} ({d['quantile']:.0%} of {d['n']:,} clean "
                 f"{d['split']} images; {where})") if d else where
        err.print(f"{escape(run['name'])}: {run['n']:,} images; detector: {escape(words)}",
                  highlight=False)
    if result["eps_unit"] == "/255":
        err.print("eps was given in /255 units (values above 1)", highlight=False)
    for what, path in result["pictures"].items():
        err.print(f"{what}: {escape(path)}", highlight=False)


@cli_errors
def calibrate(
    checkpoint: Annotated[Path, typer.Argument(
        help="A checkpoint (.pt), run folder (its best.pt) or pretrained model folder.")],
    quantile: Annotated[float, typer.Option(
        "--quantile", help="The threshold is this quantile of the clean images' "
                           "reconstruction distances. Default: 0.95 (5% false "
                           "positives).")] = DEFAULT_QUANTILE,
    split: Annotated[str, typer.Option(
        "--split", help="Clean images from: val (or test). Default: val.")] = "val",
    limit: Annotated[int, typer.Option(
        "--limit", help="Use the first N images of the split (0 = all). Default: 0.")] = 0,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the threshold without writing it. Default: write it into "
                          "the checkpoint (atomically; nothing else changes).")] = False,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", help="Images per batch. Default: train.eval_batch_size.")] = 0,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout. Default: a line.")] = False,
):
    """Set the reconstruction detector's threshold of a checkpoint from clean images and keep
    it in the checkpoint (training does this itself; this is for older checkpoints). `capsctl
    predict` then marks inputs above it unusual, and `capsctl attack` measures detection at
    it.

    Example: capsctl calibrate runs/mnist
    """
    from capsctl.adversarial.run import calibrate_checkpoint

    if limit < 0 or batch_size < 0:
        raise CapsctlError("--limit and --batch-size must be >= 0")
    result = calibrate_checkpoint(checkpoint, quantile, split, data_root_text(data_root),
                                  device, batch_size or None, limit or None, not dry_run)
    if as_json:
        json_line(result)
        return
    d = result["detector"]
    verb = "stored in" if result["written"] else "not written (--dry-run) to"
    out.print(f"threshold {d['threshold']:.4g}: the {d['quantile']:.0%} quantile of "
              f"{d['n']:,} {d['split']} reconstruction distances; {verb} "
              f"{escape(result['checkpoint'])}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the attack and calibrate commands to ``app``."""
    app.command("attack")(attack)
    app.command("calibrate")(calibrate)
