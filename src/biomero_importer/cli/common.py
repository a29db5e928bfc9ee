"""What every command shares: options, settings, database access and plain-text output.

Exit codes: 0 ok, 1 the thing asked about failed, 2 usage or configuration error.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import typer

from biomero_importer.db.migrate import is_at_head
from biomero_importer.db.models import ALL_STAGES
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.observability.logging import configure_logging
from biomero_importer.service import database
from biomero_importer.settings import LoadedSettings, Settings, SettingsError, load_settings
from biomero_importer.store import OrderStore, PostgresStore, StoreUnavailable

T = TypeVar("T")

EXIT_FAILED = 1
EXIT_USAGE = 2
CONNECT_TIMEOUT = 10.0

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Settings file (default: $BIOMERO_IMPORTER_CONFIG or config/settings.yml).",
        show_default=False,
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print JSON instead of a table.", show_default=False)
]

STAGE_ALIASES = {
    "pending": "Import Pending",
    "started": "Import Started",
    "preprocessing": "Import Preprocessing",
    "completed": "Import Completed",
    "failed": "Import Failed",
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def load(config: Path | None) -> LoadedSettings:
    try:
        return load_settings(config)
    except SettingsError as exc:
        raise fail(str(exc)) from None


def load_quietly(config: Path | None) -> Settings:
    """Settings for a one-shot command: only warnings are logged, on stderr, so stdout stays
    the command's output (tables, JSON, the uuid a script captures)."""
    loaded = load(config)
    quiet = loaded.settings.model_copy(update={"log_level": "WARNING", "log_file_path": None})
    configure_logging(quiet, stream=typer.get_text_stream("stderr"))
    return loaded.settings


def error_text(exc: BaseException, settings: Settings) -> str:
    """First line of a driver error, with the database password removed if it slipped in."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    url = settings.ingest_tracking_db
    password = urlsplit(url).password if url else None
    return text.replace(password, "***") if password else text


def unreachable(exc: BaseException, settings: Settings) -> str:
    return f"cannot reach the database ({settings.masked_db_url()}): {error_text(exc, settings)}"


def schema_problem(settings: Settings, url: str) -> str | None:
    """None when the database answers and is at head, else what is wrong (no secrets)."""
    try:
        at_head, current = is_at_head(url)
    except Exception as exc:
        return (
            f"cannot reach the database ({settings.masked_db_url()}): {error_text(exc, settings)}"
        )
    if not at_head:
        return (
            f"the database schema is at revision {current or 'none (empty database)'}, not at"
            " head: run 'biomero-importer migrate' first"
        )
    return None


@contextmanager
def ready_database(settings: Settings) -> Iterator[str]:
    """The URL of a reachable database at head (never migrated here: commands only read, or
    write as OMERO.biomero does); the embedded server runs while the block does."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(database(settings))
        except Exception as exc:
            # whatever the embedded server's startup raises, the user needs its first line
            raise fail(f"cannot start the embedded database: {error_text(exc, settings)}") from None
        problem = schema_problem(settings, url)
        if problem is not None:
            raise fail(problem)
        yield url


def run_with_store(
    settings: Settings, url: str, work: Callable[[OrderStore], Coroutine[Any, Any, T]]
) -> T:
    """Run ``work(store)`` on the order store; an unreachable database fails at once."""

    async def main() -> T:
        store = PostgresStore(
            asyncpg_dsn(url), pool_size=2, retry=False, connect_timeout=CONNECT_TIMEOUT
        )
        try:
            await store.open()
        except Exception as exc:  # refused, unreachable, bad password: one line, no traceback
            raise fail(unreachable(exc.__cause__ or exc, settings)) from None
        try:
            return await work(store)
        except StoreUnavailable as exc:
            raise fail(unreachable(exc.__cause__ or exc, settings)) from None
        finally:
            await store.close(timeout=CONNECT_TIMEOUT)

    return asyncio.run(main())


def parse_stage(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip().lower()
    if key in STAGE_ALIASES:
        return STAGE_ALIASES[key]
    for stage in ALL_STAGES:
        if stage.lower() == key:
            return stage
    choices = ", ".join(STAGE_ALIASES)
    raise typer.BadParameter(f"unknown stage {value!r} (use one of: {choices}, or a full name)")


def parse_duration(value: str | None) -> timedelta | None:
    """``30m``, ``2h``, ``7d``, ``1w``, ``90s`` or combinations like ``1h30m``."""
    if value is None:
        return None
    text = value.strip().lower()
    parts = list(_DURATION.finditer(text))
    if not parts or "".join(p.group(0) for p in parts).replace(" ", "") != text.replace(" ", ""):
        raise typer.BadParameter(f"{value!r} is not a duration (examples: 30m, 2h, 7d, 1h30m)")
    seconds = sum(float(p.group(1)) * _UNIT_SECONDS[p.group(2)] for p in parts)
    return timedelta(seconds=seconds)


def local_time(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def truncate(text: str | None, limit: int) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart: readable in a terminal, in logs and in tests."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def parse_json(text: str | None) -> Any:
    """Stored JSON text, or the raw text when a SQL client wrote something else."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def file_list(text: str | None) -> list[str]:
    files = parse_json(text)
    if isinstance(files, list):
        return [str(f) for f in files]
    return [] if files is None else [str(files)]
