"""One ``omero import`` of one file, repeated after a transient Ice error as the original does.

Each attempt writes its own ``cli.<UUID>_<i>[_attempt<n>].logs/.errs`` (created 0600, empty,
before the process starts), so a failed attempt's evidence survives the next one.

Two failures are not the importer's own and are settled with the backend's help:

- the CLI could not join the order's session (omero-py reports every cause alike as
  "Previous session expired"): the backend's ``rejoin`` asks its own connection whether the
  server is down (the order waits), the session died (a fresh one, and the import again) or
  neither (the order fails with that cause);
- the CLI outlived ``import_timeout`` and was killed: its server-side import may still finish,
  so after ``import_timeout_grace`` the backend looks for what it made before anything retries.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import structlog

from biomero_importer.omero.importcli import (
    ImportVerdict,
    LogPaths,
    log_paths,
    parse_import_result,
    retryable_import_error,
    session_not_joined,
)
from biomero_importer.omero.port import ImportAborted, ImportedObject, ImportFailed
from biomero_importer.settings import Settings

log = structlog.get_logger(__name__)

# Runs the import process writing to the given log files: (exit code, stdout, stderr).
RunOnce = Callable[[LogPaths], tuple[int, str, str]]
#: the cause an import run reports when the server could not be reached to join its session
SESSION_SERVER_UNREACHABLE = "server unreachable while joining the session"


class SessionState(Enum):
    """What the backend found when the CLI could not join the order's session."""

    #: the session had ended (expired, killed, server restarted): a fresh one was opened
    RENEWED = "renewed"
    #: the server cannot be reached (down, restarting): the order waits and retries
    UNREACHABLE = "unreachable"
    #: the session and the server are fine for the service: the CLI's own view of them is not
    ALIVE = "alive"


Rejoin = Callable[[], SessionState]


class ImportTimedOut(ImportFailed):
    """The CLI ran longer than ``import_timeout`` and was killed with its JVM."""


@dataclass(frozen=True)
class ImportRun:
    verdict: ImportVerdict
    attempts: int
    logs: LogPaths
    #: the transient Ice error the last failed attempt met (None: none, or it succeeded)
    cause: str | None = None


def _fresh_log_files(logs: LogPaths) -> None:
    """Emptied here because the CLI truncates them only once it gets that far (never read an
    earlier run's ids), and created 0600 because they name users and paths: the CLI reopens
    existing files without changing their mode."""
    logs.stdout.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    for log_file in (logs.stdout, logs.stderr):
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def run_import(
    settings: Settings,
    run_once: RunOnce,
    *,
    order_uuid: str,
    index: int,
    name: str,
    aborted: Callable[[float], bool],
    rejoin: Rejoin | None = None,
) -> ImportRun:
    """Run an import up to ``import_retry_attempts`` times while it fails transiently.

    ``aborted(seconds)`` waits between attempts and returns True when the session was aborted
    meanwhile (cancel, shutdown): then ImportAborted is raised instead of another attempt.
    ``rejoin`` settles a session the CLI could not join (see the module's docstring); without
    it such a failure ends the run with its cause.
    """
    attempt = 1
    renewals = 0
    while True:
        logs = log_paths(settings, order_uuid, index, attempt)
        _fresh_log_files(logs)
        code, out, err = run_once(logs)
        errs_text = read_text(logs.stderr)
        if session_not_joined(code, out, err):
            # Checked first: the importer never ran, so "no .errs output" would retry the
            # same dead session key.
            state = rejoin() if rejoin is not None else SessionState.ALIVE
            log.warning("omero_import_session_not_joined", path=name, state=state.value)
            if state is SessionState.RENEWED and renewals < settings.import_retry_attempts:
                renewals += 1
                attempt += 1
                continue
            return ImportRun(
                _login_verdict(name, state, out, err),
                attempt,
                logs,
                SESSION_SERVER_UNREACHABLE if state is SessionState.UNREACHABLE else None,
            )
        verdict = parse_import_result(
            code, read_text(logs.stdout) + out, errs_text + err, name=name
        )
        if verdict.ok or verdict.nothing_imported:
            return ImportRun(verdict, attempt, logs)
        cause = retryable_import_error(code, errs_text, err)
        if cause is None or attempt >= settings.import_retry_attempts:
            return ImportRun(verdict, attempt, logs, cause)
        delay = settings.import_retry_delay * attempt
        log.warning(
            "omero_import_retry",
            path=name,
            cause=cause,
            attempt=attempt + 1,
            attempts=settings.import_retry_attempts,
            retry_in=delay,
            errs=str(logs.stderr),
        )
        if aborted(delay):
            raise ImportAborted(f"aborted before attempt {attempt + 1} of importing {name}")
        attempt += 1


def _login_verdict(name: str, state: SessionState, out: str, err: str) -> ImportVerdict:
    said = " ".join(line.strip() for line in (out + err).splitlines() if line.strip())[:300]
    if state is SessionState.UNREACHABLE:
        reason = f"OMERO import of {name}: the server could not be reached to join the session"
    elif state is SessionState.RENEWED:
        reason = (
            f"OMERO import of {name} failed: the omero CLI could not join a fresh session either"
        )
    else:
        reason = (
            f"OMERO import of {name} failed: the omero CLI could not join the order's session,"
            " which the service itself still reaches (check the CLI's host, port and"
            f" network): {said}"
        )
    return ImportVerdict(False, reason, detail=said)


def import_files(path: Path, depth: int) -> list[Path]:
    """The files an import of ``path`` looks at: the file itself, or the visible files of a
    folder down to ``depth`` levels (``omero import --depth``), in a stable order."""
    if not path.is_dir():
        return [path]
    found: list[Path] = []
    base = len(path.parts)
    for root, dirs, files in os.walk(path):
        level = len(Path(root).parts) - base
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if level < depth else []
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return found


def missing_files(path: Path, covered: Collection[str], depth: int) -> list[Path]:
    """What a re-run of a partly imported unit still imports: the files of ``path`` that no
    fileset this order made holds (``covered``: their client paths). Each fileset is a whole
    group of used files, so a file outside all of them never belonged to a committed one."""
    return [f for f in import_files(path, depth) if str(f) not in covered]


def settle_timeout(
    settings: Settings,
    timed_out: ImportTimedOut,
    *,
    look: Callable[[], tuple[list[ImportedObject], list[Path]]],
    aborted: Callable[[float], bool],
) -> list[ImportedObject]:
    """After a killed CLI: wait ``import_timeout_grace``, then ``look()`` for what the import
    made (objects of this order from the path that were not there before, and the files still
    missing). Everything there: the import finished on the server, and that is its result.
    Anything missing: the timeout stands, and a re-run imports only what is missing."""
    grace = settings.import_timeout_grace
    log.warning("omero_import_timed_out", reason=timed_out.reason, grace=grace)
    if aborted(grace):
        raise ImportAborted(f"aborted while waiting after: {timed_out.reason}")
    made, missing = look()
    if made and not missing:
        log.info("omero_import_finished_after_timeout", objects=len(made))
        return made
    found = f"{len(made)} objects of it were in OMERO" if made else "nothing of it was in OMERO"
    raise ImportTimedOut(
        f"{timed_out.reason}; {found} {grace:g} s later, {len(missing)} files still missing",
        timed_out.detail,
    )


@contextmanager
def host_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process of this host (``flock`` on ``path``): one
    download of OMERO.java at a time, however many workers start together."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
