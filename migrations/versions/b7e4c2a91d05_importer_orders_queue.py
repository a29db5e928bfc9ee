"""Queue state per order, kept current by a trigger that also sends the NOTIFY wake-up.

Revision ID: b7e4c2a91d05
Revises: 92e8f9e637a1
Create Date: 2026-11-29

``importer_orders`` holds one row per order uuid: its latest stage and row id, the replica
that runs it and until when its lease holds, and how many attempts it has had. Claims and
status queries read this table instead of scanning the ``imports`` history. The trigger
keeps it current for every writer: OMERO.biomero, raw SQL and the documented manual retry
(an UPDATE that sets every row of a uuid back to 'Import Pending').

Re-parented onto upstream's 92e8f9e637a1 (it first revised 78d3d6d84aec): a database stamped
here or later by that first graph lacks ``import_options``; d6a4f1c9e2b8 adds it. The SQL is
frozen here, as this revision first ran it: the application's ``db/sql.py`` may change.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7e4c2a91d05"
down_revision: str | None = "92e8f9e637a1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRACK_ORDER = """
CREATE OR REPLACE FUNCTION importer_track_order() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    current importer_orders%ROWTYPE;
    note text;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        -- the documented manual retry rewrites every row of the uuid to 'Import Pending'
        IF OLD.stage IS DISTINCT FROM 'Import Pending' THEN
            UPDATE importer_orders SET
                stage = 'Import Pending', queued_at = now(), updated_at = now(),
                attempts = CASE WHEN stage IN ('Import Completed', 'Import Failed')
                                THEN 0 ELSE attempts END,
                cancel_requested = false
            WHERE uuid = NEW.uuid AND stage <> 'Import Pending';
            PERFORM pg_notify(TG_ARGV[0], NEW.uuid);
        END IF;
        RETURN NULL;
    END IF;

    SELECT * INTO current FROM importer_orders WHERE uuid = NEW.uuid FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO importer_orders (uuid, stage, latest_id) VALUES (NEW.uuid, NEW.stage, NEW.id)
        ON CONFLICT (uuid) DO UPDATE SET stage = EXCLUDED.stage, latest_id = EXCLUDED.latest_id
        WHERE importer_orders.latest_id < EXCLUDED.latest_id;
    ELSIF current.latest_id > NEW.id THEN
        RETURN NULL;
    ELSIF NEW.stage = 'Import Pending' AND (
        (current.stage IN ('Import Started', 'Import Preprocessing')
            AND current.worker_id IS NOT NULL)
        OR (current.stage IN ('Import Completed', 'Import Failed')
            AND current_setting('biomero_importer.requeue', true) IS DISTINCT FROM 'on')
    ) THEN
        -- A second submission of an order that is running or finished: keep one run and
        -- restore the order's state, saying why, so latest-row readers never see a false
        -- 'Import Pending'.
        note := CASE WHEN current.stage IN ('Import Completed', 'Import Failed')
            THEN 'Duplicate submission ignored: this order already finished;'
                 || ' re-run it with biomero-importer retry'
            ELSE 'Duplicate submission ignored: this order is already running' END;
        INSERT INTO imports (group_name, user_name, destination_id, destination_type, stage,
                             uuid, files, file_names, description, preprocessing_id, timestamp)
        SELECT group_name, user_name, destination_id, destination_type, stage, uuid, files,
               file_names, note, preprocessing_id, clock_timestamp()
        FROM imports WHERE id = current.latest_id;
        RETURN NULL;
    ELSE
        UPDATE importer_orders SET
            stage = NEW.stage,
            latest_id = NEW.id,
            updated_at = now(),
            queued_at = CASE WHEN NEW.stage = 'Import Pending' AND current.stage <> 'Import Pending'
                             THEN now() ELSE queued_at END,
            -- a finished order queued again starts its attempt count afresh
            attempts = CASE WHEN NEW.stage = 'Import Pending'
                                 AND current.stage IN ('Import Completed', 'Import Failed')
                            THEN 0 ELSE attempts END,
            cancel_requested = CASE WHEN NEW.stage = 'Import Pending'
                                         AND current.stage IN ('Import Completed', 'Import Failed')
                                    THEN false ELSE cancel_requested END
        WHERE uuid = NEW.uuid;
    END IF;
    IF NEW.stage = 'Import Pending' THEN
        PERFORM pg_notify(TG_ARGV[0], NEW.uuid);
    END IF;
    RETURN NULL;
