"""The claim writes the queue row once per order: stage, latest row and lease together.

Revision ID: d8f0b2c4e6a5
Revises: c6e8a0b2d4f3
Create Date: 2026-12-02

Before, each pick of ``importer_claim`` updated the order's ``importer_orders`` row twice: once
for the lease (worker, attempts, runs), then again from ``importer_track_order`` when its
'Import Started' history row was inserted (stage, latest_id). Now the claim draws the history
row's id first (after it holds the row's lock, so no row committed meanwhile can be newer),
writes stage, latest_id and the lease in one update, and inserts the history row with that
id; ``importer_track_order`` returns at once for a row the queue row already points at (it
already returned for older ones). One update of the queue row and its indexes per claim
fewer. The SQL is frozen here, as this revision first ran it; the two functions are the
previous revisions' with these changes.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "d8f0b2c4e6a5"
down_revision: str | None = "c6e8a0b2d4f3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIM = """
CREATE OR REPLACE FUNCTION public.importer_claim(slots integer, worker character varying, lease_seconds double precision, max_running integer) RETURNS TABLE(uuid character varying, group_name character varying, user_name character varying, destination_id character varying, destination_type character varying, files text, file_names text, preprocessing_id integer, container character varying, input_file character varying, output_folder character varying, alt_output_folder character varying, extra_params text, import_options text, attempts integer, runs integer, objects text, queued_at double precision, retries integer, waiting_since double precision, not_before double precision)
    LANGUAGE plpgsql
    AS $$
#variable_conflict use_column
DECLARE
    promoted integer;
    -- running orders per user and per group, counted once, then kept by this claim's picks
    run_users varchar[];
    run_counts integer[];
    run_groups varchar[];
    group_counts integer[];
    slot integer;
    h_at timestamptz;
    h_seq bigint;
    skipped varchar[] := '{}';
    chosen varchar;
    running_now integer;
    picked varchar;
    claimed record;
    taken integer := 0;
    tries integer := 0;
    id_seq text := pg_get_serial_sequence('imports', 'id');
    previous_id integer;
    started_id integer;
