"""Triggers stop running for rows the importer's own statements already applied.

Revision ID: c9e1f3a5b7d0
Revises: b5d7f9a1c3e6
Create Date: 2026-12-03

A claim and an ending write the queue row and its history row themselves (d8f0b2c4e6a5), yet
each of their orders still ran three plpgsql triggers that could only return at once:

- ``importer_track_insert`` (AFTER INSERT ON imports, per row) locked the queue row to find
  it already pointing at the row. It is now a statement trigger: one look for the whole
  statement finds the rows no queue row names yet (``latest_id`` only grows, so a row
  applied at that look stays applied) and runs the same steps for those alone, in id order.
  A client's insert still takes the same steps, row by row. The retry trigger keeps
  ``importer_track_order``, which now holds its half alone.
- ``importer_order_owner`` on UPDATE OF latest_id copied the names of a row that a claim or
  an ending inserts after the update (a copy of the previous row, same names): it now runs
  only when the update leaves the worker as it was, which a claim, an ending or a recovery
  never does. On INSERT it runs as before.
- ``importer_order_stage_changed`` did nothing for 'Import Started' and 'Import
  Preprocessing': its WHEN now leaves them out.

In the dispatch benchmark (pg_stat_statements, 11,000 orders) the lookups these calls made
took 18 µs per order, besides the five plpgsql calls themselves. The SQL is frozen here;
the downgrade restores the previous revisions' triggers and function.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "c9e1f3a5b7d0"
down_revision: str | None = "b5d7f9a1c3e6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRACK_INSERTS = """
CREATE OR REPLACE FUNCTION importer_track_inserts() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    current importer_orders%ROWTYPE;
    note text;
    requeued boolean;
