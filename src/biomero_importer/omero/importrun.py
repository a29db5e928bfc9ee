"""One ``omero import`` of one file, repeated after a transient Ice error as the original does.

Each attempt writes its own ``cli.<UUID>_<i>[_attempt<n>].logs/.errs`` (created 0600, empty,
before the process starts), so a failed attempt's evidence survives the next one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from biomero_importer.omero.importcli import (
    ImportVerdict,
    LogPaths,
    log_paths,
    parse_import_result,
    retryable_import_error,
)
from biomero_importer.omero.port import ImportAborted
from biomero_importer.settings import Settings

log = structlog.get_logger(__name__)

# Runs the import process writing to the given log files: (exit code, stdout, stderr).
RunOnce = Callable[[LogPaths], tuple[int, str, str]]


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
) -> ImportRun:
    """Run an import up to ``import_retry_attempts`` times while it fails transiently.

    ``aborted(seconds)`` waits between attempts and returns True when the session was aborted
    meanwhile (cancel, shutdown): then ImportAborted is raised instead of another attempt.
    """
    attempt = 1
    while True:
        logs = log_paths(settings, order_uuid, index, attempt)
        _fresh_log_files(logs)
        code, out, err = run_once(logs)
        errs_text = read_text(logs.stderr)
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