BEGIN
    -- Due waits become ready: a bounded batch, oldest due first; orders or users another
    -- transaction holds are left for the next claim, so this never waits on a lock.
    WITH due AS (
        SELECT o.uuid, o.user_name FROM importer_orders o
        WHERE o.stage = 'Import Pending' AND o.worker_id IS NULL AND o.waiting
          AND o.not_before <= now()
        ORDER BY o.not_before, o.queue_seq
        LIMIT 100
        FOR UPDATE SKIP LOCKED
    ),
    owners AS (
        SELECT u.user_name FROM importer_users u
        WHERE u.user_name IN (SELECT d.user_name FROM due d)
        FOR UPDATE SKIP LOCKED
    )
    UPDATE importer_orders o SET waiting = false
    FROM due d
    WHERE o.uuid = d.uuid AND d.user_name IN (SELECT w.user_name FROM owners w);
    GET DIAGNOSTICS promoted = ROW_COUNT;
    IF promoted > 0 THEN
        PERFORM pg_notify(importer_channel(), 'due');
    END IF;

    SELECT COALESCE(array_agg(r.user_name), '{}'), COALESCE(array_agg(r.n), '{}')
    INTO run_users, run_counts
    FROM (SELECT o.user_name, count(*)::integer AS n FROM importer_orders o
          WHERE o.worker_id IS NOT NULL GROUP BY o.user_name) r;
    SELECT COALESCE(array_agg(r.group_name), '{}'), COALESCE(array_agg(r.n), '{}')
    INTO run_groups, group_counts
    FROM (SELECT o.group_name, count(*)::integer AS n FROM importer_orders o
          WHERE o.worker_id IS NOT NULL GROUP BY o.group_name) r;

    -- One order per step, each step counting the previous ones: the user
    -- with the fewest running orders, then the group of that user's head with the fewest,
    -- then the oldest head. Candidates: per group, the oldest head among users running
    -- nothing (one probe of importer_users_ix_head each, skipping running users), and the
    -- head of each user that runs something (the running orders are few: counted once
    -- above, from importer_orders_ix_leases).
    WHILE taken < slots AND tries < 3 * slots LOOP
        tries := tries + 1;
        -- A user running nothing goes before any user running something: the running
        -- users' heads are read only when no other user has an order ready.
        WITH RECURSIVE groups(head_group) AS (
            (SELECT u.head_group FROM importer_users u WHERE u.head_seq IS NOT NULL
             ORDER BY u.head_group LIMIT 1)
            UNION ALL
            SELECT (SELECT u.head_group FROM importer_users u
                    WHERE u.head_seq IS NOT NULL AND u.head_group > g.head_group
                    ORDER BY u.head_group LIMIT 1)
            FROM groups g WHERE g.head_group IS NOT NULL
        )
        SELECT h.user_name INTO chosen
        FROM groups g CROSS JOIN LATERAL (
            SELECT u.user_name, u.head_group, u.head_queued_at, u.head_seq
            FROM importer_users u
            WHERE u.head_group = g.head_group AND u.head_seq IS NOT NULL
              AND u.user_name <> ALL (skipped) AND u.user_name <> ALL (run_users)
            ORDER BY u.head_group, u.head_queued_at, u.head_seq
            LIMIT 1
        ) h
        LEFT JOIN unnest(run_groups, group_counts) AS gr(group_name, n)
            ON gr.group_name = h.head_group
        WHERE g.head_group IS NOT NULL AND (max_running IS NULL OR max_running > 0)
        ORDER BY COALESCE(gr.n, 0), h.head_queued_at, h.head_seq
        LIMIT 1;
        IF chosen IS NULL THEN
            SELECT u.user_name INTO chosen
            FROM unnest(run_users, run_counts) AS r(user_name, n)
            JOIN importer_users u ON u.user_name = r.user_name
            LEFT JOIN unnest(run_groups, group_counts) AS gr(group_name, n)
                ON gr.group_name = u.head_group
            WHERE u.head_seq IS NOT NULL AND (max_running IS NULL OR r.n < max_running)
              AND u.user_name <> ALL (skipped)
            ORDER BY r.n, COALESCE(gr.n, 0), u.head_queued_at, u.head_seq
            LIMIT 1;
        END IF;
        EXIT WHEN chosen IS NULL;
        skipped := skipped || chosen;

        -- Another claim holds this user: leave the user to it. Under the lock, the head is
        -- as every change committed before left it.
        SELECT u.head_queued_at, u.head_seq INTO h_at, h_seq FROM importer_users u
        WHERE u.user_name = chosen AND u.head_seq IS NOT NULL
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        IF max_running IS NOT NULL THEN
            -- counted under the user's lock, in a fresh snapshot: every claim of this
            -- user's orders holds that lock, so none is missed
            SELECT count(*) INTO running_now FROM importer_orders o
            WHERE o.user_name = chosen AND o.worker_id IS NOT NULL;
            CONTINUE WHEN running_now >= max_running;
        END IF;
        -- (a range over the user, as in importer_refresh_user: plans never walk another index)
        SELECT o.uuid, o.latest_id INTO picked, previous_id FROM importer_orders o
        WHERE (o.stage = 'Import Pending' AND o.worker_id IS NULL AND NOT o.cancel_requested AND NOT o.waiting)
          AND (o.user_name, o.queued_at, o.queue_seq) >= (chosen, h_at, h_seq)
          AND o.user_name <= chosen
        ORDER BY o.user_name, o.queued_at, o.queue_seq
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        -- this user may have more to give in a later step
        skipped := skipped[1:array_length(skipped, 1) - 1];

        -- The claim and its 'Import Started' row in one update of the queue row: the row's id
        -- is drawn first, so importer_track_order finds it already applied.
        started_id := nextval(id_seq);
        UPDATE importer_orders o
        SET stage = 'Import Started',
            latest_id = started_id,
            worker_id = worker,
            last_worker_id = worker,
            lease_expires_at = now() + make_interval(secs => lease_seconds),
            attempts = o.attempts + 1,
            runs = o.runs + 1,
            updated_at = now()
        WHERE o.uuid = picked
        RETURNING o.group_name, o.attempts, o.runs, o.objects::text AS objects,
                  extract(epoch FROM o.queued_at)::float8 AS queued_at, o.retries,
                  extract(epoch FROM o.waiting_since)::float8 AS waiting_since,
                  extract(epoch FROM o.not_before)::float8 AS not_before
        INTO claimed;
        taken := taken + 1;
        slot := array_position(run_users, chosen);
        IF slot IS NULL THEN
            run_users := run_users || chosen;
            run_counts := run_counts || 1;
        ELSE
            run_counts[slot] := run_counts[slot] + 1;
        END IF;
        slot := array_position(run_groups, claimed.group_name);
        IF slot IS NULL THEN
            run_groups := run_groups || claimed.group_name;
            group_counts := group_counts || 1;
        ELSE
            group_counts[slot] := group_counts[slot] + 1;
        END IF;

        RETURN QUERY
        WITH started AS (
            INSERT INTO imports (id, group_name, user_name, destination_id, destination_type,
                                 stage, uuid, files, file_names, description,
                                 preprocessing_id, timestamp, import_options)
            SELECT started_id, i.group_name, i.user_name, i.destination_id, i.destination_type,
                   'Import Started', i.uuid, i.files, i.file_names, NULL, i.preprocessing_id,
                   clock_timestamp(), i.import_options
            FROM imports i WHERE i.id = previous_id
            RETURNING *
        )
        SELECT s.uuid, s.group_name, s.user_name, s.destination_id, s.destination_type,
               s.files, s.file_names, s.preprocessing_id, p.container, p.input_file,
               p.output_folder, p.alt_output_folder, p.extra_params::text, s.import_options,
               claimed.attempts, claimed.runs, claimed.objects, claimed.queued_at,
               claimed.retries, claimed.waiting_since, claimed.not_before
        FROM started s LEFT JOIN imports_preprocessing p ON p.id = s.preprocessing_id;
    END LOOP;
