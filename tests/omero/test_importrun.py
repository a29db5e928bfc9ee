"""``omero import`` repeated after transient failures, each attempt with its own log files
(issue 13), and the CLI's login failures (issue 19): a real process per attempt, a stand-in
``omero`` that prints what omero-py and the Java importer print (``omero_output``)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.model import ImportedObject
from biomero_importer.omero.importcli import (
    SERVER_UNREACHABLE,
    LogPaths,
    retryable_import_error,
)
from biomero_importer.omero.importrun import (
    SESSION_SERVER_UNREACHABLE,
    ImportRun,
    ImportTimedOut,
    RunOnce,
    SessionState,
    missing_files,
    run_import,
    settle_timeout,
)
from biomero_importer.omero.port import ImportAborted

from . import omero_output as out
from .conftest import make_settings

UUID = "0b7c3f5e-1111-4222-8333-444455556666"
OK = out.imported([{"Image": [7]}], first_fileset=5)


def _runner(tmp_path: Path, runs: list[out.Run]) -> tuple[list[LogPaths], RunOnce, Path]:
    program = tmp_path / "omero.py"
    program.write_text(out.fake_omero_script(runs))
    calls: list[LogPaths] = []

    def run_once(logs: LogPaths) -> tuple[int, str, str]:
        calls.append(logs)
        argv = [sys.executable, str(program), "import", "-s", "omero.example", "-p", "4064"]
        argv += ["--file", str(logs.stdout), "--errs", str(logs.stderr), "/data/a.tif"]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return done.returncode, done.stdout, done.stderr

    return calls, run_once, program


def _run(
    tmp_path: Path, runs: list[out.Run], rejoin: Any = None, **overrides: Any
) -> tuple[ImportRun, list[LogPaths]]:
    settings = make_settings(
        tmp_path, order_log_dir=tmp_path / "logs", import_retry_delay=0.01, **overrides
    )
    calls, run_once, _ = _runner(tmp_path, runs)
    waits: list[float] = []

    def aborted(seconds: float) -> bool:
        waits.append(seconds)
        return False

    result = run_import(
        settings, run_once, order_uuid=UUID, index=2, name="a.tif", aborted=aborted, rejoin=rejoin
    )
    assert all(wait > 0 for wait in waits)
    return result, calls


def test_a_transient_ice_error_is_retried_with_a_log_pair_per_attempt(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, [out.ice_failure("Ice.ObjectNotExistException"), out.Run(1), OK])
    assert result.verdict.ok, result.verdict.reason
    assert result.verdict.images == [7]
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
    ice = out.ice_failure("Ice.ObjectNotExistException")
    result, calls = _run(tmp_path, [ice, ice, ice, OK], import_retry_attempts=3)
    assert len(calls) == 3
    assert not result.verdict.ok
    assert result.verdict.reason.startswith("OMERO import of a.tif failed (exit 2): ")
    assert result.cause == "Ice.ObjectNotExistException"


def test_an_unreachable_server_after_the_last_attempt_is_named(tmp_path: Path) -> None:
    """Issue 15: the cause tells blitz the server is down (OmeroUnavailable: the order waits
    and retries) rather than that the import failed."""
    refused = out.ice_failure("Ice.ConnectionRefusedException")
    result, calls = _run(tmp_path, [refused, refused, OK], import_retry_attempts=2)
    assert len(calls) == 2 and not result.verdict.ok
    assert result.cause == "Ice.ConnectionRefusedException"
    assert result.cause in SERVER_UNREACHABLE
    for name in ("race", "broken", "ok"):
        (tmp_path / name).mkdir()
    # a session race is retried too, but it is no sign of a server that is down
    raced, _ = _run(
        tmp_path / "race", [out.ice_failure("Ice.ObjectNotExistException")], import_retry_attempts=1
    )
    assert raced.cause == "Ice.ObjectNotExistException"
    assert raced.cause not in SERVER_UNREACHABLE
    broken, _ = _run(tmp_path / "broken", [out.no_imports_due_to_errors("/data/a.tif")])
    assert broken.cause is None
    done, _ = _run(tmp_path / "ok", [refused, OK])
    assert done.verdict.ok and done.cause is None


def test_other_failures_are_not_retried(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, [out.no_imports_due_to_errors("/data/a.tif"), OK])
    assert len(calls) == 1
    assert "FILE_EXCEPTION: /data/a.tif" in result.verdict.reason


def test_an_abort_between_attempts_stops_the_retries(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, order_log_dir=tmp_path / "logs", import_retry_delay=30)
    calls, run_once, _ = _runner(tmp_path, [out.ice_failure("Ice.ObjectNotExistException"), OK])
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(ImportAborted):
        run_import(settings, run_once, order_uuid=UUID, index=0, name="a.tif", aborted=stop.wait)
    assert len(calls) == 1


# --- login failures of the CLI wrapper (omero-py sessions.py login()) ------------------------

NOT_JOINED = out.session_not_joined("alice", "omero.example", 4064)


def test_a_dead_session_is_renewed_and_the_import_runs_again(tmp_path: Path) -> None:
    """Issue 19: "Previous session expired" with exit 564 and no .errs file. Before, it was
    taken as "no .errs output" and retried with the same dead key until the attempts ran out.
    Now the backend renews the session and the import runs again, joining the new one."""
    asked: list[str] = []

    def rejoin() -> SessionState:
        asked.append("rejoin")
        return SessionState.RENEWED

    result, calls = _run(tmp_path, [NOT_JOINED, OK], rejoin=rejoin, import_retry_attempts=1)
    assert result.verdict.ok, result.verdict.reason
    assert asked == ["rejoin"] and len(calls) == 2


def test_a_server_that_cannot_be_reached_makes_the_order_wait(tmp_path: Path) -> None:
    result, calls = _run(tmp_path, [NOT_JOINED, OK], rejoin=lambda: SessionState.UNREACHABLE)
    assert len(calls) == 1 and not result.verdict.ok
    assert result.cause == SESSION_SERVER_UNREACHABLE
    assert "could not be reached" in result.verdict.reason


def test_a_session_the_service_still_reaches_fails_the_order_with_the_cli_s_words(
    tmp_path: Path,
) -> None:
    result, calls = _run(tmp_path, [NOT_JOINED, OK], rejoin=lambda: SessionState.ALIVE)
    assert len(calls) == 1 and not result.verdict.ok and result.cause is None
    assert "could not join the order's session" in result.verdict.reason
    assert "Previous session expired for alice on omero.example:4064" in result.verdict.reason
    assert "stdin is not a terminal" in result.verdict.reason


def test_renewals_are_bounded(tmp_path: Path) -> None:
    result, calls = _run(
        tmp_path, [NOT_JOINED], rejoin=lambda: SessionState.RENEWED, import_retry_attempts=2
    )
    assert len(calls) == 3 and not result.verdict.ok
    assert "could not join a fresh session either" in result.verdict.reason


def test_the_stand_in_prints_the_login_failure_on_its_own_streams(tmp_path: Path) -> None:
    """As omero-py: the login fails before the Java importer starts, so nothing reaches the
    --file/--errs logs, and the exit status is 564's low byte."""
    _, calls = _run(tmp_path, [NOT_JOINED, OK], rejoin=lambda: SessionState.ALIVE)
    assert calls[0].stdout.read_text() == "" and calls[0].stderr.read_text() == ""
    argv = json.loads((tmp_path / "omero.argv").read_text().splitlines()[0])
    assert argv[:5] == ["import", "-s", "omero.example", "-p", "4064"]


