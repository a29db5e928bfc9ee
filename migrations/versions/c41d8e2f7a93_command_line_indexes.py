"""Indexes for ``biomero-importer status`` filters on a long history.

Revision ID: c41d8e2f7a93
Revises: b7e4c2a91d05
Create Date: 2026-11-30

``status`` lists the latest state of orders newest first, filtered by stage, user or group.
Stage filters walk ``(stage, updated_at)``; user and group filters start from the history
(``imports.user_name`` already has an index, ``group_name`` gets one) and reach the order's
queue row through ``latest_id``, so a rare user or group never scans a million orders.
``if_not_exists``: the compatibility API creates ``imports`` (with the model's indexes) when a
writer starts before the first migration.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "c41d8e2f7a93"
down_revision: str | None = "b7e4c2a91d05"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "importer_orders_ix_stage_updated",
        "importer_orders",
        ["stage", "updated_at"],
        if_not_exists=True,
    )
    op.create_index(
        "importer_orders_ix_latest", "importer_orders", ["latest_id"], if_not_exists=True
    )
    op.create_index("imports_ix_group_name", "imports", ["group_name"], if_not_exists=True)


def downgrade() -> None:
    op.drop_index("imports_ix_group_name", table_name="imports", if_exists=True)
    op.drop_index("importer_orders_ix_latest", table_name="importer_orders", if_exists=True)
    op.drop_index("importer_orders_ix_stage_updated", table_name="importer_orders", if_exists=True)
