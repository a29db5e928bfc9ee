"""Every command explains itself and takes --config after its name."""

from __future__ import annotations

import pytest

from tests.cli.conftest import invoke

COMMANDS = ["run", "migrate", "submit", "plan", "status", "show", "retry", "cancel", "check"]
READS = ["plan", "status", "show", "check"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    assert "--config" in result.stdout
    if command in READS:
        assert "--json" in result.stdout


def test_top_level_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_bad_config_is_a_usage_error() -> None:
    result = invoke("status", "--config", "/nonexistent/settings.yml")
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
