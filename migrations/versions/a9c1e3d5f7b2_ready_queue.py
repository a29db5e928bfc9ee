"""A queue of ready orders: claims cost the slots, not the waits, the users or the history.

Revision ID: a9c1e3d5f7b2
Revises: f4a7c2e9b1d3
Create Date: 2026-12-01

Until here the claim walked ``importer_orders_ix_pending_user`` user by user and skipped, row by
row, every order that was waiting (``not_before`` ahead) or whose cancel was requested: with
every order waiting (OMERO down) one claim read every pending entry, and with many users it
read one probe per user. Now:

- ``waiting``: the order was handed back to wait (``not_before`` is its due time,
  ``wait_cause`` what it waits for: 'omero', 'storage', 'container_runtime'). A due wait is
  made ready again by a bounded statement (the claim's first step), and ``wake_waiting``
  makes every order waiting on one cause ready when that cause answers again.
- A *ready* order is ``stage = 'Import Pending' AND worker_id IS NULL AND NOT
  cancel_requested AND NOT waiting``; only ready orders are in ``importer_orders_ix_ready``.
- ``queue_seq`` breaks ties between equal ``queued_at`` (one INSERT of many orders gives them
  all the same ``now()``); both stay what they were when the order was queued, through every
  hand-back (a wait, a shutdown, a recovered lease): the order keeps its place. A finished
  order queued again (retry) goes to the back.
- ``importer_users`` holds, per user, the oldest ready order (its time, seq and group): the
  head of that user's FIFO. ``importer_refresh_user`` recomputes it under the user row's
  lock whenever a ready order of the user appears or goes, from any writer (triggers).
- ``importer_claim`` is the fair claim as one function: it promotes due waits, then takes
  one order at a time: the head of the user with the fewest running orders, then of the
  group with the fewest, then the oldest head; each pick locks the user row (SKIP LOCKED)
  and recounts the user's running orders under that lock, so ``max_running_per_user`` is
  exact across replicas. It appends the 'Import Started' rows in the same statement.
- ``importer_track_order``: a hand-back keeps ``queued_at``; a wait's 'Import Pending' row
  wakes nobody (no NOTIFY); the documented SQL retry of a waiting order makes it due at once
  and appends one row that says so.
- The cancel sweep's index is ordered by ``queue_seq``, so its batch is the oldest first.

Existing orders are adopted: pending orders whose ``not_before`` lies ahead are waiting, every
order gets a ``queue_seq`` in ``queued_at`` order, and every user with pending orders a row.
The SQL is frozen here, as this revision first ran it: the application's ``db/sql.py`` may
change; ``migrations/schema.sql`` shows the resulting schema in one file.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a9c1e3d5f7b2"
down_revision: str | None = "f4a7c2e9b1d3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READY = "stage = 'Import Pending' AND worker_id IS NULL AND NOT cancel_requested AND NOT waiting"
WAITING = "stage = 'Import Pending' AND worker_id IS NULL AND waiting"


def _ready(row: str) -> str:
    return (
        f"({row}.stage = 'Import Pending' AND {row}.worker_id IS NULL"
        f" AND NOT {row}.cancel_requested AND NOT {row}.waiting)"
    )


TRACK_ORDER = """
CREATE OR REPLACE FUNCTION importer_track_order() RETURNS trigger
LANGUAGE plpgsql AS $$
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

# Waiting ends when the order is claimed or ends; a cause belongs to a wait only.
ORDER_WAIT = """
CREATE OR REPLACE FUNCTION importer_order_wait() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.worker_id IS NOT NULL OR NEW.stage IN ('Import Completed', 'Import Failed') THEN
        NEW.waiting := false;
    END IF;
    IF NOT NEW.waiting THEN
        NEW.wait_cause := NULL;
    END IF;
    RETURN NEW;
END;
$$;
"""

