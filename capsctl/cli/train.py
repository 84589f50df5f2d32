"""capsctl train: parse, call capsctl.training.train, print the run's summary table.

torch and the trainer are imported inside the command, so `capsctl train --help` stays light.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path, PureWindowsPath
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from capsctl.cli.options import DataRootOpt, DeviceOpt, SetOpt, cli_errors, data_root_text, \
    err, join_group
from capsctl.errors import CapsctlError, TrainingError


def check_name(name: str) -> str:
    """``name`` when it is a plain run-folder name; raises CapsctlError for a path (a separator,
    ``.``, ``..``, a drive, empty)."""
    if (not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0")
            or PureWindowsPath(name).drive):
        raise CapsctlError(f"--name {name!r}: a run name, not a path (no '/' or '\\', not '.' "
                           "or '..', not absolute); --run-dir picks the folder it goes in")
    return name


def _resume_config(folder: Path, set_: list[str], root_flag: str | None):
    """The config stored in ``folder``'s last.pt (or, for a run that died before its first
    checkpoint, its config.yaml) with the allowed train.* overrides applied."""
    from capsctl import checkpoint, config as config_mod
    from capsctl.runfolder import RunFolder, check_resume_key

    run = RunFolder(folder)
    if run.last.is_file():
        state = checkpoint.load(run.last)
        cfg = checkpoint.config_of(state, run.last)
    elif run.config.is_file():  # train() starts it again from step 0
        cfg = config_mod.load(run.config, (), root_flag)
    elif folder.is_dir():
        raise CapsctlError(f"--resume {folder}: nothing to resume (no checkpoints/last.pt, no "
                           "config.yaml): start the run again without --resume")
    else:
        raise CapsctlError(f"--resume {folder}: no such run folder")
    for key, value in config_mod.parse_overrides(set_):
        check_resume_key(key)   # the rule `capsctl sweep` applies to a folder too
        config_mod.set_key(cfg, key, value)
    config_mod.validate(cfg, "--set")  # train() rewrites config.yaml once resumed
    return cfg


def _check_flags(config: Optional[Path], name: Optional[str], resume: Optional[Path],
                 force: bool, nproc: int) -> None:
    """Raises CapsctlError for option combinations that cannot work."""
    if nproc < 1:
        raise CapsctlError(f"--nproc {nproc}: expected 1 or more")
    if name is not None:
        check_name(name)
    if resume is None:
        return
    if force:
        raise CapsctlError("--resume and --force conflict: resume continues a run, --force "
                           "starts a new one")
    if config is not None or name is not None:
        raise CapsctlError("--resume takes the config from the run folder; drop the CONFIG "
                           "argument and --name (use --set to change train.epochs)")


def _exec_torchrun(nproc: int) -> None:
    """Replace this process by torchrun with ``nproc`` workers running the same command."""
    from capsctl import distributed

    if distributed.env_group().enabled:
        raise CapsctlError("--nproc conflicts with torchrun: use one or the other")
    distributed.dist_timeout()  # a bad CAPSCTL_DIST_TIMEOUT: one line here, not one per worker
    argv = distributed.torchrun_argv(nproc, distributed.strip_nproc(sys.argv[1:]))
    os.execv(argv[0], argv)  # torchrun takes over this process (and its signals)


def _summary_table(summary: dict) -> Table:
    """The table printed after training: steps, accuracies, time, best checkpoint."""
    table = Table(title=escape(f"run {summary['run_dir']}"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", f"{summary['steps']:,}")
    if summary["best_val_accuracy"] is not None:
        table.add_row("best val accuracy", f"{summary['best_val_accuracy']:.4%} "
                      f"(step {summary['best_step']})")
    table.add_row("test accuracy (best)", f"{summary['test_accuracy']:.4%}")
    table.add_row("test error (best)", f"{summary['test_error']:.4%}")
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("best checkpoint", escape(str(summary["best_checkpoint"])))
    return table


@cli_errors
def train(
    config: Annotated[Optional[Path], typer.Argument(
        help="Experiment YAML (e.g. configs/mnist.yaml). Not needed with --resume.")] = None,
    set_: SetOpt = [],
    run_dir: Annotated[Path, typer.Option(
        "--run-dir", help="Folder that holds the run folders. Default: runs.")] = Path("runs"),
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Run folder name (a name, not a path). Default: the config file's "
                       "name.")] = None,
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
    _check_flags(config, name, resume, force, nproc)
    if nproc > 1:
        _exec_torchrun(nproc)
    from capsctl import config as config_mod, device as device_mod, distributed
    from capsctl.training import Interrupted, check_run_dir, train as train_fn

    group, device = join_group(device)
    if resume is not None:
        cfg, folder = _resume_config(resume, set_, data_root_text(data_root)), resume
    elif config is None:
        raise CapsctlError("missing CONFIG: capsctl train configs/mnist.yaml (or --resume "
                           "RUN_DIR)")
    else:
        cfg, folder = config_mod.load(config, set_, data_root_text(data_root)), None
    dev = device_mod.resolve(device or cfg.train.device)
    if folder is None:  # created by train(); rank 0 decides for every rank
        run_name = name or check_name(config.stem)
        folder = distributed.agree(lambda: check_run_dir(run_dir, run_name, force, cfg), group)
    try:
        summary = train_fn(cfg, folder, dev, data_root=data_root_text(data_root),
                           resume=resume is not None, console=err,
                           show_progress=not no_progress, force=force, group=group)
    except Interrupted as e:
        err.print(f"[yellow]{escape(str(e))}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except RuntimeError as e:
        if not group.enabled:
            raise
        raise TrainingError(f"rank {group.rank}: a collective operation failed - a peer process "
                            f"died or stalled ({str(e).splitlines()[0][:200]})") from None
    finally:
        distributed.shutdown()
    err.print(_summary_table(summary))


def register(app: typer.Typer) -> None:
    """Add the train command to ``app``."""
    app.command()(train)
