"""The CLI is layered one way and its text-only commands stay light.

- The root (capsctl/cli/__init__.py) imports the command modules; no command module imports the
  root (what they share lives in capsctl.cli.options).
- Every `--help`, `capsctl config` and `capsctl config --reference` run without importing torch
  (checked in a fresh interpreter per command) and peak under 200 MB resident (measured on the
  real `python -m capsctl` process with wait4).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

CLI_DIR = REPO / "capsctl" / "cli"
LIMIT_MB = 200
CONFIG = str(REPO / "configs" / "mnist.yaml")

def _every_command() -> list[list[str]]:
    """Every command the CLI has (read from the app, so a new one is checked too), and the
    data subcommands."""
    from capsctl.cli import app

    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    return [[]] + [[n] for n in names] + [["data"], ["data", "affnist-synth"],
                                           ["data", "affnist-download"]]


# every command the CLI has, as the argv of its --help
HELP = _every_command()
assert ["predict"] in HELP and ["routes"] in HELP
TEXT_COMMANDS = [[*c, "--help"] for c in HELP] + [["config"], ["config", CONFIG],
                                                   ["config", "--reference"]]
MEASURED = [["--help"], ["train", "--help"], ["config", CONFIG], ["config", "--reference"]]


def _imported_modules(path) -> set[str]:
    """Every capsctl module ``path`` imports (at any level); `from capsctl.cli import Y` counts
    as capsctl.cli and capsctl.cli.Y (Y may be a module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module in ("capsctl", "capsctl.cli"):
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("capsctl")}


@pytest.mark.parametrize("module", sorted(p.name for p in CLI_DIR.glob("*.py")
                                          if p.name != "__init__.py"))
def test_no_command_module_imports_the_root_or_another_command(module):
    imported = _imported_modules(CLI_DIR / module)
    from_cli = {n for n in imported if n in ("capsctl.cli", "capsctl.cli.__init__")
                or n.startswith("capsctl.cli.")}
    assert from_cli <= {"capsctl.cli.options"}, f"{module} imports {sorted(from_cli)}"


def test_the_root_registers_the_command_modules():
    imported = _imported_modules(CLI_DIR / "__init__.py")
    for name in ("train", "eval", "config", "bench", "inspection", "data"):
        assert f"capsctl.cli.{name}" in imported


def _no_torch_script(argv: list[str]) -> str:
    return ("import json, sys\n"
            "from typer.testing import CliRunner\n"
            "from capsctl.cli import app\n"
            f"r = CliRunner().invoke(app, {argv!r})\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'scipy', 'PIL', 'tensorboard')\n"
            "               if m in sys.modules)\n"
            "print(json.dumps({'exit': r.exit_code, 'heavy': heavy,\n"
            "                  'output': r.output[-2000:]}))\n")


@pytest.mark.parametrize("argv", TEXT_COMMANDS, ids=[" ".join(a[:3]).replace(str(REPO), "")
                                                      for a in TEXT_COMMANDS])
def test_text_commands_do_not_import_torch(argv):
    r = subprocess.run([sys.executable, "-c", _no_torch_script(argv)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["exit"] == 0, result["output"]
    assert "torch" not in result["heavy"], f"capsctl {' '.join(argv)} imported {result['heavy']}"


# Started from a small launcher, not from pytest: a child forked from this (torch-holding)
# process would inherit its resident-set high-water mark across exec.
LAUNCHER = """\
import json, os, subprocess, sys
p = subprocess.Popen([sys.executable, "-m", "capsctl", *sys.argv[1:]],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = p.stderr.read()
_, status, usage = os.wait4(p.pid, 0)
p.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
print(json.dumps([usage.ru_maxrss, p.returncode, err.decode(errors="replace")]))
"""


def peak_rss_mb(argv: list[str]) -> tuple[float, int, str]:
    """(peak resident MB, exit code, stderr) of a real `python -m capsctl ARGV` process."""
    r = subprocess.run([sys.executable, "-c", LAUNCHER, *argv], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, COLUMNS="100"))
    assert r.returncode == 0, r.stderr
    kib, code, err = json.loads(r.stdout)
    return kib / 1024, code, err


@pytest.mark.parametrize("argv", MEASURED, ids=[" ".join(a).replace(str(REPO) + "/", "")
                                                for a in MEASURED])
def test_text_commands_peak_under_200_mb(argv):
    mb, code, err = peak_rss_mb(argv)
    assert code == 0, err
    assert mb < LIMIT_MB, f"capsctl {' '.join(argv)} peaked at {mb:.0f} MB"