END;
$$;
"""

NOTIFY_CANCEL = """
CREATE OR REPLACE FUNCTION importer_notify_cancel() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], 'cancel:' || NEW.uuid);
    RETURN NULL;
END;
$$;
"""

# The wake-up triggers on the default channel; ``biomero-importer migrate`` re-points them at the
# configured channel afterwards.
TRIGGERS = [
    "DROP TRIGGER IF EXISTS importer_track_insert ON imports",
    "DROP TRIGGER IF EXISTS importer_track_retry ON imports",
    "DROP TRIGGER IF EXISTS importer_cancel_requested ON importer_orders",
    "CREATE TRIGGER importer_track_insert AFTER INSERT ON imports"
    " FOR EACH ROW EXECUTE FUNCTION importer_track_order('biomero_importer_orders')",
    "CREATE TRIGGER importer_track_retry AFTER UPDATE OF stage ON imports"
    " FOR EACH ROW WHEN (NEW.stage = 'Import Pending')"
    " EXECUTE FUNCTION importer_track_order('biomero_importer_orders')",
    "CREATE TRIGGER importer_cancel_requested AFTER UPDATE OF cancel_requested"
    " ON importer_orders FOR EACH ROW"
    " WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested)"
    " EXECUTE FUNCTION importer_notify_cancel('biomero_importer_orders')",
]


def upgrade() -> None:
    op.create_table(
        "importer_orders",
        sa.Column("uuid", sa.String(length=36), primary_key=True),
        sa.Column("stage", sa.String(), nullable=False),
        sa.Column("latest_id", sa.Integer(), nullable=False),
        sa.Column(
            "queued_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.text("now()"),
        ),
        sa.Column("worker_id", sa.String(), nullable=True),
        sa.Column("last_worker_id", sa.String(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("runs", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column(
            "cancel_requested", sa.Boolean(), nullable=False, server_default=sa.text("false")
        ),
        sa.Column("objects", sa.JSON(), nullable=True),
    )
    # Raw SQL writers often leave out the timestamp; the original relied on a client default.
    op.alter_column("imports", "timestamp", server_default=sa.text("now()"))
    # Adopt the history: one queue row per uuid from its latest row. An order that got past
    # 'Import Pending' has had its attempt (and may have files in OMERO): one the original left
    # 'Import Started' has no worker and is closed like an expired lease on its last attempt.
    op.execute(
        """
        INSERT INTO importer_orders (uuid, stage, latest_id, queued_at, updated_at, attempts, runs)
        SELECT DISTINCT ON (uuid) uuid, stage, id,
               COALESCE(timestamp, now()), COALESCE(timestamp, now()),
               CASE WHEN stage = 'Import Pending' THEN 0 ELSE 1 END,
               CASE WHEN stage = 'Import Pending' THEN 0 ELSE 1 END
        FROM imports
        ORDER BY uuid, id DESC
        """
    )
    op.create_index(
        "importer_orders_ix_pending",
        "importer_orders",
        ["queued_at"],
        postgresql_where=sa.text("stage = 'Import Pending' AND worker_id IS NULL"),
    )
    op.create_index(
        "importer_orders_ix_leases",
        "importer_orders",
        ["lease_expires_at"],
        postgresql_where=sa.text("worker_id IS NOT NULL"),
    )
    op.create_index("importer_orders_ix_updated", "importer_orders", ["updated_at"])
    op.execute(TRACK_ORDER)
    op.execute(NOTIFY_CANCEL)
    for statement in TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS importer_track_insert ON imports")
    op.execute("DROP TRIGGER IF EXISTS importer_track_retry ON imports")
    op.drop_table("importer_orders")
    op.execute("DROP FUNCTION IF EXISTS importer_track_order()")
    op.execute("DROP FUNCTION IF EXISTS importer_notify_cancel()")
    op.alter_column("imports", "timestamp", server_default=None)
