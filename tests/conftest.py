"""A real PostgreSQL for every test: embedded by default, any server through an env variable.

``BIOMERO_IMPORTER_TEST_DATABASE_URL`` names an existing server (its database is used only to
create and drop one fresh database per test).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import pytest
import structlog

from biomero_importer.db.embedded import EmbeddedPostgres
from biomero_importer.db.migrate import migrate
from biomero_importer.db.sql import DEFAULT_CHANNEL
from biomero_importer.db.urls import with_database
from biomero_importer.observability.logging import reset_logging
from biomero_importer.settings import normalise_db_url
from tests.pg_control import postmasters, stop_for_sure
from tests.podman_support import build_test_image

TEST_DB_ENV = "BIOMERO_IMPORTER_TEST_DATABASE_URL"

# data directories of the embedded servers this session started, checked when it ends
_SESSION_DATA_DIRS: list[Path] = []


@dataclass
class PgServer:
    admin_url: str
    embedded: EmbeddedPostgres | None

    def execute(self, sql: str) -> None:
        conn = psycopg2.connect(self.admin_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()


@pytest.fixture(autouse=True, scope="session")
def _uncached_loggers() -> Iterator[None]:
    """The service caches each module's logger on first use (faster logging); a cached logger
    keeps the processors of its day, so structlog.testing.capture_logs would miss its events
    in every later test. Tests configure logging without that cache."""
    real = structlog.configure

    def configure(*args: Any, **kwargs: Any) -> None:
        kwargs["cache_logger_on_first_use"] = False
        real(*args, **kwargs)

    structlog.configure = configure
    yield
    structlog.configure = real


def _plain_tracebacks() -> None:
    """structlog's default chain, but rendering exceptions as configure_logging does.

    A test that runs a service without configuring logging gets structlog's defaults, whose
    rich traceback prints every local of every frame: the repr of a dispatcher, its store and
    its orders, 0.5 to 1 s for each logged exception (the unit tier logs dozens). The service
    itself never renders them that way (plain tracebacks, see configure_logging); what a test
    asserts on is the event (capture_logs), not its rendering.
    """
    structlog.reset_defaults()
    *chain, _renderer = structlog.get_config()["processors"]
    plain = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    structlog.configure(processors=[*chain, plain])


@pytest.fixture(autouse=True)
def _clean_logging() -> Iterator[None]:
    """Services and commands run in-process configure logging: leave the defaults behind."""
    levels = {name: logging.getLogger(name).level for name in ("", "asyncpg", "sqlalchemy")}
    _plain_tracebacks()
    yield
    reset_logging()
    structlog.contextvars.clear_contextvars()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    external = os.environ.get(TEST_DB_ENV)
    if external:
        yield PgServer(admin_url=normalise_db_url(external), embedded=None)
        return
    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("pgdata"))
    _SESSION_DATA_DIRS.append(embedded.data_dir)
    try:
        url = embedded.start()
        yield PgServer(admin_url=url, embedded=embedded)
    finally:
        # also the server a test restarted through pg_ctl, which the library does not know
        stop_for_sure(embedded)


@pytest.fixture
def database_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database for one test."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    pg_server.execute(f"CREATE DATABASE {name}")
    try:
        yield with_database(pg_server.admin_url, name)
    finally:
        pg_server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """A fresh database migrated to head."""
    migrate(database_url, channel=DEFAULT_CHANNEL)
    return database_url


@pytest.fixture
def import_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def podman_image() -> Iterator[str]:
    """Podman configured for this machine and the local converter image built (or a skip)."""
    yield from build_test_image()


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    """After every fixture is torn down: no PostgreSQL this session started may be running.

    A leftover fails the run (and is stopped, so it does not outlive the report).
    """
    result = yield
    left = [proc for data_dir in _SESSION_DATA_DIRS for proc in postmasters(data_dir)]
    if left:
        lines = []
        for proc in left:
            with contextlib.suppress(psutil.Error):
                lines.append(f"{proc.pid}: {' '.join(proc.cmdline())}")
                proc.terminate()
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "PostgreSQL started by the tests is still running:\n" + "\n".join(lines)
        if reporter is not None:
            reporter.write_line(message, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
