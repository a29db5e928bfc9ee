"""Alembic environment: only this service's tables, version table ``alembic_version_omeroadi``."""

from __future__ import annotations

from typing import Any

from alembic import context

from biomero_importer.db.migrate import VERSION_TABLE, include_name, include_object
from biomero_importer.db.models import Base

config = context.config


def _configure(**extra: Any) -> None:
    context.configure(
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        include_object=include_object,
        compare_type=True,
        **extra,
    )


if context.is_offline_mode():
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    # The caller hands over a connection that already holds the migration advisory lock.
    connection = config.attributes["connection"]
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
