"""A first run without noise (issue 22): the quickstart's defaults warn about nothing, check's
container-runtime line names the real cause and its fix, and the demo's narration is not broken
up by the service's log lines (they go to the demo's log folder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from biomero_importer.omero import warn_short_ttl
from biomero_importer.settings import Settings, load_settings
from tests.cli.conftest import CliSetup, invoke
from tests.cli.test_quickstart import QUICKSTART, _cli, _quickstart
from tests.podman_support import CONTAINERS_CONF, podman


def _ttl_warnings(settings: Settings) -> list[dict[str, object]]:
    with structlog.testing.capture_logs() as logs:
        warn_short_ttl(settings)
    return [e for e in logs if e["event"] == "omero_session_ttl_raised"]


@pytest.mark.unit
def test_the_default_session_ttl_follows_import_timeout_without_a_warning() -> None:
    """6 h ttl_for_user_conn is shorter than the 6 h import_timeout plus 600 s: a default that
    the admin never chose is not worth a warning at every start; sessions simply live longer."""
    assert _ttl_warnings(load_settings(QUICKSTART, environ={}).settings) == []
    assert _ttl_warnings(Settings(import_timeout=24 * 3600.0)) == []


@pytest.mark.unit
def test_a_session_ttl_the_admin_set_too_short_still_warns() -> None:
    for settings in (
        Settings(ttl_for_user_conn=60_000),
        load_settings(QUICKSTART, environ={"BIOMERO_IMPORTER_TTL_FOR_USER_CONN": "60000"}).settings,
    ):
        (warning,) = _ttl_warnings(settings)
        assert warning["configured_ms"] == 60_000


def test_check_on_the_fresh_quickstart_logs_no_warning(tmp_path: Path) -> None:
    home, env = _quickstart(tmp_path)
    checked = _cli(home, env, "check", "--json", "--config", "config/quickstart.yml")
    assert json.loads(checked.stdout), checked.stderr
    # One-shot commands log warnings (and worse) to stderr. The one the quickstart asks for is
    # the notice that OMERO is simulated (config/quickstart.yml: "says so loudly").
    events = [json.loads(line)["event"] for line in checked.stderr.splitlines() if line.strip()]
    assert set(events) <= {"omero_simulated"}, checked.stderr


@pytest.mark.podman
def test_check_names_the_rlimit_cause_and_the_containers_conf_fix(
    cli_setup: CliSetup, podman_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On this machine runc may not set podman's default ulimits: the runtime line says so and
    points at the containers.conf that ``./dev test`` uses, not at 'podman info'."""
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    bare = podman("run", "--rm", "--pull=never", "--entrypoint", "true", podman_image)
    if bare.returncode == 0 or "rlimit" not in bare.stderr.lower():
        pytest.skip("podman's defaults can run a container here: nothing to diagnose")
    result = invoke("check", "--json", "--config", cli_setup.config)
    (line,) = [x for x in json.loads(result.stdout) if str(x["check"]).startswith("container")]
    assert line["ok"] is False
    assert "rlimit" in str(line["detail"]), line
    hint = str(line["hint"])
    assert "info' must work" not in hint
    assert "default_ulimits = []" in hint and "CONTAINERS_CONF" in hint, hint
    assert str(CONTAINERS_CONF) in hint, hint

    # and with that file, the same check passes
    monkeypatch.setenv("CONTAINERS_CONF", str(CONTAINERS_CONF))
    result = invoke("check", "--json", "--config", cli_setup.config)
    (line,) = [x for x in json.loads(result.stdout) if str(x["check"]).startswith("container")]
    assert line["ok"] is True, line


def test_the_demo_narrates_without_log_lines_and_keeps_them_in_its_log_folder(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "biomero_importer", "demo", "--dir", str(folder)],
        # one stream, as a terminal shows them
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, done.stdout
    logged = [line for line in done.stdout.splitlines() if line.lstrip().startswith("{")]
    assert logged == [], done.stdout
    assert "order_failed" not in done.stdout
    service_log = folder / "logs" / "importer.log"
    assert f"service log:            {service_log}" in done.stdout
    events = [json.loads(line) for line in service_log.read_text().splitlines()]
    # the failing order's warning is there, with its order
    failed = [e for e in events if e["event"] == "order_failed"]
    assert failed and failed[0]["order_uuid"] and failed[0]["level"] == "warning"
