"""capsctl config: the resolved configuration as YAML, or the key reference. Torch-free."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from capsctl.cli.options import SetOpt, cli_errors


@cli_errors
def config(
    path: Annotated[Optional[Path], typer.Argument(
        help="YAML file to resolve. Default: none (the built-in defaults).")] = None,
    set_: SetOpt = [],
    reference: Annotated[bool, typer.Option(
        "--reference", help="Print every key with its default and meaning: a Markdown table per "
                          "model family, loss, dataset, optim and train.")]
    = False,
):
    """Print the resolved configuration (defaults < YAML < --set), or the key reference.

    Example: capsctl config configs/mnist.yaml --set train.epochs=2
    """
    from capsctl import config as config_mod

    if reference:
        sys.stdout.write(config_mod.reference_markdown().rstrip("\n") + "\n")
        return
    sys.stdout.write(config_mod.dump(config_mod.load(path, set_)))


def register(app: typer.Typer) -> None:
    """Add the config command to ``app``."""
    app.command()(config)
