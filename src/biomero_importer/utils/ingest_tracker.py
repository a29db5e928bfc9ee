"""The synchronous API OMERO.biomero uses to write orders, with the original's behaviour.

OMERO.biomero does ``initialize_ingest_tracker({"ingest_tracking_db": url})`` and then
``log_ingestion_step(order_dict, STAGE_NEW_ORDER)``; the return value (new row id, or None when
the write failed) is ignored by the plugin, so failures are logged, never raised. Every public
name of the original module is here (biomero-scripts also imports ``_mask_url``), and, as
there, any SQLAlchemy URL works: SQLite and psycopg 3 included.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import create_engine, event, null, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from biomero_importer.db.models import (
    ALL_STAGES,
    STAGE_IMPORTED,
    STAGE_IMPORTING,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    STAGE_PREPROCESSING,
    Base,
    IngestionTracking,
    Preprocessing,
)
from biomero_importer.options import to_column
from biomero_importer.settings import mask_db_url

__all__ = [
    "ALL_STAGES",
    "CREATED_ANY_TABLES",
    "STAGE_IMPORTED",
    "STAGE_INGEST_FAILED",
    "STAGE_INGEST_STARTED",
    "STAGE_NEW_ORDER",
    "STAGE_PREPROCESSING",
    "Base",
    "IngestTracker",
    "IngestionTracking",
    "Preprocessing",
    "get_ingest_tracker",
    "initialize_ingest_tracker",
    "log_ingestion_step",
    "prepare_ingest_tracker_for_worker",
    "receive_after_create",
]

STAGE_INGEST_STARTED = STAGE_IMPORTING

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("Group", "Username", "UUID", "DestinationID")
# preprocessing_<key> entries with their own column; every other one goes into extra_params
PREPROCESSING_COLUMNS = {
    "preprocessing_container": "container",
    "preprocessing_inputfile": "input_file",
    "preprocessing_outputfolder": "output_folder",
    "preprocessing_altoutputfolder": "alt_output_folder",
}
_UPSTREAM_TABLES = [
    Base.metadata.tables[Preprocessing.__tablename__],
    Base.metadata.tables[IngestionTracking.__tablename__],
]
# URL schemes that name PostgreSQL without a driver we can use synchronously: they get the
# psycopg2 driver we ship (SQLAlchemy 2.1 would otherwise pick psycopg 3 for a plain one).
_PSYCOPG2_SCHEMES = frozenset({"postgres", "postgresql", "postgresql+asyncpg"})

# True once ``create_all`` created a table in this process (the original's migrator read it).
CREATED_ANY_TABLES = False


@event.listens_for(Base.metadata, "after_create")
def receive_after_create(target: Any, connection: Connection, tables: Any = (), **kw: Any) -> None:
    global CREATED_ANY_TABLES  # noqa: PLW0603 - the original's module-level flag
    if tables:
        CREATED_ANY_TABLES = True


def _mask_url(url: str) -> str:
    """The URL with its password replaced, for logs (biomero-scripts imports this name)."""
    try:
        return mask_db_url(url)
    except ValueError:
        return "<unparseable database URL>"


def writer_url(url: str) -> str:
    """The SQLAlchemy URL the writer connects with: as given, except driverless PostgreSQL."""
    parts = urlsplit(url.strip())
    if parts.scheme in _PSYCOPG2_SCHEMES:
        return urlunsplit(("postgresql+psycopg2", *parts[1:]))
    return url.strip()


def _safe_error(exc: BaseException, url: str) -> str:
    """The exception's message with the URL's password masked (driver errors may quote it)."""
    message = f"{type(exc).__name__}: {exc}"
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        message = message.replace(url, _mask_url(url)).replace(password, "***")
    return message


class IngestTracker:
    def __init__(self, config: dict[str, Any]) -> None:
        if not config or "ingest_tracking_db" not in config:
            raise ValueError("Configuration must include 'ingest_tracking_db'")
        self.logger = logger
        self.database_url = writer_url(
            str(os.getenv("INGEST_TRACKING_DB_URL") or config["ingest_tracking_db"])
        )
        logger.debug("ingest tracker database: %s", _mask_url(self.database_url))
        dialect = urlsplit(self.database_url).scheme.split("+")[0]
        connect_args: dict[str, Any] = {}
        if dialect == "sqlite":
            connect_args["timeout"] = 5
        elif dialect in ("postgresql", "postgres"):
            connect_args["connect_timeout"] = 5
        self.engine: Engine = create_engine(
            self.database_url,
            connect_args=connect_args,
            pool_pre_ping=True,
            pool_recycle=1800,
        )
        self.Session = sessionmaker(bind=self.engine)
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        # As the original did: a writer that starts before the importer still finds its tables.
        Base.metadata.create_all(self.engine, tables=_UPSTREAM_TABLES, checkfirst=True)

    def dispose(self) -> None:
        self.engine.dispose()

    def db_log_ingestion_event(
        self, order_info: dict[str, Any], stage: str, max_retries: int = 3
    ) -> int | None:
        """Append one row for the order; returns its id, or None when it could not be written."""
        if not all(name in order_info for name in REQUIRED_FIELDS):
            logger.error("order is missing required fields %s", list(REQUIRED_FIELDS))
            return None
        for attempt in range(max_retries):
            try:
                with self.Session() as session:
                    row_id = self._write(session, order_info, stage)
                logger.info("ingestion event logged: %s %s", stage, order_info.get("UUID"))
                return row_id
            except SQLAlchemyError as exc:
                connection_lost = (
                    getattr(exc, "connection_invalidated", False)
                    or isinstance(getattr(exc, "orig", None), OSError)
                    or "connect" in str(exc).lower()
                    or "closed" in str(exc).lower()
                )
                if connection_lost and attempt < max_retries - 1:
                    wait = 0.5 * 2**attempt
                    logger.warning("database connection issue, retrying in %.1fs", wait)
                    time.sleep(wait)
                    continue
                logger.error(
                    "could not log ingestion step %s: %s",
                    stage,
                    _safe_error(exc, self.database_url),
                )
                return None
            except Exception as exc:
                logger.error(
                    "unexpected error logging ingestion step %s: %s",
                    stage,
                    _safe_error(exc, self.database_url),
                )
                return None
        return None

    @staticmethod
    def _write(session: Session, order_info: dict[str, Any], stage: str) -> int:
        entry = IngestionTracking(
            group_name=order_info.get("Group"),
            user_name=order_info.get("Username", "Unknown"),
            destination_id=str(order_info.get("DestinationID", "")),
            destination_type=str(order_info.get("DestinationType", "")),
            stage=stage,
            uuid=str(order_info.get("UUID", "Unknown")),
            description=order_info.get("Description") or order_info.get("description"),
            import_options=to_column(order_info.get("ImportOptions")),
        )
        entry.files = order_info.get("Files", [])
        entry.file_names = order_info.get("FileNames", [])
        session.add(entry)
        existing_id = order_info.get("_preprocessing_id")
        if existing_id:
            entry.preprocessing_id = int(existing_id)
        elif "preprocessing_container" in order_info:
            columns = {column: order_info.get(key) for key, column in PREPROCESSING_COLUMNS.items()}
            entry.preprocessing = Preprocessing(**columns, extra_params=_extra_params(order_info))
        session.commit()
        return entry.id


def _extra_params(order_info: dict[str, Any]) -> Any:
    """``extra_params`` plus every other ``preprocessing_<key>`` entry.

    SQL NULL when there are none: a plain None would be stored as the JSON value 'null'. A
    value that is not a mapping is stored as given, as the original did: the service then
    fails that order saying so, instead of the order vanishing here.
    """
    given = order_info.get("extra_params")
    if given is not None and not isinstance(given, dict):
        return given
    extra = dict(given or {})
    extra.update(
        {
            key.removeprefix("preprocessing_"): value
            for key, value in order_info.items()
            if key.startswith("preprocessing_") and key not in PREPROCESSING_COLUMNS
        }
    )
    return extra or null()


# The process-wide tracker the original API hands out (tests and callers patch this name).
_ingest_tracker: IngestTracker | None = None
_lock = threading.Lock()


def get_ingest_tracker() -> IngestTracker | None:
    return _ingest_tracker


def initialize_ingest_tracker(config: dict[str, Any]) -> bool:
    """Create the process-wide tracker; False (never an exception) when that fails."""
    global _ingest_tracker  # noqa: PLW0603 - the original's module-level instance
    with _lock:
        try:
            _ingest_tracker = IngestTracker(config)
        except Exception as exc:
            url = str((config or {}).get("ingest_tracking_db", ""))
            logger.error("failed to initialize the ingest tracker: %s", _safe_error(exc, url))
            _ingest_tracker = None
            return False
        return True


def prepare_ingest_tracker_for_worker(config: dict[str, Any]) -> bool:
    """Make a process-pool worker use its own database connections.

    A forked worker inherits the parent's tracker: its pool is replaced without closing the
    parent's connections (``dispose(close=False)``), so the first checkout opens a fresh one.
    A spawned worker inherits nothing and initialises its own; RuntimeError if it cannot.
    """
    tracker = get_ingest_tracker()
    if tracker is not None:
        tracker.engine.dispose(close=False)
        return True
    if initialize_ingest_tracker(config):
        return True
    raise RuntimeError("Failed to initialize ingest tracker in worker process")


def log_ingestion_step(order_info: dict[str, Any], stage: str) -> int | None:
    tracker = get_ingest_tracker()
    if tracker is None:
        logger.error("IngestTracker not initialized. Call initialize_ingest_tracker first.")
        return None
    return tracker.db_log_ingestion_event(order_info, stage)
