"""The documentation tells the truth: the README is a front door that names every command and
links every docs page, and docs/config.md holds the generated reference of every config key."""

from __future__ import annotations

import re

from capsctl import config
from capsctl.cli import app
from conftest import REPO

README = (REPO / "README.md").read_text()
CONFIG_PAGE = (REPO / "docs" / "config.md").read_text()
DOCS = sorted(p for p in (REPO / "docs").glob("*.md"))

START, END = "<!-- config-reference:start (make docs) -->", "<!-- config-reference:end -->"
MAX_README_LINES = 250


def test_every_config_key_is_in_the_config_page():
    """Every key of every table (each family, its loss, each dataset, optim, train)."""
    missing = [(title, k) for title, rows in config.reference() for k, _, _ in rows
               if f"`{k}`" not in CONFIG_PAGE]
    assert not missing, f"run `make docs`; undocumented keys: {missing}"
    missing = [title for title, _ in config.reference() if f"#### {title}" not in CONFIG_PAGE]
    assert not missing, f"run `make docs`; tables missing: {missing}"


def test_config_reference_is_the_generated_one():
    """The section between the markers of docs/config.md is exactly what `make docs` writes
    (defaults and help text included), so a changed default or help line shows up here."""
    section = CONFIG_PAGE[CONFIG_PAGE.index(START) + len(START):CONFIG_PAGE.index(END)]
    assert section.strip() == config.reference_markdown().strip(), "run `make docs`"


def test_every_command_is_in_the_readme():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    names += [g.name for g in app.registered_groups]
    assert names
    missing = [n for n in names if f"capsctl {n}" not in README]
    assert not missing, f"commands missing from the README's table: {missing}"


def test_readme_shows_the_two_setup_commands():
    assert "make demo" in README and "make test" in README


def test_readme_is_a_front_door():
    """Short enough to read at the door; the reference and the measurements live in docs/."""
    n = len(README.splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"
    assert START not in README and "#### model:" not in README, "the config reference is in docs/config.md"


def test_every_docs_page_is_linked_from_the_readme():
    assert DOCS
    missing = [p.name for p in DOCS if f"(docs/{p.name})" not in README]
    assert not missing, f"docs pages the README's Documentation section does not link: {missing}"


def _anchors(text: str) -> set[str]:
    """The anchors a Markdown renderer gives the headings: lower case, punctuation dropped,
    spaces to hyphens (backticks and parentheses go, hyphens stay)."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_relative_links_point_at_files_and_headings_that_exist():
    """Links between the README and the docs pages name files that exist, and headings in them."""
    broken = []
    for page in [REPO / "README.md", *DOCS]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path) if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{page.relative_to(REPO)} -> {target} (no such heading)")
    assert not broken, f"broken links: {broken}"
