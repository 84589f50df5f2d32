"""The capsctl command line: each command parses its options, calls one library function and
prints a rich summary. Bad input is one line on stderr and exit code 2 (CAPSCTL_DEBUG=1 shows the
traceback)."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from capsctl import __version__
from capsctl.errors import CapsctlError, TrainingError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="rich",
                  help="Train, evaluate and inspect Capsule Networks (Sabour, Frosst & Hinton "
                       "2017) from YAML experiments.")
out = Console()
err = Console(stderr=True)


def _debug() -> bool:
    return os.environ.get("CAPSCTL_DEBUG", "") not in ("", "0")


def cli_errors(fn):
    """One line and an exit code for user errors; a short note for anything unexpected."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from capsctl.train import Interrupted

        try:
            return fn(*args, **kwargs)
        except CapsctlError as e:
            if _debug():
                raise
            err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except Interrupted as e:
            err.print(f"[yellow]{escape(str(e))}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # disk full, permissions: the environment, not the input
            if _debug():
                raise
            where = f" {e.filename}" if e.filename else ""
            err.print(f"[red]error:[/] cannot access{escape(str(where))}: "
                      f"{escape(e.strerror or str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _join_group(device: str | None):
    """Under torchrun: join the process group; ranks other than 0 print nothing."""
    from capsctl import distributed

    group, device_name = distributed.init(device or "auto")
    if not group.is_main and not _debug():
        out.quiet = err.quiet = True
    return group, (device_name if group.enabled else device)


def _version(value: bool):
    if value:
        out.print(f"capsctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None):
    from capsctl.device import tune_allocator

    tune_allocator()


DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N. Default: train.device from the config (auto).")]
SetOpt = Annotated[list[str], typer.Option(
    "--set", help="Override a config key, repeatable: --set train.epochs=3 (values are YAML). "
                  "Default: none.")]
DataRootOpt = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Folder with the MNIST IDX files. Default: data.root, then "
                        "$CAPSCTL_DATA, then ~/.cache/capsctl.")]


@app.command()
@cli_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(
        help="Experiment YAML (e.g. configs/mnist.yaml). Not needed with --resume.")] = None,
    set_: SetOpt = [],
    run_dir: Annotated[Path, typer.Option(
        "--run-dir", help="Folder that holds the run folders. Default: runs.")] = Path("runs"),
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Run folder name. Default: the config file's name.")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="Continue the run in this folder from checkpoints/last.pt.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Move an existing run folder of the same name aside and start anew. "
                        "Default: off.")] = False,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
    no_progress: Annotated[bool, typer.Option(
        "--no-progress", help="No progress bar (for logs). Default: shown.")] = False,
    nproc: Annotated[int, typer.Option(
        "--nproc", help="Train with N processes on this machine (DDP; starts torchrun). "
                        "Default: 1.")] = 1,
):
    """Train a model from a YAML experiment; writes runs/NAME/ (config, checkpoints, TensorBoard,
    metrics.jsonl).

    Examples: capsctl train configs/mnist.yaml --set train.epochs=1;
    capsctl train --resume runs/mnist; capsctl train configs/mnist.yaml --nproc 2
    """
    from capsctl import checkpoint, config as config_mod, device as device_mod, distributed
    from capsctl.train import check_run_dir, train as train_fn

    if nproc < 1:
        raise CapsctlError(f"--nproc {nproc}: expected 1 or more")
    if nproc > 1:
        if distributed.env_group().enabled:
            raise CapsctlError("--nproc conflicts with torchrun: use one or the other")
        argv = distributed.torchrun_argv(nproc, distributed.strip_nproc(sys.argv[1:]))
        os.execv(argv[0], argv)  # torchrun takes over this process (and its signals)
    group, device = _join_group(device)

    if resume is not None:
        if force:
            raise CapsctlError("--resume and --force conflict: resume continues a run, --force "
                               "starts a new one")
        if config is not None or name is not None:
            raise CapsctlError("--resume takes the config from the run folder; drop the CONFIG "
                               "argument and --name (use --set to change train.epochs)")
        folder = resume
        last = folder / "checkpoints" / "last.pt"
        if not last.is_file():
            raise CapsctlError(f"--resume {folder}: no checkpoints/last.pt there to continue "
                               "from")
        state = checkpoint.load(last)
        cfg = checkpoint.config_of(state, last)
        for text in set_:
            key, value = config_mod.parse_override(text)
            if not key.startswith("train.") or key in ("train.batch_size", "train.seed"):
                raise CapsctlError(f"--set {key}: only train.* keys (not batch_size or seed) "
                                   "can change when resuming; start a new run instead")
            config_mod.set_key(cfg, key, value)
        config_mod.validate(cfg, "--set")  # train() rewrites config.yaml once resumed
    else:
        if config is None:
            raise CapsctlError("missing CONFIG: capsctl train configs/mnist.yaml (or --resume "
                               "RUN_DIR)")
        cfg = config_mod.load(config, set_)
        folder = None
    dev = device_mod.resolve(device or cfg.train.device)
    if folder is None:  # created by train(); rank 0 decides for every rank
        folder = distributed.agree(lambda: check_run_dir(run_dir, name or config.stem, force),
                                   group)
    try:
        summary = train_fn(cfg, folder, dev, data_root=str(data_root) if data_root else None,
                           resume=resume is not None, console=err,
                           show_progress=not no_progress, force=force, group=group)
    except RuntimeError as e:
        if not group.enabled:
            raise
        raise TrainingError(f"rank {group.rank}: a collective operation failed - a peer process "
                            f"died or stalled ({str(e).splitlines()[0][:200]})") from None
    finally:
        distributed.shutdown()
    table = Table(title=f"run {summary['run_dir']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", f"{summary['steps']:,}")
    if summary["best_val_accuracy"] is not None:
        table.add_row("best val accuracy", f"{summary['best_val_accuracy']:.4%} "
                      f"(step {summary['best_step']})")
    table.add_row("test accuracy (best)", f"{summary['test_accuracy']:.4%}")
    table.add_row("test error (best)", f"{summary['test_error']:.4%}")
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("best checkpoint", summary["best_checkpoint"])
    err.print(table)