REFRESH_USER = f"""
CREATE OR REPLACE FUNCTION importer_refresh_user(
    name varchar, lost_at timestamptz, lost_seq bigint, gained_at timestamptz,
    gained_seq bigint, gained_group varchar
) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    known importer_users%ROWTYPE;
    at timestamptz;
    seq bigint;
    grp varchar;
BEGIN
    -- The scans name the user as a range, not an equality, and order by the whole key of
    -- importer_orders_ix_ready: only that index gives this order without a sort, so no plan
    -- walks importer_orders_ix_pending (every pending order) instead.
    -- Lock first, then read: every change to a user's ready orders passes here under this
    -- lock, and each statement of this function reads a fresh snapshot, so each sees the
    -- head as the changes committed before it left it, and applies its own.
    SELECT * INTO known FROM importer_users u WHERE u.user_name = name FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO importer_users (user_name) VALUES (name) ON CONFLICT DO NOTHING;
        SELECT * INTO known FROM importer_users u WHERE u.user_name = name FOR UPDATE;
    END IF;
    IF gained_seq IS NOT NULL THEN
        -- an order became ready: the head unless the head is older
        IF known.head_seq IS NOT NULL
           AND (known.head_queued_at, known.head_seq) <= (gained_at, gained_seq) THEN
            RETURN;
        END IF;
        at := gained_at;
        seq := gained_seq;
        grp := gained_group;
    ELSIF lost_seq IS NOT NULL THEN
        -- a ready order went (claimed, cancelled, waiting): only the head's going matters,
        -- and the next head comes after it (the scan starts there, past the entries this
        -- transaction's own earlier claims left behind)
        IF (known.head_queued_at, known.head_seq) IS DISTINCT FROM (lost_at, lost_seq) THEN
            RETURN;
        END IF;
        SELECT o.queued_at, o.queue_seq, o.group_name INTO at, seq, grp
        FROM importer_orders o
        WHERE {_ready("o")}
          AND (o.user_name, o.queued_at, o.queue_seq) > (name, lost_at, lost_seq)
          AND o.user_name <= name
        ORDER BY o.user_name, o.queued_at, o.queue_seq
        LIMIT 1;
    ELSE
        SELECT o.queued_at, o.queue_seq, o.group_name INTO at, seq, grp
        FROM importer_orders o
        WHERE {_ready("o")} AND o.user_name >= name AND o.user_name <= name
        ORDER BY o.user_name, o.queued_at, o.queue_seq
        LIMIT 1;
    END IF;
    IF (known.head_queued_at, known.head_seq, known.head_group)
       IS DISTINCT FROM (at, seq, grp) THEN
        UPDATE importer_users u SET head_queued_at = at, head_seq = seq, head_group = grp
        WHERE u.user_name = name;
    END IF;
END;
$$;
"""

ORDER_READY = f"""
CREATE OR REPLACE FUNCTION importer_order_ready() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    was_ready boolean := false;
    is_ready boolean := false;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        was_ready := {_ready("OLD")};
    END IF;
    IF TG_OP <> 'DELETE' THEN
        is_ready := {_ready("NEW")};
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.user_name <> OLD.user_name OR (was_ready AND is_ready)) THEN
        -- a ready order moved (its user, place or group written by hand): recompute
        PERFORM importer_refresh_user(OLD.user_name, NULL, NULL, NULL, NULL, NULL);
        IF NEW.user_name <> OLD.user_name THEN
            PERFORM importer_refresh_user(NEW.user_name, NULL, NULL, NULL, NULL, NULL);
        END IF;
    ELSIF was_ready THEN
        PERFORM importer_refresh_user(OLD.user_name, OLD.queued_at, OLD.queue_seq,
                                      NULL, NULL, NULL);
    ELSIF is_ready THEN
        PERFORM importer_refresh_user(NEW.user_name, NULL, NULL, NEW.queued_at,
                                      NEW.queue_seq, NEW.group_name);
    END IF;
    RETURN NULL;
END;
$$;
"""

ORDERS_INSERTED = """
CREATE OR REPLACE FUNCTION importer_orders_inserted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- users in name order: two bulk inserts lock their user rows in the same order
    PERFORM importer_refresh_user(n.user_name, NULL, NULL, NULL, NULL, NULL)
    FROM (SELECT DISTINCT i.user_name FROM inserted i WHERE i.stage = 'Import Pending'
          ORDER BY i.user_name) n;
    RETURN NULL;
END;
$$;
"""

