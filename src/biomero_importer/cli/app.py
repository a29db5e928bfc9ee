"""The ``biomero-importer`` command line.

Exit codes: 0 ok, 1 the thing asked about failed, 2 usage or configuration error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import structlog
import typer

from biomero_importer.cli.check import check
from biomero_importer.cli.common import ConfigOption, fail, load
from biomero_importer.cli.demo import demo
from biomero_importer.cli.orders import cancel, plan, retry, show, status, submit
from biomero_importer.observability.logging import configure_logging
from biomero_importer.omero import OmeroConfigError
from biomero_importer.service import (
    StartupError,
    database,
    prepare_schema,
    run_event_loop,
    serve,
)
from biomero_importer.settings import LoadedSettings, Settings

app = typer.Typer(
    name="biomero-importer",
    help="Imports microscopy data into OMERO for BIOMERO, from orders in PostgreSQL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

log = structlog.get_logger("biomero_importer.cli")


def start_logging(loaded: LoadedSettings) -> None:
    configure_logging(loaded.settings)
    for notice in loaded.notices:
        log.warning("deprecated_setting", message=notice)


@contextmanager
def migrated_database(settings: Settings) -> Iterator[str]:
    """The database URL, with the schema at head (or a clear error)."""
    with database(settings) as url:
        try:
            prepare_schema(settings, url, wait=settings.database_wait)
        except StartupError as exc:
            raise fail(str(exc)) from None
        yield url


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the importer service until SIGTERM or Ctrl-C."""
    loaded = load(config)
    start_logging(loaded)
    settings = loaded.settings
    log.info(
        "importer_starting",
        config=str(loaded.source) if loaded.source else None,
        database=settings.masked_db_url(),
        omero_backend=settings.omero_backend,
    )
    try:
        with migrated_database(settings) as url:
            run_event_loop(serve(settings, url))
    except OmeroConfigError as exc:
        raise fail(str(exc)) from None


@app.command()
def migrate(config: ConfigOption = None) -> None:
    """Upgrade the database schema to the newest revision (safe to run on every start)."""
    loaded = load(config)
    start_logging(loaded)
    # An explicit request: runs even when ADI_RUN_MIGRATIONS=0 keeps `run` from migrating.
    with database(loaded.settings) as url:
        try:
            prepare_schema(loaded.settings, url, force=True)
        except StartupError as exc:
            raise fail(str(exc), 1) from None


app.command()(submit)
app.command()(plan)
app.command()(status)
app.command()(show)
app.command()(retry)
app.command()(cancel)
app.command()(check)
app.command()(demo)


def main() -> None:
    app()