@app.command("eval")
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
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout. Default: a table.")] = False,
):
    """Evaluate checkpoints; one row per checkpoint, one column per dataset.

    Examples: capsctl eval runs/mnist/checkpoints/best.pt;
    capsctl eval runs/mnist --split val --json
    """
    from capsctl import distributed
    from capsctl.evaluate import evaluate_checkpoints

    group, device = _join_group(device)
    if split not in ("test", "val"):
        raise CapsctlError(f"--split {split!r}: expected test or val")
    if batch_size < 0 or limit < 0:
        raise CapsctlError("--batch-size and --limit must be >= 0")
    try:
        results = evaluate_checkpoints(checkpoints, dataset, split, device, batch_size or None,
                                       limit or None, str(data_root) if data_root else None,
                                       progress_console=None if as_json else err, group=group)
    finally:
        distributed.shutdown()
    if not group.is_main:
        return
    if as_json:
        payload = results[0] if len(results) == 1 else {"results": results}
        sys.stdout.write(json.dumps(payload) + "\n")
        return
    table = Table(title=f"capsctl eval ({split})")
    table.add_column("checkpoint")
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    for d in datasets:
        table.add_column(f"{d} accuracy", justify="right")
        table.add_column(f"{d} error", justify="right")
    for ck in dict.fromkeys(r["checkpoint"] for r in results):
        row = [ck]
        for d in datasets:
            r = next((r for r in results if r["checkpoint"] == ck and r["dataset"] == d), None)
            row += ([f"{r['accuracy']:.4%}", f"{r['error']:.4%} (n={r['n']:,})"] if r
                    else ["-", "-"])
            if r and "at_least_one_accuracy" in r:  # multimnist: accuracy is the exact pair
                row[-2] += f" exact pair; >=1 correct {r['at_least_one_accuracy']:.2%}"
                row[-1] += f"; box overlap {r['bbox_overlap_of_smaller']:.1%}"
        table.add_row(*row)
    out.print(table)


@app.command()
@cli_errors
def config(
    path: Annotated[Optional[Path], typer.Argument(
        help="YAML file to resolve. Default: none (the built-in defaults).")] = None,
    set_: SetOpt = [],
    reference: Annotated[bool, typer.Option(
        "--reference", help="Print every key with its default and meaning (Markdown table).")]
    = False,
):
    """Print the resolved configuration (defaults < YAML < --set), or the key reference.

    Example: capsctl config configs/mnist.yaml --set train.epochs=2
    """
    from capsctl import config as config_mod

    if reference:
        lines = ["| key | default | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{k}` | `{d}` | {h.replace('|', '/')} |"
                  for k, d, h in config_mod.reference()]
        sys.stdout.write("\n".join(lines) + "\n")
        return
    sys.stdout.write(config_mod.dump(config_mod.load(path, set_)))


# Commands that live in their own modules register themselves on ``app`` when imported.
from capsctl import cli_bench, cli_data, cli_inspect  # noqa: E402,F401


def main() -> None:
    try:
        app()
    except CapsctlError as e:  # raised outside a command (should not happen, but never trace)
        if _debug():
            raise
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
