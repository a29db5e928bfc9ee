"""The ending finds the orders it ends by their keys, however many other orders are running.

Revision ID: b8d0f2a4c6e8
Revises: a7c9e1b3d5f6
Create Date: 2026-12-04

After five calls a session may keep a generic plan of the ending's statement
(``importer_finish``), one made without the call's values. Its estimates come from the
statistics: taken while no order was running (a quiet spell, a young queue; autovacuum takes
them whenever it likes), they say every ``worker_id`` is NULL, so ``worker_id = $6`` looks like
one row. The kept plan then found the ending's orders by walking every lease in
``importer_orders_ix_leases`` and comparing each lease with each order the call ended: its
cost grew with the orders running on every replica, not with the ones it ended. Measured on
PostgreSQL 15 with 6,400 orders running: an ending of 32 took 50 ms instead of 3.

The test that the worker still owns an order is now ``COALESCE(o.worker_id = $6, false)``:
the same answer (an order nobody owns, or a NULL worker, is not owned), but PostgreSQL cannot
prove from it that ``worker_id IS NOT NULL``, the leases index's predicate, so no plan can walk
that index for it, and the orders are found by their primary key, as every other plan of the
ending finds them. The body is otherwise the one of revision f3c5e7a9b1d4.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "b8d0f2a4c6e8"
down_revision: str | None = "a7c9e1b3d5f6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# {owned_by}: the test that the caller ($6) owns the order (see above)
FINISH = """
CREATE OR REPLACE FUNCTION importer_finish(text[], text[], text[], text[], text[], varchar, float8[],
                                boolean[], boolean[], text[], integer[])
RETURNS TABLE (uuid varchar, runs integer)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
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
        WHERE {owned_by}
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
            not_before = CASE WHEN a.delay IS NULL THEN NULL
                              ELSE now() + make_interval(secs => a.delay) END,
            waiting = a.delay IS NOT NULL,
            wait_cause = CASE WHEN a.delay IS NULL THEN NULL ELSE a.wait_cause END,
            retries = o.retries + CASE WHEN a.transient_retry THEN 1 ELSE 0 END,
            waiting_since = CASE WHEN a.settling THEN COALESCE(o.waiting_since, now()) END
        FROM ids d JOIN args a ON a.uuid = d.uuid
        WHERE o.uuid = d.uuid AND {owned_by} AND o.runs = a.run
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
    )
    SELECT released.uuid, released.runs FROM released;
END;
$$
"""


# the owner test this revision makes (d0f2b4c6e8a1's downgrade builds this ending from it too)
OWNED_BY = "COALESCE(o.worker_id = $6, false)"


def upgrade() -> None:
    op.execute(FINISH.replace("{owned_by}", OWNED_BY))


def downgrade() -> None:
    op.execute(FINISH.replace("{owned_by}", "o.worker_id = $6"))
