"""The README and the docs/ pages stay true to the code: every setting documented (in
docs/configuration.md), the two quickstart commands, only commands the CLI really has, links
that resolve, and a README short enough to read to the end (the rest is linked from it)."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest
import typer.main

from biomero_importer.cli.app import app
from biomero_importer.settings import ENV_PREFIX, LEGACY_ENV, Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = ROOT / "docs"
MIGRATION_GUIDE = DOCS / "migrating-from-biomero-importer.md"
CONFIGURATION = (DOCS / "configuration.md").read_text(encoding="utf-8")
# What a newcomer reads to the end; everything else is a page under docs/, linked from it.
README_SECTIONS = ["Quickstart", "A 5-minute tour", "Deployment", "Documentation"]
# Commands the README documents that another change is adding at the same time. While one
# is not registered yet, the command test skips instead of failing; remove a name here once
# the command exists, so the test checks it like every other.
IN_PROGRESS: set[str] = set()

_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_INLINE = re.compile(r"`([^`\n]+)`")
_COMMAND = re.compile(r"[a-z][a-z0-9-]*")


def _section(title: str, text: str = README, where: str = "README") -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{where} has no '## {title}' section"
    return match.group(1)


def _pages() -> dict[Path, str]:
    """README and every docs/ page: path -> text."""
    pages = {ROOT / "README.md": README}
    pages.update({page: page.read_text(encoding="utf-8") for page in sorted(DOCS.glob("*.md"))})
    return pages


def _reference() -> str:
    return _section("Configuration reference", CONFIGURATION, "docs/configuration.md")


def _reference_rows() -> dict[str, str]:
    """Configuration reference table (docs/configuration.md): key -> the rest of its row."""
    rows = {}
    for line in _reference().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = line
    return rows


def _code(text: str) -> list[str]:
    """Every line of code in ``text``: fenced blocks and inline spans."""
    blocks = [line for block in _FENCE.findall(text) for line in block.splitlines()]
    prose = _FENCE.sub("", text)
    return blocks + _INLINE.findall(prose)


def readme_commands(text: str = README) -> set[str]:
    """Words that follow ``biomero-importer`` in code (the service name alone is skipped)."""
    found = set()
    for line in _code(text):
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            tokens = line.split()
        for here, after in itertools.pairwise(tokens):
            if here == "biomero-importer" and after != here and _COMMAND.fullmatch(after):
                found.add(after)
    return found


def cli_commands() -> set[str]:
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_every_setting_is_in_the_reference() -> None:
    rows = _reference_rows()
    assert set(Settings.model_fields) <= set(rows), set(Settings.model_fields) - set(rows)
    assert set(rows) <= set(Settings.model_fields), set(rows) - set(Settings.model_fields)


@pytest.mark.parametrize("key", sorted(Settings.model_fields))
def test_reference_row_names_the_environment_variables(key: str) -> None:
    row = _reference_rows()[key]
    assert f"`{ENV_PREFIX}{key.upper()}`" in row
    for env_name, target in LEGACY_ENV.items():
        if target == key:
            assert f"`{env_name}`" in row, f"{env_name} missing from the row of {key}"


def test_every_legacy_environment_name_is_documented() -> None:
    section = _reference()
    for env_name in LEGACY_ENV:
        assert f"`{env_name}`" in section


def test_quickstart_has_exactly_the_two_dev_commands() -> None:
    blocks = _FENCE.findall(_section("Quickstart"))
    assert len(blocks) == 1
    commands = [line.strip() for line in blocks[0].splitlines() if line.strip()]
    assert commands == ["./dev start", "./dev test"]
    dev = (ROOT / "dev").read_text(encoding="utf-8")
    for command in commands:
        subcommand = command.split()[1]
        assert re.search(rf"^\s*{subcommand}\)", dev, re.M), f"dev has no '{subcommand}'"


def test_readme_mentions_commands_that_exist() -> None:
    assert {"run", "migrate", "submit", "status", "show", "retry", "cancel", "check", "demo"} <= (
        readme_commands()
    )
    mentioned = set().union(*(readme_commands(text) for text in _pages().values()))
    missing = mentioned - cli_commands()
    unexpected = missing - IN_PROGRESS
    assert not unexpected, f"README mentions commands the CLI lacks: {sorted(unexpected)}"
    if missing:
        pytest.skip(f"documented, not registered yet: {sorted(missing)}")


def test_readme_and_docs_links_resolve() -> None:
    for page, text in _pages().items():
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    assert MIGRATION_GUIDE.exists()
    assert "docs/migrating-from-biomero-importer.md" in README


def test_readme_is_the_short_way_in_and_links_every_page() -> None:
    sections = re.findall(r"^## (.+)$", README, re.M)
    assert sections == README_SECTIONS
    links = _section("Documentation")
    for page in sorted(DOCS.glob("*.md")):
        assert f"(docs/{page.name})" in links, f"README's Documentation does not link {page.name}"


def test_readme_references_the_deployment_files() -> None:
    assert "(Dockerfile)" in README
    assert "(deploy/compose.yml)" in README