# The wake-up channel is the one the insert trigger notifies (``migrate`` points it at the
# configured channel), so statements that make orders due need not be told it.
CHANNEL = """
CREATE OR REPLACE FUNCTION importer_channel() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT convert_from(substring(t.tgargs FROM 1 FOR position('\\x00'::bytea IN t.tgargs) - 1),
                        'UTF8')
    FROM pg_trigger t
    WHERE t.tgname = 'importer_track_insert' AND t.tgrelid = 'imports'::regclass
$$;
"""

CLAIM = f"""
CREATE OR REPLACE FUNCTION importer_claim(
    slots integer, worker varchar, lease_seconds double precision, max_running integer
) RETURNS TABLE (
    uuid varchar, group_name varchar, user_name varchar, destination_id varchar,
    destination_type varchar, files text, file_names text, preprocessing_id integer,
    container varchar, input_file varchar, output_folder varchar, alt_output_folder varchar,
    extra_params text, import_options text, attempts integer, runs integer, objects text,
    queued_at double precision, retries integer, waiting_since double precision,
    not_before double precision
)
LANGUAGE plpgsql AS $$
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
    skipped varchar[] := '{{}}';
    chosen varchar;
    running_now integer;
    picked varchar;
    claimed record;
    taken integer := 0;
    tries integer := 0;
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

    SELECT COALESCE(array_agg(r.user_name), '{{}}'), COALESCE(array_agg(r.n), '{{}}')
    INTO run_users, run_counts
    FROM (SELECT o.user_name, count(*)::integer AS n FROM importer_orders o
          WHERE o.worker_id IS NOT NULL GROUP BY o.user_name) r;
    SELECT COALESCE(array_agg(r.group_name), '{{}}'), COALESCE(array_agg(r.n), '{{}}')
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
        SELECT o.uuid INTO picked FROM importer_orders o
        WHERE {_ready("o")}
          AND (o.user_name, o.queued_at, o.queue_seq) >= (chosen, h_at, h_seq)
          AND o.user_name <= chosen
        ORDER BY o.user_name, o.queued_at, o.queue_seq
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        -- this user may have more to give in a later step
        skipped := skipped[1:array_length(skipped, 1) - 1];

        UPDATE importer_orders o
        SET worker_id = worker,
            last_worker_id = worker,
            lease_expires_at = now() + make_interval(secs => lease_seconds),
            attempts = o.attempts + 1,
            runs = o.runs + 1,
            updated_at = now()
        WHERE o.uuid = picked
        RETURNING o.latest_id, o.group_name, o.attempts, o.runs, o.objects::text AS objects,
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
            INSERT INTO imports (group_name, user_name, destination_id, destination_type,
                                 stage, uuid, files, file_names, description,
                                 preprocessing_id, timestamp, import_options)
            SELECT i.group_name, i.user_name, i.destination_id, i.destination_type,
                   'Import Started', i.uuid, i.files, i.file_names, NULL, i.preprocessing_id,
                   clock_timestamp(), i.import_options
            FROM imports i WHERE i.id = claimed.latest_id
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

TRIGGERS = [
    "CREATE TRIGGER importer_order_wait BEFORE INSERT OR UPDATE ON importer_orders"
    " FOR EACH ROW WHEN (NEW.waiting OR NEW.wait_cause IS NOT NULL)"
    " EXECUTE FUNCTION importer_order_wait()",
    # every new pending order: its user has a row (so claims and promotions can lock it) and
    # its head; once per statement and user, so a bulk insert costs its users, not its rows
    "CREATE TRIGGER importer_order_ready_insert AFTER INSERT ON importer_orders"
    " REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT"
    " EXECUTE FUNCTION importer_orders_inserted()",
    # only what can move a user's head: progress and lease writes call nothing
    "CREATE TRIGGER importer_order_ready_update AFTER UPDATE ON importer_orders FOR EACH ROW"
    f" WHEN ({_ready('OLD')} IS DISTINCT FROM {_ready('NEW')}"
    " OR OLD.user_name IS DISTINCT FROM NEW.user_name"
    f" OR ({_ready('NEW')} AND (OLD.group_name, OLD.queued_at, OLD.queue_seq)"
    " IS DISTINCT FROM (NEW.group_name, NEW.queued_at, NEW.queue_seq)))"
    " EXECUTE FUNCTION importer_order_ready()",
    "CREATE TRIGGER importer_order_ready_delete AFTER DELETE ON importer_orders FOR EACH ROW"
    f" WHEN {_ready('OLD')} EXECUTE FUNCTION importer_order_ready()",
]

DROP_TRIGGERS = [
    "DROP TRIGGER IF EXISTS importer_order_wait ON importer_orders",
    "DROP TRIGGER IF EXISTS importer_order_ready_insert ON importer_orders",
    "DROP TRIGGER IF EXISTS importer_order_ready_update ON importer_orders",
    "DROP TRIGGER IF EXISTS importer_order_ready_delete ON importer_orders",
]


def upgrade() -> None:
    op.add_column(
        "importer_orders",
        sa.Column("waiting", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )
    op.add_column("importer_orders", sa.Column("wait_cause", sa.String(), nullable=True))
    op.execute("CREATE SEQUENCE IF NOT EXISTS importer_orders_queue_seq")
    op.add_column("importer_orders", sa.Column("queue_seq", sa.BigInteger(), nullable=True))
    # adoption: places in queue order; waits whose time lies ahead keep waiting
    op.execute(
        """
        UPDATE importer_orders o SET queue_seq = q.seq
        FROM (SELECT uuid, nextval('importer_orders_queue_seq') AS seq
              FROM (SELECT uuid FROM importer_orders ORDER BY queued_at, uuid) ordered) q
        WHERE o.uuid = q.uuid
        """
    )
    op.execute(
        f"UPDATE importer_orders SET waiting = true WHERE {READY.replace(' AND NOT waiting', '')}"
        " AND not_before > now()"
    )
    op.alter_column(
        "importer_orders",
        "queue_seq",
        nullable=False,
        server_default=sa.text("nextval('importer_orders_queue_seq')"),
    )
    op.execute("ALTER SEQUENCE importer_orders_queue_seq OWNED BY importer_orders.queue_seq")
    op.create_table(
        "importer_users",
        sa.Column("user_name", sa.String(), primary_key=True),
        sa.Column("head_queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("head_seq", sa.BigInteger(), nullable=True),
        sa.Column("head_group", sa.String(), nullable=True),
    )
    op.create_index(
        "importer_users_ix_head",
        "importer_users",
        ["head_group", "head_queued_at", "head_seq"],
        postgresql_where=sa.text("head_seq IS NOT NULL"),
    )
    op.drop_index("importer_orders_ix_pending_user", table_name="importer_orders", if_exists=True)
    op.create_index(
        "importer_orders_ix_ready",
        "importer_orders",
        ["user_name", "queued_at", "queue_seq"],
        postgresql_where=sa.text(READY),
    )
    op.create_index(
        "importer_orders_ix_waiting",
        "importer_orders",
        ["not_before", "queue_seq"],
        postgresql_where=sa.text(WAITING),
    )
    op.create_index(
        "importer_orders_ix_wait_cause",
        "importer_orders",
        ["wait_cause", "queued_at", "queue_seq"],
        postgresql_where=sa.text(f"{WAITING} AND wait_cause IS NOT NULL"),
    )
    op.drop_index("importer_orders_ix_cancel_pending", table_name="importer_orders", if_exists=True)
    op.create_index(
        "importer_orders_ix_cancel_pending",
        "importer_orders",
        ["queue_seq"],
        postgresql_where=sa.text(
            "stage = 'Import Pending' AND worker_id IS NULL AND cancel_requested"
        ),
    )
    functions = (
        TRACK_ORDER,
        ORDER_WAIT,
        REFRESH_USER,
        ORDER_READY,
        ORDERS_INSERTED,
        CHANNEL,
        CLAIM,
    )
    for function in functions:
        op.execute(function)
    for statement in DROP_TRIGGERS + TRIGGERS:
        op.execute(statement)
    op.execute(
        "SELECT importer_refresh_user(n.user_name, NULL, NULL, NULL, NULL, NULL)"
        " FROM (SELECT DISTINCT user_name"
        " FROM importer_orders WHERE stage = 'Import Pending') n"
    )


def downgrade() -> None:
    raise NotImplementedError("a9c1e3d5f7b2 cannot be downgraded: restore a backup instead")