END;
$$;
"""

TRACK_ORDER = """
CREATE OR REPLACE FUNCTION public.importer_track_order() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    current importer_orders%ROWTYPE;
    note text;
    requeued boolean;
BEGIN
    IF TG_OP = 'UPDATE' THEN
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
    END IF;

    SELECT * INTO current FROM importer_orders WHERE uuid = NEW.uuid FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO importer_orders (uuid, stage, latest_id) VALUES (NEW.uuid, NEW.stage, NEW.id)
        ON CONFLICT (uuid) DO UPDATE SET stage = EXCLUDED.stage, latest_id = EXCLUDED.latest_id
        WHERE importer_orders.latest_id < EXCLUDED.latest_id;
    ELSIF current.latest_id >= NEW.id THEN
        -- an older row, or this very row: its writer (a claim, an ending) already applied it
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
        -- Only a finished order queued again (a retry) takes a new place in the queue; a
        -- hand-back (a wait, a shutdown, a recovered lease) keeps the one it had.
        requeued := NEW.stage = 'Import Pending'
                    AND current.stage IN ('Import Completed', 'Import Failed');
        UPDATE importer_orders SET
            stage = NEW.stage,
            latest_id = NEW.id,
            updated_at = now(),
            queued_at = CASE WHEN requeued THEN now() ELSE queued_at END,
            queue_seq = CASE WHEN requeued THEN nextval('importer_orders_queue_seq')
                             ELSE queue_seq END,
            attempts = CASE WHEN requeued THEN 0 ELSE attempts END,
            cancel_requested = CASE WHEN requeued THEN false ELSE cancel_requested END
        WHERE uuid = NEW.uuid;
    END IF;
    -- A wait wakes nobody: whoever makes it due (the claim's promotion, wake_waiting, a
    -- retry) wakes the claimers.
    IF NEW.stage = 'Import Pending' AND NOT COALESCE(current.waiting, false) THEN
        PERFORM pg_notify(TG_ARGV[0], NEW.uuid);
    END IF;
    RETURN NULL;
END;
$$;
"""


def upgrade() -> None:
    op.execute(CLAIM)
    op.execute(TRACK_ORDER)


def downgrade() -> None:
    raise NotImplementedError("d8f0b2c4e6a5 has no downgrade: restore a backup taken before it")
