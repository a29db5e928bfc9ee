"""An ending clears its orders' waits and queues their notifications itself, once per call.

Revision ID: d0f2b4c6e8a1
Revises: b8d0f2a4c6e8
Create Date: 2026-12-04

The stage trigger (``importer_order_stage_changed``) ran once for every order an ending
ended: a plpgsql call that cleared the order's progress and waits and looked up the channels
owed a notification (``importer_owed_channels``), then queued the outcome. In
``benchmarks/ending.py`` (endings of 16, 64 orders in flight) an ending cost 73-74 µs per order
with no channel owed and 123-186 with two; with this revision 64-67 and 97-143, the same outbox
rows written (embedded PostgreSQL 16; the drift of the machine is in the ranges).

``importer_finish`` now does that work for all its orders at once: its update clears the
progress, and for an ended order ``not_before``, ``waiting_since`` and ``retries``, as the
trigger did; it looks the owed channels up once per call and queues the outcomes of the orders
it ended in one insert each into the outbox and its delivery rows. It runs with its own
setting ``biomero_importer.finishing = on``, which the trigger's condition now reads, so the
trigger leaves the ending's rows (and the hand-backs that ``importer_track_inserts`` applies
inside it) alone. Every other writer of a stage (a cancel, a recovery, a client's own row)
still meets the trigger.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import context, op

revision: str = "d0f2b4c6e8a1"
down_revision: str | None = "b8d0f2a4c6e8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINISH = """
CREATE OR REPLACE FUNCTION importer_finish(text[], text[], text[], text[], text[], varchar, float8[],
                                boolean[], boolean[], text[], integer[])
RETURNS TABLE (uuid varchar, runs integer)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
SET biomero_importer.finishing = on
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH args AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                             $7::float8[], $8::bool[], $9::bool[], $10::text[], $11::int[])
            AS a(uuid, stage, description, file_names, objects, delay, transient_retry, settling,
                 wait_cause, run)
    ),
    seen AS (
        SELECT o.uuid, o.latest_id FROM importer_orders o WHERE o.uuid = ANY($1::text[])
    ),
    owned AS (
        SELECT o.uuid, s.latest_id AS previous_id,
               a.stage IN ('Import Completed', 'Import Failed') AS ends
        FROM importer_orders o JOIN args a ON a.uuid = o.uuid AND a.run = o.runs
            JOIN seen s ON s.uuid = o.uuid
        WHERE COALESCE(o.worker_id = $6, false)
        FOR UPDATE OF o
    ),
    ids AS (
        SELECT w.uuid, w.previous_id,
               CASE WHEN w.ends THEN nextval(pg_get_serial_sequence('imports', 'id'))::integer
               END AS ended_id
        FROM owned w
    ),
    released AS (
        UPDATE importer_orders o
        SET stage = CASE WHEN d.ended_id IS NULL THEN o.stage ELSE a.stage END,
            latest_id = COALESCE(d.ended_id, o.latest_id),
            updated_at = CASE WHEN d.ended_id IS NULL THEN o.updated_at ELSE now() END,
            worker_id = NULL,
            lease_expires_at = NULL,
            objects = COALESCE(a.objects::json, o.objects),
            attempts = o.attempts - CASE WHEN a.stage = 'Import Pending' THEN 1 ELSE 0 END,
            not_before = CASE WHEN d.ended_id IS NOT NULL OR a.delay IS NULL THEN NULL
                              ELSE now() + make_interval(secs => a.delay) END,
            waiting = a.delay IS NOT NULL,
            wait_cause = CASE WHEN a.delay IS NULL THEN NULL ELSE a.wait_cause END,
            retries = CASE WHEN d.ended_id IS NOT NULL THEN 0
                           ELSE o.retries + CASE WHEN a.transient_retry THEN 1 ELSE 0 END END,
            waiting_since = CASE WHEN d.ended_id IS NULL AND a.settling
                                 THEN COALESCE(o.waiting_since, now()) END,
            progress = NULL,
            progress_at = NULL
        FROM ids d JOIN args a ON a.uuid = d.uuid
        WHERE o.uuid = d.uuid AND COALESCE(o.worker_id = $6, false) AND o.runs = a.run
        RETURNING o.uuid, o.runs, d.previous_id, d.ended_id
    ),
    written AS (
        INSERT INTO imports (id, group_name, user_name, destination_id, destination_type,
                             stage, uuid, files, file_names, description, preprocessing_id,
                             timestamp, import_options)
        SELECT COALESCE(r.ended_id, nextval(pg_get_serial_sequence('imports', 'id'))),
               i.group_name, i.user_name, i.destination_id, i.destination_type, a.stage,
               i.uuid, i.files, COALESCE(a.file_names, i.file_names), a.description,
               i.preprocessing_id, clock_timestamp(), i.import_options
        FROM released r JOIN args a ON a.uuid = r.uuid AND a.run = r.runs
            JOIN imports i ON i.id = r.previous_id
    ),
    owed AS (
        SELECT importer_owed_channels() AS channels
    ),
    queued AS (
        INSERT INTO importer_outbox (uuid, event_id, stage)
        SELECT r.uuid, r.ended_id, a.stage
        FROM released r JOIN args a ON a.uuid = r.uuid AND a.run = r.runs CROSS JOIN owed w
        WHERE r.ended_id IS NOT NULL AND cardinality(w.channels) > 0
        ON CONFLICT (event_id) DO NOTHING
        RETURNING id
    ),
    delivered AS (
        INSERT INTO importer_outbox_delivery (outbox_id, channel)
        SELECT q.id, c FROM queued q CROSS JOIN owed w CROSS JOIN unnest(w.channels) c
    )
    SELECT released.uuid, released.runs FROM released;
END;
$$
"""


STAGE_TRIGGER = (
    "CREATE TRIGGER importer_order_stage_changed BEFORE UPDATE OF stage ON importer_orders"
    " FOR EACH ROW WHEN (OLD.stage IS DISTINCT FROM NEW.stage"
    " AND NEW.stage NOT IN ('Import Started', 'Import Preprocessing'){finishing})"
    " EXECUTE FUNCTION importer_order_stage_changed()"
)
# the ending's rows: importer_finish has done the trigger's work for them
NOT_FINISHING = " AND current_setting('biomero_importer.finishing', true) IS DISTINCT FROM 'on'"


def upgrade() -> None:
    op.execute("DROP TRIGGER importer_order_stage_changed ON importer_orders")
    op.execute(STAGE_TRIGGER.format(finishing=NOT_FINISHING))
    op.execute(FINISH)


def downgrade() -> None:
    op.execute("DROP TRIGGER importer_order_stage_changed ON importer_orders")
    op.execute(STAGE_TRIGGER.format(finishing=""))
    # CREATE OR REPLACE keeps no setting the body does not name: the flag goes with it
    op.execute(_previous_finish())


def _previous_finish() -> str:
    """The ending as b8d0f2a4c6e8 made it, from that revision's own text."""
    previous = context.script.get_revision(down_revision).module
    return str(previous.FINISH.replace("{owned_by}", previous.OWNED_BY))
