"""What every command module shares: the consoles, the error wrapper, the common options and the
one-line form of option-parsing errors. Torch-free: importing it costs no tensor library."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from capsctl.errors import CapsctlError

try:  # typer >= 0.22 ships its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import UsageError

    try:
        from click.exceptions import NoArgsIsHelpError
    except ImportError:  # click < 8.2 prints the help and exits 0 instead
        class NoArgsIsHelpError(Exception):  # never raised
            pass

out = Console()
err = Console(stderr=True)

DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N. Default: train.device from the config (auto).")]
SetOpt = Annotated[list[str], typer.Option(
    "--set", help="Override a config key, repeatable: --set train.epochs=3 (values are YAML "
                  "1.2: 010 is 10, 1:30 a string; each key once). Default: none.")]
DataRootOpt = Annotated[Optional[Path], typer.Option(
    "--data-root", help="Folder with the MNIST IDX files. Default: data.root, then "
                        "$CAPSCTL_DATA, then ~/.cache/capsctl.")]


def print_table(table: Any) -> None:
    """Print a rich table on stdout. On a terminal it fits the window; into a file or a pipe
    (a log, ``| less``) it is printed at its natural width, so that no column is cut to '…' by
    the 80 columns rich assumes when there is no terminal to measure."""
    if out.is_terminal:
        out.print(table)
        return
    natural = out.measure(table, options=out.options.update(width=1000)).maximum
    Console(width=max(out.width, natural)).print(table)


def show_comparison(rows: list, as_json: bool, png: Path | None,
                    title: str = "capsctl compare") -> None:
    """Print the comparison of ``rows`` (compare.RunRow) as a table or one JSON object, and
    write its bar chart to ``png`` when given (also the end of ``capsctl sweep``)."""
    from capsctl import compare as compare_mod

    if png is not None:
        compare_mod.write_chart(rows, png)
    if as_json:
        json_line(compare_mod.as_json(rows))
    else:
        print_table(compare_mod.compare_table(rows, title))
    if png is not None:
        err.print(f"bar chart: {escape(str(png))}", highlight=False)


def debug() -> bool:
    """True when CAPSCTL_DEBUG asks for tracebacks instead of one-line errors."""
    return os.environ.get("CAPSCTL_DEBUG", "") not in ("", "0")


def error_line(message: str) -> None:
    """Print ``error: message`` as one line on stderr (never wrapped, markup escaped)."""
    err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warning_line(message: str) -> None:
    """Print ``warning: message`` as one line on stderr (never wrapped, markup escaped)."""
    err.print(f"[yellow]warning:[/] {escape(' '.join(str(message).split()))}",
              highlight=False, soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` during a command: ``warning: MESSAGE``, one line, instead of
    Python's two lines with the category, the source file and its line of code."""
    text = str(message)
    warning_line(text[len("capsctl: "):] if text.startswith("capsctl: ") else text)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within the block every Python warning (capsctl's and its libraries') is one line on
    stderr, ``warning: ...`` (CAPSCTL_DEBUG=1 keeps Python's own format)."""
    if debug():
        yield
        return
    saved, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        yield
    finally:
        warnings.showwarning = saved


def cli_errors(fn):
    """Wrap a command: user errors become one line and their exit code (2; 1 for the
    environment), Ctrl-C exit 130, warnings one line each. Returns the wrapped function (same
    signature)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with one_line_warnings():
                return fn(*args, **kwargs)
        except CapsctlError as e:
            if debug():
                raise
            error_line(str(e))
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # disk full, permissions: the environment, not the input
            if debug():
                raise
            where = f" {e.filename}" if e.filename else ""
            error_line(f"cannot access{where}: {e.strerror or e}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


@contextlib.contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """Turn click's usage errors (bad option value, unknown option, missing argument) into
    ``error: MESSAGE; see 'capsctl COMMAND --help'`` on stderr and exit code 2."""
    try:
        yield
    except NoArgsIsHelpError:
        raise  # the help text itself, printed by typer
    except UsageError as e:
        if debug():
            raise
        message = " ".join(e.format_message().split()).rstrip(".")
        hint = f"; see '{e.ctx.command_path} --help'" if e.ctx is not None else ""
        error_line(message + hint)
        raise typer.Exit(2) from None


class CapsctlGroup(TyperGroup):
    """The root command group: usage errors anywhere below it are one line, exit 2."""

    def make_context(self, info_name, args, parent=None, **extra):
        with one_line_usage_errors():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with one_line_usage_errors():
            return super().invoke(ctx)


def _finite(value: Any) -> Any:
    """``value`` with every NaN/inf float (inside dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_line(payload: Any) -> None:
    """Write ``payload`` as one line of strict JSON on stdout (non-finite numbers as null)."""
    sys.stdout.write(json.dumps(_finite(payload), allow_nan=False) + "\n")


def join_group(device: str | None):
    """Under torchrun: join the process group; ranks other than 0 print nothing. Returns
    (group, device name to use). Imports torch."""
    from capsctl import distributed

    group, device_name = distributed.init(device or "auto")
    if not group.is_main and not debug():
        out.quiet = err.quiet = True
    return group, (device_name if group.enabled else device)


def data_root_text(data_root: Optional[Path]) -> Optional[str]:
    """The --data-root value as the library functions take it (None when not given)."""
    return str(data_root) if data_root else None
