"""The synchronous API OMERO.biomero uses to write orders, with the original's behaviour.

OMERO.biomero does ``initialize_ingest_tracker({"ingest_tracking_db": url})`` and then
``log_ingestion_step(order_dict, STAGE_NEW_ORDER)``; the return value (new row id, or None when
the write failed) is ignored by the plugin, so failures are logged, never raised.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from sqlalchemy import create_engine, null, text
from sqlalchemy.engine import Engine
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
from biomero_importer.db.urls import sync_url
from biomero_importer.settings import mask_db_url, normalise_db_url

__all__ = [
    "ALL_STAGES",
    "STAGE_IMPORTED",
    "STAGE_INGEST_FAILED",
    "STAGE_INGEST_STARTED",
    "STAGE_NEW_ORDER",
    "STAGE_PREPROCESSING",
    "IngestTracker",
    "IngestionTracking",
    "Preprocessing",
    "get_ingest_tracker",
    "initialize_ingest_tracker",
    "log_ingestion_step",
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


class IngestTracker:
    def __init__(self, config: dict[str, Any]) -> None:
        if not config or "ingest_tracking_db" not in config:
            raise ValueError("Configuration must include 'ingest_tracking_db'")
        raw_url = os.getenv("INGEST_TRACKING_DB_URL") or config["ingest_tracking_db"]
        self.database_url = normalise_db_url(str(raw_url))
        logger.debug("ingest tracker database: %s", mask_db_url(self.database_url))
        self.engine: Engine = create_engine(
            sync_url(self.database_url),
            connect_args={"connect_timeout": 5},
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
                logger.error("could not log ingestion step %s: %s", stage, type(exc).__name__)
                return None
            except Exception:
                logger.exception("unexpected error logging ingestion step %s", stage)
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
        )
        entry.files = order_info.get("Files", [])
        entry.file_names = order_info.get("FileNames", [])
        session.add(entry)
        existing_id = order_info.get("_preprocessing_id")
        if existing_id:
            entry.preprocessing_id = int(existing_id)
        elif "preprocessing_container" in order_info:
            columns = {column: order_info.get(key) for key, column in PREPROCESSING_COLUMNS.items()}
            extra = dict(order_info.get("extra_params") or {})
            extra.update(
                {
                    key.removeprefix("preprocessing_"): value
                    for key, value in order_info.items()
                    if key.startswith("preprocessing_") and key not in PREPROCESSING_COLUMNS
                }
            )
            # SQL NULL when there are none: a plain None would be stored as the JSON value
            # 'null', which the service refuses ("extra_params must be a JSON object").
            entry.preprocessing = Preprocessing(**columns, extra_params=extra or null())
        session.commit()
        return entry.id


class _Current:
    """The process-wide tracker the original API hands out."""

    lock = threading.Lock()
    tracker: IngestTracker | None = None


def get_ingest_tracker() -> IngestTracker | None:
    return _Current.tracker


def initialize_ingest_tracker(config: dict[str, Any]) -> bool:
    """Create the process-wide tracker; False (never an exception) when that fails."""
    with _Current.lock:
        try:
            _Current.tracker = IngestTracker(config)
        except Exception as exc:
            logger.error("failed to initialize the ingest tracker: %s", type(exc).__name__)
            _Current.tracker = None
            return False
        return True


def log_ingestion_step(order_info: dict[str, Any], stage: str) -> int | None:
    tracker = get_ingest_tracker()
    if tracker is None:
        logger.error("IngestTracker not initialized. Call initialize_ingest_tracker first.")
        return None
    return tracker.db_log_ingestion_event(order_info, stage)
