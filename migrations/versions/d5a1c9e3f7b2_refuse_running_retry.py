"""Refuse the SQL retry UPDATE on a running order; index the cancel sweep.

Revision ID: d5a1c9e3f7b2
Revises: d6a4f1c9e2b8
Create Date: 2026-11-30

The documented manual retry (``UPDATE imports SET stage = 'Import Pending' WHERE uuid = ...``)
on an order that is running left its queue row 'Import Pending' with a worker attached: no
replica claimed it and the run's end overwrote it, so the retry vanished. The trigger now
refuses it with a description and keeps the order running. The cancel sweep reads a partial
index of pending orders whose cancel was requested, so its cost does not grow with the backlog.

The function text is frozen here: later changes come as new revisions.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d5a1c9e3f7b2"
down_revision: str | None = "d6a4f1c9e2b8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# as revision d6a4f1c9e2b8 left it
PREVIOUS_TRACK_ORDER = """
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

_RETRY_BRANCH = """
        IF OLD.stage IS DISTINCT FROM 'Import Pending' THEN
"""
_REFUSAL = """            SELECT * INTO current FROM importer_orders WHERE uuid = NEW.uuid FOR UPDATE;
            IF FOUND AND current.worker_id IS NOT NULL
               AND current.stage IN ('Import Started', 'Import Preprocessing') THEN
                -- A retry of a running order would leave it 'Import Pending' with a worker
                -- attached, and the run would then drop it: refuse it (once per statement,
                -- which fires this for every row of the uuid) and restore the running state.
                IF current_setting('biomero_importer.refused', true)
                   IS DISTINCT FROM NEW.uuid THEN
                    PERFORM set_config('biomero_importer.refused', NEW.uuid, true);
                    INSERT INTO imports (group_name, user_name, destination_id,
                                         destination_type, stage, uuid, files, file_names,
                                         description, preprocessing_id, timestamp,
                                         import_options)
                    SELECT group_name, user_name, destination_id, destination_type,
                           current.stage, uuid, files, file_names,
                           'Retry refused: this order is running; cancel it first or wait'
                           || ' until it ends', preprocessing_id, clock_timestamp(),
                           import_options
                    FROM imports WHERE id = current.latest_id;
                END IF;
                RETURN NULL;
            END IF;
"""
TRACK_ORDER = PREVIOUS_TRACK_ORDER.replace(_RETRY_BRANCH, _RETRY_BRANCH + _REFUSAL)


def upgrade() -> None:
    op.execute(TRACK_ORDER)
    op.create_index(
        "importer_orders_ix_cancel_pending",
        "importer_orders",
        ["uuid"],
        postgresql_where=sa.text(
            "stage = 'Import Pending' AND worker_id IS NULL AND cancel_requested"
        ),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index("importer_orders_ix_cancel_pending", table_name="importer_orders", if_exists=True)
    op.execute(PREVIOUS_TRACK_ORDER)