BEGIN
    -- A row the queue row names (or a later one) was applied by its writer: a claim, an
    -- ending. latest_id only grows, so one look before the steps is enough to leave those.
    -- (A lookup per row by the queue's key: planned as a join, the look read the whole
    -- queue, not knowing how few rows a statement inserts.)
    FOR r IN
        SELECT n.id, n.uuid, n.stage FROM inserted n
        WHERE n.id > COALESCE((SELECT o.latest_id FROM importer_orders o
                               WHERE o.uuid = n.uuid), 0)
        ORDER BY n.id
    LOOP
        SELECT * INTO current FROM importer_orders WHERE uuid = r.uuid FOR UPDATE;
        IF NOT FOUND THEN
            INSERT INTO importer_orders (uuid, stage, latest_id) VALUES (r.uuid, r.stage, r.id)
            ON CONFLICT (uuid) DO UPDATE SET stage = EXCLUDED.stage,
                                             latest_id = EXCLUDED.latest_id
            WHERE importer_orders.latest_id < EXCLUDED.latest_id;
        ELSIF current.latest_id >= r.id THEN
            -- applied since the look (an earlier row of this statement, a writer we waited for)
            CONTINUE;
        ELSIF r.stage = 'Import Pending' AND (
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
            INSERT INTO imports (group_name, user_name, destination_id, destination_type,
                                 stage, uuid, files, file_names, description,
                                 preprocessing_id, timestamp, import_options)
            SELECT group_name, user_name, destination_id, destination_type, stage, uuid,
                   files, file_names, note, preprocessing_id, clock_timestamp(),
                   import_options
            FROM imports WHERE id = current.latest_id;
            CONTINUE;
        ELSE
            -- Only a finished order queued again (a retry) takes a new place in the queue; a
            -- hand-back (a wait, a shutdown, a recovered lease) keeps the one it had.
            requeued := r.stage = 'Import Pending'
                        AND current.stage IN ('Import Completed', 'Import Failed');
            UPDATE importer_orders SET
                stage = r.stage,
                latest_id = r.id,
                updated_at = now(),
                queued_at = CASE WHEN requeued THEN now() ELSE queued_at END,
                queue_seq = CASE WHEN requeued THEN nextval('importer_orders_queue_seq')
                                 ELSE queue_seq END,
                attempts = CASE WHEN requeued THEN 0 ELSE attempts END,
                cancel_requested = CASE WHEN requeued THEN false ELSE cancel_requested END
            WHERE uuid = r.uuid;
        END IF;
        -- A wait wakes nobody: whoever makes it due (the claim's promotion, wake_waiting, a
        -- retry) wakes the claimers.
        IF r.stage = 'Import Pending' AND NOT COALESCE(current.waiting, false) THEN
            PERFORM pg_notify(TG_ARGV[0], r.uuid);
        END IF;
    END LOOP;
    RETURN NULL;
END;
$$;
"""

# The retry trigger's half of d8f0b2c4e6a5's function, unchanged.
TRACK_ORDER = """
CREATE OR REPLACE FUNCTION importer_track_order() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    current importer_orders%ROWTYPE;
BEGIN
    -- The documented manual retry rewrites every row of the uuid to 'Import Pending'.
    -- This fires for each of them; only the first changes the queue row.
    IF OLD.stage IS DISTINCT FROM 'Import Pending' THEN
        SELECT * INTO current FROM importer_orders WHERE uuid = NEW.uuid FOR UPDATE;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        IF current.worker_id IS NOT NULL
           AND current.stage IN ('Import Started', 'Import Preprocessing') THEN
            -- A retry of a running order would leave it 'Import Pending' with a worker
            -- attached, and the run would then drop it: refuse it (once per statement)
            -- and restore the running state.
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
        IF current.stage <> 'Import Pending' THEN
            -- a finished order (or one the original importer left running) goes to the
            -- back of the queue with a fresh attempt count
            UPDATE importer_orders SET
                stage = 'Import Pending', queued_at = now(),
                queue_seq = nextval('importer_orders_queue_seq'), updated_at = now(),
                attempts = CASE WHEN stage IN ('Import Completed', 'Import Failed')
                                THEN 0 ELSE attempts END,
                cancel_requested = false
            WHERE uuid = NEW.uuid;
            PERFORM pg_notify(TG_ARGV[0], NEW.uuid);
        ELSIF current.waiting THEN
            -- a waiting order is due at once (keeping its place); the row appended here
            -- says so, and its insert wakes the claimers
            UPDATE importer_orders SET waiting = false, not_before = LEAST(not_before, now())
            WHERE uuid = NEW.uuid;
            INSERT INTO imports (group_name, user_name, destination_id, destination_type,
                                 stage, uuid, files, file_names, description,
                                 preprocessing_id, timestamp, import_options)
            SELECT group_name, user_name, destination_id, destination_type,
                   'Import Pending', uuid, files, file_names,
                   'Retried: no longer waiting, due now', preprocessing_id,
                   clock_timestamp(), import_options
            FROM imports WHERE id = current.latest_id;
        END IF;
    END IF;
    RETURN NULL;
END;
$$;
"""


def _insert_trigger(function: str, level: str) -> str:
    """(Re)create the insert trigger on the channel it names now (``migrate`` may have pointed
    it at a configured one): importer_channel() reads it from the trigger itself."""
    return f"""
DO $$
DECLARE
    channel text := COALESCE(importer_channel(), 'biomero_importer_orders');
BEGIN
    DROP TRIGGER IF EXISTS importer_track_insert ON imports;
    EXECUTE format('CREATE TRIGGER importer_track_insert AFTER INSERT ON imports {level}'
                   ' EXECUTE FUNCTION {function}(%L)', channel);
END;
$$;
"""


STATEMENT_LEVEL = "REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT"
OWNER_ON_INSERT = (
    "CREATE TRIGGER importer_order_owner BEFORE INSERT"
    " ON importer_orders FOR EACH ROW EXECUTE FUNCTION importer_order_owner()"
)
OWNER_ON_MOVE = (
    "CREATE TRIGGER importer_order_owner_moved BEFORE UPDATE OF latest_id ON importer_orders"
    " FOR EACH ROW WHEN (OLD.worker_id IS NOT DISTINCT FROM NEW.worker_id)"
    " EXECUTE FUNCTION importer_order_owner()"
)
STAGE_TRIGGER = (
    "CREATE TRIGGER importer_order_stage_changed BEFORE UPDATE OF stage ON importer_orders"
    " FOR EACH ROW WHEN (OLD.stage IS DISTINCT FROM NEW.stage"
    " AND NEW.stage NOT IN ('Import Started', 'Import Preprocessing'))"
    " EXECUTE FUNCTION importer_order_stage_changed()"
)


def _frozen(revision_id: str, name: str) -> str:
    """SQL an earlier revision froze, from its module as alembic loaded it for this run (a
    revision imports no application code, so each keeps this look-up itself)."""
    script = op.get_context().script
    found = None if script is None else script.get_revision(revision_id)
    if found is None:
        raise RuntimeError(f"revision {revision_id} is not in this migration run's scripts")
    sql: str = getattr(found.module, name)
    return sql


def upgrade() -> None:
    op.execute(TRACK_INSERTS)
    op.execute(_insert_trigger("importer_track_inserts", STATEMENT_LEVEL))
    op.execute(TRACK_ORDER)
    op.execute("DROP TRIGGER IF EXISTS importer_order_owner ON importer_orders")
    op.execute(OWNER_ON_INSERT)
    op.execute(OWNER_ON_MOVE)
    op.execute("DROP TRIGGER IF EXISTS importer_order_stage_changed ON importer_orders")
    op.execute(STAGE_TRIGGER)


def downgrade() -> None:
    op.execute(_frozen("d8f0b2c4e6a5", "TRACK_ORDER"))
    op.execute(_insert_trigger("importer_track_order", "FOR EACH ROW"))
    op.execute("DROP FUNCTION IF EXISTS importer_track_inserts()")
    op.execute("DROP TRIGGER IF EXISTS importer_order_owner_moved ON importer_orders")
    op.execute("DROP TRIGGER IF EXISTS importer_order_owner ON importer_orders")
    op.execute(_frozen("e8b3f5a2c7d1", "OWNER_TRIGGER"))
    op.execute("DROP TRIGGER IF EXISTS importer_order_stage_changed ON importer_orders")
    op.execute(_frozen("f4a7c2e9b1d3", "STAGE_TRIGGER"))
