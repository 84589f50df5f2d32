"""The README tells the truth: every config key and every command is documented."""

from __future__ import annotations

from capsctl import config
from capsctl.cli import app
from conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_config_key_is_in_the_readme():
    missing = [k for k in config.all_keys() if f"`{k}`" not in README]
    assert not missing, f"run `make readme`; undocumented keys: {missing}"


def test_every_command_is_in_the_readme():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    names += [g.name for g in app.registered_groups]
    assert names
    missing = [n for n in names if f"capsctl {n}" not in README]
    assert not missing, f"commands missing from the README: {missing}"


def test_readme_shows_the_two_setup_commands():
    assert "make demo" in README and "make test" in README
