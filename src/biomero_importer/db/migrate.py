"""Run the Alembic migrations, once, whatever state the database is in.

Replicas starting together serialise on the same advisory lock the original importer used,
so an original and a new replica never migrate at the same time either.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from biomero_importer.db.models import OWNED_TABLES
from biomero_importer.db.sql import TRIGGER_CHANNEL, trigger_statements
from biomero_importer.db.urls import sync_url

log = structlog.get_logger(__name__)

VERSION_TABLE = "alembic_version_omeroadi"
LOCK_KEY = "omeroadi_migrations"


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Reflect only our tables, so autogenerate never proposes to drop anyone else's."""
    if type_ == "table":
        return name in OWNED_TABLES
    return True


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    if type_ == "table":
        return name in OWNED_TABLES
    table = getattr(obj, "table", None)
    return table is None or table.name in OWNED_TABLES


def migrations_dir() -> Path:
    """The migrations folder: inside the installed wheel, or at the top of a source checkout."""
    packaged = Path(str(resources.files("biomero_importer"))) / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("version_table", VERSION_TABLE)
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def migrate(url: str, *, channel: str) -> tuple[str | None, str]:
    """Upgrade to head under the advisory lock; returns (revision before, revision after)."""
    engine = create_engine(sync_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(hashtext(:key))"), {"key": LOCK_KEY})
            try:
                before = current_revision(conn)
                conn.commit()
                command.upgrade(alembic_config(conn), "head")
                conn.commit()
                _ensure_channel(conn, channel)
                after = current_revision(conn)
                conn.commit()
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": LOCK_KEY})
                conn.commit()
    finally:
        engine.dispose()
    if before != after:
        log.info("migrations_applied", before=before, after=after)
    else:
        log.info("migrations_up_to_date", revision=after)
    assert after is not None
    return before, after


def _ensure_channel(conn: Connection, channel: str) -> None:
    """Point the wake-up triggers at the configured channel (the migration uses the default)."""
    args = conn.execute(text(TRIGGER_CHANNEL)).scalar()
    if args is not None and args.split("\\000")[0] == channel:
        return
    for statement in trigger_statements(channel):
        conn.execute(text(statement))
    conn.commit()
    log.info("notify_channel_set", channel=channel)


def is_at_head(url: str) -> tuple[bool, str | None]:
    engine = create_engine(sync_url(url))
    try:
        with engine.connect() as conn:
            current = current_revision(conn)
    finally:
        engine.dispose()
    return current == head_revision(), current
