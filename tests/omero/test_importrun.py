"""``omero import`` repeated after transient Ice errors, each attempt with its own log files
(issue 13): a real process per attempt, scripted to fail as the Java importer does."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.omero.importcli import (
    SERVER_UNREACHABLE,
    LogPaths,
    retryable_import_error,
)
from biomero_importer.omero.importrun import ImportRun, RunOnce, run_import
from biomero_importer.omero.port import ImportAborted

from .conftest import make_settings

UUID = "0b7c3f5e-1111-4222-8333-444455556666"
SUMMARY = "==> Summary\n1 file uploaded, 1 fileset, 0 plates created, 1 image imported, {} errors\n"
# One line per attempt: what the fake importer does on that attempt.
FAKE_IMPORTER = """
import sys
from pathlib import Path

stdout, errs, script = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
counter = script.with_suffix(".count")
attempt = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(attempt))
step = script.read_text().splitlines()[attempt - 1]
if step == "ice":
    errs.write_text("ERROR omero.cmd: Ice.ObjectNotExistException\\n" + SUMMARY.format(1))
    sys.exit(2)
if step == "refused":
    errs.write_text("ERROR omero.cmd: Ice.ConnectionRefusedException\\n" + SUMMARY.format(1))
    sys.exit(2)
if step == "silent":
    sys.exit(1)
if step == "broken":
    errs.write_text("ERROR Bio-Formats: unsupported file\\n" + SUMMARY.format(1))
    sys.exit(0)
stdout.write_text("- Fileset: 5\\n  Image: [7]\\n")
errs.write_text(SUMMARY.format(0))
"""


def _runner(tmp_path: Path, steps: list[str]) -> tuple[list[LogPaths], RunOnce]:
    script = tmp_path / "steps.txt"
    script.write_text("\n".join(steps) + "\n")
    program = tmp_path / "fake_import.py"
    program.write_text(f"SUMMARY = {SUMMARY!r}\n{FAKE_IMPORTER}")
    calls: list[LogPaths] = []

    def run_once(logs: LogPaths) -> tuple[int, str, str]:
        calls.append(logs)
        done = subprocess.run(
            [sys.executable, str(program), str(logs.stdout), str(logs.stderr), str(script)],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.returncode, done.stdout, done.stderr

    return calls, run_once


def _run(tmp_path: Path, steps: list[str], **overrides: Any) -> tuple[ImportRun, list[LogPaths]]:
    settings = make_settings(
        tmp_path, order_log_dir=tmp_path / "logs", import_retry_delay=0.01, **overrides
    )
    calls, run_once = _runner(tmp_path, steps)
    waits: list[float] = []

    def aborted(seconds: float) -> bool:
        waits.append(seconds)
        return False

    result = run_import(settings, run_once, order_uuid=UUID, index=2, name="a.tif", aborted=aborted)
    assert waits == [0.01 * n for n in range(1, len(calls))]
    return result, calls


def test_a_transient_ice_error_is_retried_with_a_log_pair_per_attempt(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, ["ice", "silent", "ok"])
    assert result.verdict.ok and result.verdict.images == [7]
    logs = tmp_path / "logs"
    assert [c.stderr for c in calls] == [
        logs / f"cli.{UUID}_2.errs",
        logs / f"cli.{UUID}_2_attempt2.errs",
        logs / f"cli.{UUID}_2_attempt3.errs",
    ]
    # the failed attempt's evidence is kept, and only the owner may read it
    assert "Ice.ObjectNotExistException" in calls[0].stderr.read_text()
    assert all(c.stderr.stat().st_mode & 0o777 == 0o600 for c in calls)


def test_attempts_are_bounded(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, ["ice", "ice", "ice", "ok"], import_retry_attempts=3)
    assert len(calls) == 3
    assert not result.verdict.ok
    assert "Ice.ObjectNotExistException" in result.verdict.reason


def test_an_unreachable_server_after_the_last_attempt_is_named(tmp_path: Path) -> None:
    """Issue 15: the cause tells blitz the server is down (OmeroUnavailable: the order waits
    and retries) rather than that the import failed."""
    result, calls = _run(tmp_path, ["refused", "refused", "ok"], import_retry_attempts=2)
    assert len(calls) == 2 and not result.verdict.ok
    assert result.cause == "Ice.ConnectionRefusedException"
    assert result.cause in SERVER_UNREACHABLE
    for name in ("race", "broken", "ok"):
        (tmp_path / name).mkdir()
    # a session race is retried too, but it is no sign of a server that is down
    raced, _ = _run(tmp_path / "race", ["ice"], import_retry_attempts=1)
    assert raced.cause == "Ice.ObjectNotExistException"
    assert raced.cause not in SERVER_UNREACHABLE
    broken, _ = _run(tmp_path / "broken", ["broken"])
    assert broken.cause is None
    done, _ = _run(tmp_path / "ok", ["refused", "ok"])
    assert done.verdict.ok and done.cause is None


def test_other_failures_are_not_retried(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, ["broken", "ok"])
    assert len(calls) == 1
    assert "Bio-Formats" in result.verdict.reason


def test_an_abort_between_attempts_stops_the_retries(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, order_log_dir=tmp_path / "logs", import_retry_delay=30)
    calls, run_once = _runner(tmp_path, ["ice", "ok"])
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(ImportAborted):
        run_import(settings, run_once, order_uuid=UUID, index=0, name="a.tif", aborted=stop.wait)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("code", "errs", "stderr", "expected"),
    [
        (1, "x Ice.ConnectionLostException y", "", "Ice.ConnectionLostException"),
        (1, "", "Ice.TimeoutException", "Ice.TimeoutException"),
        (1, "... INTERNAL_EXCEPTION ...", "", "INTERNAL_EXCEPTION"),
        (1, "", "", "no .errs output"),
        (1, "ERROR: unsupported format", "", None),
        (103, "", "", None),
        (-9, "", "", None),
    ],
)
def test_which_failures_are_transient(
    code: int, errs: str, stderr: str, expected: str | None
) -> None:
    assert retryable_import_error(code, errs, stderr) == expected
