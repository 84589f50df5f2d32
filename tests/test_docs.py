"""The README tells the truth: every config key and every command is documented."""

from __future__ import annotations

from capsctl import config
from capsctl.cli import app
from conftest import REPO

README = (REPO / "README.md").read_text()


START, END = "<!-- config-reference:start (make readme) -->", "<!-- config-reference:end -->"


def test_every_config_key_is_in_the_readme():
    """Every key of every table (each family, its loss, each dataset, optim, train)."""
    missing = [(title, k) for title, rows in config.reference() for k, _, _ in rows
               if f"`{k}`" not in README]
    assert not missing, f"run `make readme`; undocumented keys: {missing}"
    missing = [title for title, _ in config.reference() if f"#### {title}" not in README]
    assert not missing, f"run `make readme`; tables missing: {missing}"


def test_readme_reference_is_the_generated_one():
    """The section between the markers is exactly what `make readme` writes (defaults and help
    text included), so a changed default or help line shows up here."""
    section = README[README.index(START) + len(START):README.index(END)]
    assert section.strip() == config.reference_markdown().strip(), "run `make readme`"


def test_every_command_is_in_the_readme():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    names += [g.name for g in app.registered_groups]
    assert names
    missing = [n for n in names if f"capsctl {n}" not in README]
    assert not missing, f"commands missing from the README: {missing}"


def test_readme_shows_the_two_setup_commands():
    assert "make demo" in README and "make test" in README
