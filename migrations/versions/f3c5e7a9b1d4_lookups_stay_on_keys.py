"""The insert triggers, the claim and the ending never plan a scan of the whole queue for a key.

Revision ID: f3c5e7a9b1d4
Revises: d1f3a5c7e9b2
Create Date: 2026-12-04

A session plans the statements of a plpgsql function at their first calls and keeps those
plans until the tables' statistics change (ANALYZE). With the statistics of a young queue (a
few dozen rows on one page), a sequential scan is the cheapest plan for a lookup by uuid or
by history id, and it stays while the tables grow: a client that then inserts a burst on one
connection (an ``executemany``, a web application's pool, one transaction of many orders)
reads the whole queue table twice and the whole history table once for every order it
inserts, so the burst costs N² row reads; a replica that claimed during that time did the
same for every claim. Measured on PostgreSQL 15: 10,000 orders inserted on one connection
after statistics of 50 rows took 726 µs each, against 159 µs after statistics of 1,000.

Every lookup these functions make has an index to use, so each function now runs with
``enable_seqscan = off``: its plans are made with sequential scans priced out. The setting
is the function's own (restored when it returns, as ``enable_sort`` already is for
``importer_refresh_user``), and it covers the functions and triggers they call. A scan no
index can serve (a transition table, the replicas' channel list) is still planned as before.

With it goes ``jit = off``. PostgreSQL prices a disabled scan it cannot avoid at 10^10, far
past ``jit_above_cost``, so on a server built with JIT (Debian's PostgreSQL 15 here) each such
statement was compiled again at every execution: the ending's stage trigger took 83 ms per
order in ``importer_owed_channels``, and a drain fell from thousands of orders a second to 14.
JIT never pays for statements that read a handful of rows.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "f3c5e7a9b1d4"
down_revision: str | None = "d1f3a5c7e9b2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The ending becomes a function: a prepared statement keeps its generic plan the same way
# (seen on PostgreSQL 16: ten scans of the queue per ending batch), and only a function can
# carry the setting. Its body is the statement the store sent until this revision
# (FINISH_MANY in db/sql.py), with the same parameter numbers.
FINISH = """
CREATE FUNCTION importer_finish(text[], text[], text[], text[], text[], varchar, float8[],
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
        WHERE o.worker_id = $6
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
        WHERE o.uuid = d.uuid AND o.worker_id = $6 AND o.runs = a.run
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
FINISH_SIGNATURE = (
    "importer_finish(text[], text[], text[], text[], text[], varchar, float8[], boolean[],"
    " boolean[], text[], integer[])"
)

# the entry points: a client's insert or retry, and the claim
FUNCTIONS = (
    "importer_track_inserts()",
    "importer_track_order()",
    "importer_claim(integer, varchar, float8, integer)",
)


def upgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} SET enable_seqscan = off")
        op.execute(f"ALTER FUNCTION {function} SET jit = off")
    op.execute(FINISH)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {FINISH_SIGNATURE}")
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} RESET enable_seqscan")
        op.execute(f"ALTER FUNCTION {function} RESET jit")
