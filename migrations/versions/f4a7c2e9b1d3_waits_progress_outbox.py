"""Waiting orders, progress of running orders and the notification outbox.

Revision ID: f4a7c2e9b1d3
Revises: e8b3f5a2c7d1
Create Date: 2026-11-30

New ``importer_orders`` columns:

- ``not_before``: a pending order is not claimed before this time. An order whose files are
  still changing, or that failed for a reason that passes (OMERO unreachable, storage not
  answering), goes back to 'Import Pending' with a time to wait instead of failing.
- ``waiting_since``: when the order first waited for its files to settle, so the wait is
  bounded (``settle_max_wait``).
- ``retries``: automatic retries of transient failures used so far.
- ``progress`` / ``progress_at``: where a running order is (step, units done and total,
  current file, bytes), written by its replica as it goes.

``importer_outbox`` holds one row per order outcome (the terminal history row's id is its
key): notifications are delivered from it after the outcome is committed, at least once.

``importer_order_stage_changed`` (BEFORE UPDATE OF stage on ``importer_orders``) keeps these
consistent for every writer, whichever statement moves the stage: leaving the running stages
clears the progress; reaching 'Import Completed' or 'Import Failed' clears the wait and retry
state (a later retry starts afresh) and queues the outcome's notification in the same
transaction as the terminal history row. A duplicate submission of a finished order rewrites
the same stage, so it queues nothing.

Existing orders need no adoption: they have not waited, retried or made progress yet, and
outcomes from before this revision are not notified. The SQL is frozen here, as this
revision first ran it: the application's ``db/sql.py`` may change.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "f4a7c2e9b1d3"
down_revision: str | None = "e8b3f5a2c7d1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STAGE_CHANGED = """
CREATE OR REPLACE FUNCTION importer_order_stage_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.stage NOT IN ('Import Started', 'Import Preprocessing') THEN
        NEW.progress := NULL;
        NEW.progress_at := NULL;
    END IF;
    IF NEW.stage IN ('Import Completed', 'Import Failed')
       AND OLD.stage NOT IN ('Import Completed', 'Import Failed') THEN
        NEW.not_before := NULL;
        NEW.waiting_since := NULL;
        NEW.retries := 0;
        INSERT INTO importer_outbox (uuid, event_id, stage)
        VALUES (NEW.uuid, NEW.latest_id, NEW.stage)
        ON CONFLICT (event_id) DO NOTHING;
    END IF;
    RETURN NEW;
END;
$$;
"""

STAGE_TRIGGER = (
    "CREATE TRIGGER importer_order_stage_changed BEFORE UPDATE OF stage ON importer_orders"
    " FOR EACH ROW WHEN (OLD.stage IS DISTINCT FROM NEW.stage)"
    " EXECUTE FUNCTION importer_order_stage_changed()"
)


def upgrade() -> None:
    op.add_column(
        "importer_orders", sa.Column("not_before", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "importer_orders", sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "importer_orders",
        sa.Column("retries", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column("importer_orders", sa.Column("progress", sa.JSON(), nullable=True))
    op.add_column(
        "importer_orders", sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_table(
        "importer_outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("uuid", sa.String(length=36), nullable=False),
        # the terminal ``imports`` row: one notification per outcome, whatever re-runs it
        sa.Column("event_id", sa.Integer(), nullable=False, unique=True),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        # the channels (webhook, email) already delivered, so a retry sends only the rest
        sa.Column(
            "delivered",
            sa.ARRAY(sa.String()),
            nullable=False,
            server_default=sa.text("'{}'::varchar[]"),
        ),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        if_not_exists=True,
    )
    op.create_index(
        "importer_outbox_ix_due",
        "importer_outbox",
        ["next_attempt_at"],
        postgresql_where=sa.text("done_at IS NULL"),
        if_not_exists=True,
    )
    op.create_index(
        "importer_outbox_ix_done",
        "importer_outbox",
        ["done_at"],
        postgresql_where=sa.text("done_at IS NOT NULL"),
        if_not_exists=True,
    )
    op.execute(STAGE_CHANGED)
    op.execute("DROP TRIGGER IF EXISTS importer_order_stage_changed ON importer_orders")
    op.execute(STAGE_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS importer_order_stage_changed ON importer_orders")
    op.execute("DROP FUNCTION IF EXISTS importer_order_stage_changed()")
    op.drop_index("importer_outbox_ix_done", table_name="importer_outbox", if_exists=True)
    op.drop_index("importer_outbox_ix_due", table_name="importer_outbox", if_exists=True)
    op.drop_table("importer_outbox", if_exists=True)
    for column in ("progress_at", "progress", "retries", "waiting_since", "not_before"):
        op.drop_column("importer_orders", column)
