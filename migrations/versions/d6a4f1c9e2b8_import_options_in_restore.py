"""Carry ``imports.import_options`` through the duplicate-submission restore.

Revision ID: d6a4f1c9e2b8
Revises: c41d8e2f7a93
Create Date: 2026-11-30

A database that our first graph (78d3d6d84aec -> b7e4c2a91d05 -> c41d8e2f7a93, without
upstream's 92e8f9e637a1) left at b7e4c2a91d05 or c41d8e2f7a93 skipped the revision that adds
``import_options``: it is added here when missing. The queue trigger's restore of a running or
finished order (after a second submission) copies the latest row, ``import_options`` included,
so readers of the latest row never see an order lose its options.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "d6a4f1c9e2b8"
down_revision: str | None = "c41d8e2f7a93"
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
                             uuid, files, file_names, description, preprocessing_id, timestamp,
                             import_options)
        SELECT group_name, user_name, destination_id, destination_type, stage, uuid, files,
               file_names, note, preprocessing_id, clock_timestamp(), import_options
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

# b7e4c2a91d05's restore, which copied every column but import_options
_OLD_RESTORE = """        INSERT INTO imports (group_name, user_name, destination_id, destination_type, stage,
                             uuid, files, file_names, description, preprocessing_id, timestamp)
        SELECT group_name, user_name, destination_id, destination_type, stage, uuid, files,
               file_names, note, preprocessing_id, clock_timestamp()"""
_NEW_RESTORE = """        INSERT INTO imports (group_name, user_name, destination_id, destination_type, stage,
                             uuid, files, file_names, description, preprocessing_id, timestamp,
                             import_options)
        SELECT group_name, user_name, destination_id, destination_type, stage, uuid, files,
               file_names, note, preprocessing_id, clock_timestamp(), import_options"""


def upgrade() -> None:
    op.execute("ALTER TABLE imports ADD COLUMN IF NOT EXISTS import_options TEXT")
    op.execute(TRACK_ORDER)


def downgrade() -> None:
    # the column belongs to 92e8f9e637a1 and stays
    op.execute(TRACK_ORDER.replace(_NEW_RESTORE, _OLD_RESTORE))