# --- a killed CLI whose server-side import may still finish ---------------------------------

IMAGE = ImportedObject("Image", 9, "a.tif", "/data/a.tif", 3)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("look", "finished"),
    [(([IMAGE], []), True), (([], [Path("/data/a.tif")]), False), (([IMAGE], [Path("/b")]), False)],
)
def test_after_a_timeout_the_grace_period_decides(
    tmp_path: Path, look: tuple[list[ImportedObject], list[Path]], finished: bool
) -> None:
    """The server's answers are a stub here (no OMERO runs): what the look finds decides."""
    settings = make_settings(tmp_path, import_timeout_grace=7)
    waited: list[float] = []

    def aborted(seconds: float) -> bool:
        waited.append(seconds)
        return False

    timed_out = ImportTimedOut("OMERO import of a.tif timed out after 5 s (import_timeout)")
    if finished:
        made = settle_timeout(settings, timed_out, look=lambda: look, aborted=aborted)
        assert made == [IMAGE]
    else:
        with pytest.raises(ImportTimedOut, match=r"timed out after 5 s .* 7 s later, 1 files"):
            settle_timeout(settings, timed_out, look=lambda: look, aborted=aborted)
    assert waited == [7]


@pytest.mark.unit
def test_an_abort_during_the_grace_period_is_honoured(tmp_path: Path) -> None:
    with pytest.raises(ImportAborted):
        settle_timeout(
            make_settings(tmp_path),
            ImportTimedOut("timed out"),
            look=lambda: ([IMAGE], []),
            aborted=lambda seconds: True,
        )


@pytest.mark.unit
def test_missing_files_are_those_no_fileset_holds(tmp_path: Path) -> None:
    for name in ("a.tif", "sub/b.tif", "sub/deep/c.tif", ".hidden/d.tif", "e.tif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    covered = {str(tmp_path / "a.tif"), str(tmp_path / "sub/b.tif")}
    assert missing_files(tmp_path, covered, depth=4) == [
        tmp_path / "e.tif",
        tmp_path / "sub/deep/c.tif",
    ]
    # --depth 1: one folder level below the path, as omero import scans
    assert missing_files(tmp_path, covered, depth=1) == [tmp_path / "e.tif"]
    assert missing_files(tmp_path / "a.tif", covered, depth=4) == []


@pytest.mark.parametrize(
    ("run", "errs", "expected"),
    [
        (out.ice_failure("Ice.ConnectionLostException"), True, "Ice.ConnectionLostException"),
        (out.ice_failure("Ice.TimeoutException"), False, "Ice.TimeoutException"),
        (
            out.ice_failure("omero.InternalException: INTERNAL_EXCEPTION"),
            True,
            "INTERNAL_EXCEPTION",
        ),
        (out.Run(1), True, "no .errs output"),
        (out.no_imports_due_to_errors("/data/a.tif"), True, None),
        (out.wrapper_exit(103), False, None),
        (out.Run(-9), True, None),
    ],
)
def test_which_failures_are_transient(run: out.Run, errs: bool, expected: str | None) -> None:
    # the importer's stderr goes to the .errs file; the wrapper's own to the process's stderr
    errs_text, stderr = (run.stderr, "") if errs else ("", run.stderr)
    assert retryable_import_error(run.exit_code, errs_text, stderr) == expected
