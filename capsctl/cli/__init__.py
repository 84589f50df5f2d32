"""The capsctl command line. The root app imports each command module and calls its
``register(app)``; no command module imports this root (what they share is in
capsctl.cli.options). Each command parses its options, calls one library function and prints a
rich summary. Bad input is one line on stderr and exit code 2 (CAPSCTL_DEBUG=1 shows the
traceback). Nothing here imports torch: the commands import it when they run."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from capsctl import __version__
from capsctl.cli import attack, bench, compare, config, data, eval, export, inspection, \
    plot, predict, pretrained, sweep, train
from capsctl.cli.options import CapsctlGroup, debug, error_line, out
from capsctl.errors import CapsctlError

app = typer.Typer(name="capsctl", cls=CapsctlGroup, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode="rich",
                  help="Train, evaluate and inspect Capsule Networks (Sabour, Frosst & Hinton "
                       "2017) from YAML experiments.")


def _version(value: bool):
    if value:
        out.print(f"capsctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None):
    from capsctl.device import tune_allocator  # torch-free at import

    tune_allocator()


for _module in (train, eval, predict, attack, export, config, bench, inspection, compare, plot,
                sweep, pretrained, data):  # the order of `capsctl --help`
    _module.register(app)


def main() -> None:
    """The console entry point (`capsctl`, `python -m capsctl`)."""
    try:
        app()
    except CapsctlError as e:  # raised outside a command (should not happen, but never trace)
        if debug():
            raise
        error_line(str(e))
        sys.exit(e.exit_code)
