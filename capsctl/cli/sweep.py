"""capsctl sweep: train a grid of configs one after another (capsctl.sweep), then print the
compare table. torch and the trainer are imported inside the command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from capsctl.cli.options import DataRootOpt, DeviceOpt, SetOpt, cli_errors, data_root_text, \
    err, join_group, show_comparison
from capsctl.errors import CapsctlError


@cli_errors
def sweep(
    config: Annotated[Path, typer.Argument(help="Experiment YAML every grid point starts from.")],
    vary: Annotated[list[str], typer.Option(
        "--vary", help="A key and its values, repeatable (the grid is every combination): "
                       "--vary model.routing=dynamic,uniform. Values are YAML.")] = [],
    set_: SetOpt = [],
    run_dir: Annotated[Path, typer.Option(
        "--run-dir", help="Folder that holds the sweep's folder. Default: runs.")] = Path("runs"),
    name: Annotated[Optional[str], typer.Option(
        "--name", help="The sweep's folder name (a name, not a path). Default: the config "
                       "file's name.")] = None,
    device: DeviceOpt = None,
    data_root: DataRootOpt = None,
    no_progress: Annotated[bool, typer.Option(
        "--no-progress", help="No progress bars (for logs). Default: shown.")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the final comparison as one JSON object. Default: a table.")] = False,
    png: Annotated[Optional[Path], typer.Option(
        "--png", help="Also write the comparison's bar chart here. Default: none.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Train again the points whose folder holds a run of another config "
                        "(the old folders moved aside). Default: such a folder stops the sweep "
                        "with one line naming the differing keys.")] = False,
):
    """Train every combination of the --vary values, each into RUN_DIR/NAME/<key=value,...>,
    one after another (or on every rank under torchrun), then compare them. Run the same
    command again to continue: finished points are skipped, an interrupted one resumes; a
    point whose folder holds another config (other --set values) is refused unless --force.

    Example: capsctl sweep configs/routing-compare.yaml --vary model.routing=dynamic,uniform,
    self-attention,inverted-dot-product --set train.max_steps=300
    """
    from capsctl import compare as compare_mod, device as device_mod, distributed
    from capsctl import sweep as sweep_mod
    from capsctl.training import Interrupted

    folder = _check_name(name or config.stem)
    points = sweep_mod.grid(config, sweep_mod.parse_vary(vary), set_)
    group, device = join_group(device)
    dev = device_mod.resolve(device or points[0].cfg.train.device)
    say = (lambda msg: err.print(f"[bold]sweep[/] {escape(msg)}", highlight=False))
    try:
        folders = sweep_mod.run_sweep(points, run_dir / folder, dev,
                                      data_root=data_root_text(data_root), console=err,
                                      show_progress=not no_progress, group=group, say=say,
                                      force=force)
    except Interrupted as e:
        err.print(f"[yellow]{escape(str(e).split('; Resume')[0])}; run the same sweep command "
                  "again to continue[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    finally:
        distributed.shutdown()
    if not group.is_main:
        return
    show_comparison(compare_mod.compare(folders), as_json, png, f"capsctl sweep {run_dir / folder}")


def _check_name(name: str) -> str:
    """``name`` when it is a plain folder name, else a one-line CapsctlError."""
    if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise CapsctlError(f"--name {name!r}: a folder name, not a path")
    return name


def register(app: typer.Typer) -> None:
    """Add the sweep command to ``app``."""
    app.command()(sweep)
