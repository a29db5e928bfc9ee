"""Every SQL statement the service runs on its hot paths, in one place.

Stage rows are always appended (the ``imports`` table is event-sourced) by copying the order's
latest row, so any reader that takes the highest id of a uuid sees a complete row. Writes made
on behalf of a running order are fenced by its claim, ``worker_id`` and ``runs`` (the claim's
run number, raised by every claim): a replica that lost its lease writes nothing, and neither
does a run of its own that lost the order before the same replica claimed it again.
"""

from __future__ import annotations

from biomero_importer.model import CANCELLED

DEFAULT_CHANNEL = "biomero_importer_orders"
CANCEL_PREFIX = "cancel:"

ORDER_COLUMNS = (
    "group_name, user_name, destination_id, destination_type, stage, uuid,"
    " files, file_names, description, preprocessing_id, timestamp, import_options"
)


def _copy_latest(stage: str, description: str, file_names: str, source: str) -> str:
    """SELECT list that copies an order's latest row ``i`` with a new stage and description."""
    return (
        "SELECT i.group_name, i.user_name, i.destination_id, i.destination_type,"
        f" {stage}, i.uuid, i.files, {file_names}, {description}, i.preprocessing_id,"
        f" clock_timestamp(), i.import_options FROM {source}"
    )


_OWNED_LATEST = "importer_orders o JOIN imports i ON i.id = o.latest_id"
_PICKED_LATEST = "picked p JOIN imports i ON i.id = p.latest_id"


def _owned_by(worker: str, column: str = "worker_id") -> str:
    """How a worker's write to one order tests that the worker still owns it: the same answer
    as ``column = worker`` (a NULL on either side is no owner), but PostgreSQL cannot prove
    from it ``worker_id IS NOT NULL``, the predicate of importer_orders_ix_leases, so no plan
    finds the order by walking every running order's lease. The pool keeps these statements,
    and with statistics taken while nothing ran (worker_id all NULL) their generic plans did
    exactly that. The ending (importer_finish) tests the same way (revision b8d0f2a4c6e8)."""
    return f"COALESCE({column} = {worker}, false)"


def trigger_statements(channel: str) -> list[str]:
    """(Re)create the wake-up triggers for a notification channel."""
    return [
        "DROP TRIGGER IF EXISTS importer_track_insert ON imports",
        "DROP TRIGGER IF EXISTS importer_track_retry ON imports",
        "DROP TRIGGER IF EXISTS importer_cancel_requested ON importer_orders",
        "CREATE TRIGGER importer_track_insert AFTER INSERT ON imports"
        " REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT"
        f" EXECUTE FUNCTION importer_track_inserts('{channel}')",
        "CREATE TRIGGER importer_track_retry AFTER UPDATE OF stage ON imports"
        " FOR EACH ROW WHEN (NEW.stage = 'Import Pending')"
        f" EXECUTE FUNCTION importer_track_order('{channel}')",
        "CREATE TRIGGER importer_cancel_requested AFTER UPDATE OF cancel_requested"
        " ON importer_orders FOR EACH ROW"
        " WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested)"
        f" EXECUTE FUNCTION importer_notify_cancel('{channel}')",
    ]


TRIGGER_CHANNEL = """
SELECT encode(tgargs, 'escape') FROM pg_trigger
WHERE tgname = 'importer_track_insert' AND tgrelid = 'imports'::regclass
"""

# Fair claim: importer_claim (migration a9c1e3d5f7b2; its text is in migrations/schema.sql).
# $1 free slots, $2 worker id, $3 lease seconds, $4 max running per user (NULL: no cap).
# One statement: it makes due waits ready (a bounded batch, waking the other replicas when it
# did), then takes one order per slot: the head of the user with the fewest orders running,
# then of the group with the fewest, then the oldest head (FIFO within a user), and appends
# each order's 'Import Started' row; it returns those rows with the claim's counters.
# Cost: per slot one probe of importer_users_ix_head per group with ready orders and the
# running orders (few: replicas x workers); waiting and cancelled orders, the history and the
# users with nothing ready are never read. The cap is exact across replicas: each pick locks
# its user's importer_users row (SKIP LOCKED) and counts the user's running orders under it.
CLAIM = "SELECT * FROM importer_claim($1::int, $2::varchar, $3::float8, $4::int)"

# $1 uuid, $2 worker id, $3 stage, $4 description, $5 file_names (NULL keeps them), $6 run
APPEND_STAGE = f"""
INSERT INTO imports ({ORDER_COLUMNS})
{_copy_latest("$3", "$4", "COALESCE($5, i.file_names)", _OWNED_LATEST)}
WHERE o.uuid = $1 AND {_owned_by("$2", "o.worker_id")} AND o.runs = $6
RETURNING id
"""

# Ends (or hands back) several owned orders in one statement: importer_finish (revision
# f3c5e7a9b1d4, which made the statement a function so that its plans never scan the queue;
# its text is in migrations/schema.sql).
# $1 uuids, $2 stages, $3 descriptions, $4 file_names, $5 objects (json text), $6 worker id,
# $7 delays (seconds; NULL: no wait), $8 transient retries, $9 settle waits (booleans),
# $10 wait causes (NULL: none), $11 runs (each claim's run number). One batch can hold two
# endings of one order, a stale run's and the current one's: only the current one is written.
# An ending writes the queue row once: its history row's id is drawn under the row's lock (no
# row committed meanwhile can be newer) and stage, latest_id and the release are one update;
# importer_track_inserts then finds the row applied. A hand-back leaves stage and latest_id to
# that trigger, which also wakes the claimers for it (revision d8f0b2c4e6a5).
# A hand-back ('Import Pending') does not count as an attempt and keeps the order's place. A
# wait sets waiting, its cause and not_before (from the database clock, the one the claim
# compares with); its history row wakes nobody; a transient retry counts in retries;
# a settle wait keeps the time of the first of a stretch of them (settle_max_wait bounds the
# stretch), and any other finish ends the stretch: that run got past them. An ending clears
# all three and the progress, and queues its outcomes' notifications (the owed channels looked
# up once per call): the stage trigger, which does that for every other writer of a stage,
# leaves the ending's rows alone (revision d0f2b4c6e8a1).
# The new row copies the latest row this statement's snapshot sees (seen), not the one the
# locked queue row names: an ending that waited for the lock of a client's write (a refused
# retry, an ignored second submission) finds the row naming that write's restoring row, which
# committed after the snapshot, so a copy of it would write nothing while the queue row still
# ended. Each row of an order copies the one before (stage and description aside), so the
# copy is the same.
FINISH_MANY = (
    "SELECT uuid, runs FROM importer_finish($1::text[], $2::text[], $3::text[], $4::text[],"
    " $5::text[], $6::varchar, $7::float8[], $8::bool[], $9::bool[], $10::text[], $11::int[])"
)

# $1 uuid, $2 worker id, $3 objects json, $4 run
RECORD_OBJECTS = f"""
UPDATE importer_orders SET objects = $3::json
WHERE uuid = $1 AND {_owned_by("$2")} AND runs = $4
"""

# $1 uuid, $2 worker id, $3 progress json, $4 run. Only the owner writes it; the ending (for
# other writers, the stage trigger importer_order_stage_changed) clears it when the order
# leaves the running stages. Neither updated_at nor an indexed column changes, so it stays a
# cheap (HOT) update.
RECORD_PROGRESS = f"""
UPDATE importer_orders SET progress = $3::json, progress_at = now()
WHERE uuid = $1 AND {_owned_by("$2")} AND runs = $4
  AND stage IN ('Import Started', 'Import Preprocessing')
"""

# $1 worker id, $2 uuids, $3 lease seconds. Never waits for a row lock (a client holding
# one in an open transaction must not stall every lease): locked rows are skipped and come
# back owned but not renewed; rows no longer ours do not come back at all.
RENEW_LEASES = f"""
WITH mine AS (
    SELECT uuid FROM importer_orders
    WHERE {_owned_by("$1")} AND uuid = ANY($2::text[])
    FOR UPDATE SKIP LOCKED
),
renewed AS (
    UPDATE importer_orders o
    SET lease_expires_at = now() + make_interval(secs => $3)
    FROM mine
    WHERE o.uuid = mine.uuid
    RETURNING o.uuid, o.cancel_requested
)
SELECT o.uuid, r.uuid IS NOT NULL AS renewed,
       COALESCE(r.cancel_requested, o.cancel_requested) AS cancel_requested
FROM importer_orders o LEFT JOIN renewed r ON r.uuid = o.uuid
WHERE {_owned_by("$1", "o.worker_id")} AND o.uuid = ANY($2::text[])
"""

# Orders whose replica stopped renewing, and orders the original importer left running.
# $1 max attempts, $2 batch size, $3 this replica's worker id: its own orders are never taken
# back by itself (it still runs them; a lease it could not renew is handled by fencing).
RECOVER_EXPIRED = f"""
WITH expired AS (
    SELECT uuid FROM importer_orders
    WHERE (worker_id IS NOT NULL AND worker_id <> $3 AND lease_expires_at < now())
       OR (worker_id IS NULL AND stage IN ('Import Started', 'Import Preprocessing'))
    ORDER BY updated_at, queue_seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
released AS (
    UPDATE importer_orders o
    SET worker_id = NULL, lease_expires_at = NULL, updated_at = now()
    FROM expired e
    WHERE o.uuid = e.uuid
    RETURNING o.uuid, o.latest_id, o.attempts, o.attempts < $1 AND NOT o.cancel_requested AS requeue
)
INSERT INTO imports ({ORDER_COLUMNS})
{
    _copy_latest(
        "CASE WHEN r.requeue THEN 'Import Pending' ELSE 'Import Failed' END",
        "CASE WHEN r.requeue THEN format("
        "'The importer stopped while this order ran (attempt %s of %s); it was queued again.',"
        " r.attempts, $1)"
        " ELSE format('The importer stopped while this order ran (attempt %s of %s). Retry it"
        " with: biomero-importer retry %s', r.attempts, $1, r.uuid) END",
        "i.file_names",
        "released r JOIN imports i ON i.id = r.latest_id",
    )
}
RETURNING uuid, stage
"""


# Pending orders whose cancel was requested: end them without starting. $1 uuid or NULL (all),
# $2 batch size, oldest queued first. The partial index importer_orders_ix_cancel_pending
# holds only such orders, so the sweep costs the same with a million pending orders as with none.
CANCEL_PENDING = f"""
WITH picked AS (
    SELECT uuid, latest_id FROM importer_orders
    WHERE stage = 'Import Pending' AND worker_id IS NULL AND cancel_requested
      AND ($1::text IS NULL OR uuid = $1)
    ORDER BY queue_seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
INSERT INTO imports ({ORDER_COLUMNS})
{_copy_latest("'Import Failed'", f"'{CANCELLED}'", "i.file_names", _PICKED_LATEST)}
RETURNING uuid
"""

# $1 uuid. Returns the order's stage and owner when the request was recorded.
REQUEST_CANCEL = """
UPDATE importer_orders SET cancel_requested = true
WHERE uuid = $1 AND stage NOT IN ('Import Completed', 'Import Failed')
RETURNING stage, worker_id
"""

# Counting a backlog costs as much as the backlog: the count stops at $1 (the gauge then
# reads $1), and the oldest order is the first entry of the pending index.
QUEUE_STATS_CAP = 10_000
QUEUE_STATS = """
SELECT (SELECT count(*) FROM (
            SELECT 1 FROM importer_orders
            WHERE stage = 'Import Pending' AND worker_id IS NULL
            ORDER BY queued_at  -- walk the pending index: a scan would read finished orders
            LIMIT $1
        ) capped) AS pending,
       COALESCE((SELECT extract(epoch FROM now() - queued_at) FROM importer_orders
                 WHERE stage = 'Import Pending' AND worker_id IS NULL
                 ORDER BY queued_at LIMIT 1), 0)::float8 AS oldest_age
"""

# A writer's order: one 'Import Pending' row (and its preprocessing settings), as SQL clients
# and OMERO.biomero write it.
INSERT_PREPROCESSING = """
INSERT INTO imports_preprocessing (container, input_file, output_folder, alt_output_folder,
                                   extra_params)
VALUES ($1, $2, $3, $4, $5::json) RETURNING id
"""

INSERT_ORDER = """
INSERT INTO imports (group_name, user_name, destination_id, destination_type, stage, uuid,
                     files, preprocessing_id, import_options)
VALUES ($1, $2, $3, $4, 'Import Pending', $5, $6, $7, $8)
"""


# --- command line reads ---
# Statements of the ``biomero-importer`` commands (status, show, submit --wait, retry, cancel).
# Everything below reads ``importer_orders`` joined to the latest row, never the whole history.

# $1 user, $2 group, $3 stage, $4 max age (interval), $5 limit; a NULL filter matches all.
# Each command runs it once, so PostgreSQL plans it with the actual values and drops the
# unused filters (custom plan): stage uses (stage, updated_at), user and group start from
# their ``imports`` index and reach the queue row through latest_id.
ORDER_STATUS = """
SELECT o.uuid, o.stage, o.updated_at, o.worker_id, i.user_name, i.group_name,
       i.destination_type, i.destination_id, i.files, i.description,
       o.progress::text AS progress, o.progress_at
FROM importer_orders o JOIN imports i ON i.id = o.latest_id
WHERE ($1::text IS NULL OR i.user_name = $1)
  AND ($2::text IS NULL OR i.group_name = $2)
  AND ($3::text IS NULL OR o.stage = $3)
  AND ($4::interval IS NULL OR o.updated_at >= now() - $4::interval)
ORDER BY o.updated_at DESC
LIMIT $5
"""

# $1 uuid: queue state, latest row and preprocessing settings of one order
ORDER_DETAIL = """
SELECT o.uuid, o.stage, o.latest_id, o.queued_at, o.updated_at, o.worker_id,
       o.last_worker_id, o.lease_expires_at, o.attempts, o.runs, o.cancel_requested,
       o.objects::text AS objects, o.progress::text AS progress, o.progress_at,
       o.not_before, o.waiting_since, o.retries, o.waiting, o.wait_cause,
       i.group_name, i.user_name, i.destination_type, i.destination_id, i.files, i.file_names,
       i.description, i.preprocessing_id, i.import_options, p.container, p.input_file,
       p.output_folder, p.alt_output_folder, p.extra_params::text AS extra_params
FROM importer_orders o
JOIN imports i ON i.id = o.latest_id
LEFT JOIN imports_preprocessing p ON p.id = i.preprocessing_id
WHERE o.uuid = $1
"""

# $1 uuid, $2 rows with a higher id only (0 for the full history)
ORDER_EVENTS = """
SELECT id, timestamp, stage, description FROM imports
WHERE uuid = $1 AND id > $2
ORDER BY id
"""

# $1 uuid
ORDER_STATE = """
SELECT stage, latest_id, worker_id, cancel_requested FROM importer_orders WHERE uuid = $1
"""

# $1 uuid; taken before a retry so the stage cannot change between the check and the insert
LOCK_ORDER = """
SELECT stage, worker_id, waiting FROM importer_orders WHERE uuid = $1 FOR UPDATE
"""

# $1 uuid (locked by LOCK_ORDER): a waiting order is due now and keeps its place; the
# 'Import Pending' row RETRY_ORDER then appends says so and wakes the claimers.
RETRY_WAITING = """
UPDATE importer_orders SET waiting = false, not_before = LEAST(not_before, now())
WHERE uuid = $1 AND waiting
"""

# Orders waiting on one cause (OMERO, storage, the container runtime) are due now, in queue
# order, keeping their places. $1 cause, $2 batch size (one statement stays bounded; the store
# repeats it). Each batch locks its orders (SKIP LOCKED) and then their users' rows in name
# order (the InitPlan runs before the update), so two wake-ups cannot deadlock on them.
WAKE_WAITING = """
WITH batch AS (
    SELECT uuid, user_name FROM importer_orders
    WHERE stage = 'Import Pending' AND worker_id IS NULL AND waiting AND wait_cause = $1
    ORDER BY wait_cause, queued_at, queue_seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
owners AS (
    SELECT user_name FROM importer_users
    WHERE user_name IN (SELECT user_name FROM batch)
    ORDER BY user_name
    FOR UPDATE
)
UPDATE importer_orders o SET waiting = false, not_before = LEAST(o.not_before, now())
FROM batch b
WHERE o.uuid = b.uuid AND (SELECT count(*) FROM owners) >= 0
"""

# One wake-up for the claimers after orders became due.
WAKE_CLAIMERS = "SELECT pg_notify(importer_channel(), 'due')"

# Lets the next 'Import Pending' row of a finished order through the duplicate-submission guard
# of ``importer_track_inserts``, for this transaction only.
ALLOW_REQUEUE = "SELECT set_config('biomero_importer.requeue', 'on', true)"

# $1 uuid, $2 description. Appends a copy of the latest row as 'Import Pending'.
RETRY_ORDER = f"""
INSERT INTO imports ({ORDER_COLUMNS})
{_copy_latest("'Import Pending'", "$2", "i.file_names", _OWNED_LATEST)}
WHERE o.uuid = $1
RETURNING id
"""


# --- the notification outbox ---
# One row per order outcome, queued in the outcome's own transaction: by the ending
# (importer_finish), or by the stage trigger for any other writer of a terminal stage.
# Everything here walks the partial indexes importer_outbox_ix_due (undelivered, by due time)
# and importer_outbox_ix_done (delivered, by when), never the whole table.

# The channels a replica has: recorded at its start and refreshed while it runs; the stage
# trigger (importer_owed_channels(), revision c6e8a0b2d4f3) owes an outcome every channel of
# the replicas seen within the hour before the latest one was, and queues no outbox row for
# an outcome that owes none. $1 worker id, $2 channels, $3 where each points (JSON, no
# secrets). Rows of replicas gone for a day are dropped. Outbox rows from before per-channel
# delivery (no delivery rows) owe what is owed now, minus what they already settled
# (ADOPT_LEGACY_OUTBOX).
RECORD_CHANNELS = """
WITH seen AS (
    INSERT INTO importer_notify_replicas (worker_id, channels, endpoints, seen_at)
    VALUES ($1, $2::varchar[], $3::json, now())
    ON CONFLICT (worker_id) DO UPDATE
        SET channels = EXCLUDED.channels, endpoints = EXCLUDED.endpoints, seen_at = now()
    RETURNING worker_id
),
gone AS (
    DELETE FROM importer_notify_replicas WHERE seen_at < now() - interval '1 day'
    RETURNING worker_id
)
SELECT r.worker_id, r.channels, r.endpoints::text AS endpoints
FROM importer_notify_replicas r
WHERE r.seen_at > now() - interval '1 hour' AND r.worker_id <> $1
  AND r.worker_id NOT IN (SELECT worker_id FROM gone)
ORDER BY r.worker_id
"""

ADOPT_LEGACY_OUTBOX = """
WITH owed AS (
    SELECT DISTINCT c FROM importer_notify_replicas r, unnest(r.channels) c
    WHERE r.seen_at > (SELECT max(seen_at) FROM importer_notify_replicas) - interval '1 hour'
),
legacy AS (
    SELECT b.id, b.delivered FROM importer_outbox b
    WHERE b.done_at IS NULL
      AND NOT EXISTS (SELECT 1 FROM importer_outbox_delivery d WHERE d.outbox_id = b.id)
    ORDER BY b.next_attempt_at
    LIMIT 10000
    FOR UPDATE SKIP LOCKED
),
added AS (
    INSERT INTO importer_outbox_delivery (outbox_id, channel)
    SELECT l.id, owed.c FROM legacy l, owed
    WHERE NOT owed.c = ANY(l.delivered) AND NOT (owed.c || ':failed') = ANY(l.delivered)
    RETURNING outbox_id
)
UPDATE importer_outbox b SET done_at = now()
FROM legacy l
WHERE b.id = l.id AND NOT EXISTS (SELECT 1 FROM added a WHERE a.outbox_id = l.id)
"""

# The replicas seen within the hour, for ``check``.
CHANNEL_REPLICAS = """
SELECT worker_id, channels, endpoints::text AS endpoints FROM importer_notify_replicas
WHERE seen_at > now() - interval '1 hour'
ORDER BY worker_id
"""

# $1 channel, $2 how many, $3 delivery lease (seconds), $4 worker id. Each claim raises the
# row's generation (its fencing token) and leases it: due again after the lease, so a replica
# that dies mid-delivery leaves it to the next one; SKIP LOCKED keeps two replicas from taking
# the same row at once. A replica claims only the channels it has. The order's fields come
# from the outcome's own history row (event_id); its timings from the order's own rows up to
# the outcome (ix_imports_uuid), so a later retry changes neither.
CLAIM_DELIVERIES = """
WITH due AS (
    SELECT outbox_id, channel FROM importer_outbox_delivery
    WHERE channel = $1 AND delivered_at IS NULL AND given_up_at IS NULL AND due_at <= now()
    ORDER BY due_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
),
claimed AS (
    UPDATE importer_outbox_delivery d
    SET due_at = now() + make_interval(secs => $3), attempts = d.attempts + 1,
        generation = d.generation + 1, claimed_by = $4
    FROM due
    WHERE d.outbox_id = due.outbox_id AND d.channel = due.channel
    RETURNING d.outbox_id, d.channel, d.attempts, d.generation
)
SELECT c.outbox_id AS id, c.channel, c.attempts, c.generation, b.uuid, b.event_id, b.stage,
       extract(epoch FROM now() - b.created_at)::float8 AS age,
       i.user_name, i.group_name, i.destination_type, i.destination_id, i.description,
       i.timestamp AS finished_at, o.objects::text AS objects, t.queued_at, t.started_at
FROM claimed c
JOIN importer_outbox b ON b.id = c.outbox_id
LEFT JOIN imports i ON i.id = b.event_id
LEFT JOIN importer_orders o ON o.uuid = b.uuid
LEFT JOIN LATERAL (
    SELECT min(h.timestamp) AS queued_at,
           min(h.timestamp) FILTER (WHERE h.stage = 'Import Started') AS started_at
    FROM imports h WHERE h.uuid = b.uuid AND h.id <= b.event_id
) t ON true
ORDER BY c.outbox_id
"""

# $1 seconds since the outcome was queued, $2 how many. Deliveries of a channel that no replica
# seen within the hour has: nobody claims them, so nobody would give them up; any replica gives
# them up (through RECORD_DELIVERY, under their current generation) once the outcome is older
# than notify_give_up_after. Walks the partial index of unsettled deliveries only.
ORPHANED_DELIVERIES = """
SELECT d.outbox_id, d.channel, d.generation, b.uuid, b.event_id
FROM importer_outbox_delivery d
JOIN importer_outbox b ON b.id = d.outbox_id
WHERE d.delivered_at IS NULL AND d.given_up_at IS NULL
  AND d.channel <> ALL(ARRAY(
      SELECT DISTINCT c FROM importer_notify_replicas r, unnest(r.channels) c
      WHERE r.seen_at > now() - interval '1 hour'
  ))
  AND b.created_at < now() - make_interval(secs => $1)
ORDER BY d.due_at
LIMIT $2
"""

# Recording one channel's attempt, in one transaction: LOCK_OUTBOX_ROW first (so two channels
# of one outcome settling at once see each other's result), then RECORD_DELIVERY under the
# claim's generation: a late writer (its lease ran out, another replica claimed the row since)
# matches no row and changes nothing. Then, when the channel settled, SETTLE_OUTBOX marks the
# outcome done once no channel is left.
LOCK_OUTBOX_ROW = "SELECT 1 FROM importer_outbox WHERE id = $1 FOR UPDATE"

# $1 outbox id, $2 channel, $3 generation, $4 result ('delivered', 'given_up' or 'retry'),
# $5 seconds until due again (retry), $6 error (NULL keeps the last one).
RECORD_DELIVERY = """
UPDATE importer_outbox_delivery
SET delivered_at = CASE WHEN $4 = 'delivered' THEN now() END,
    given_up_at = CASE WHEN $4 = 'given_up' THEN now() END,
    due_at = CASE WHEN $4 = 'retry' THEN now() + make_interval(secs => $5) ELSE due_at END,
    last_error = COALESCE($6, last_error),
    claimed_by = NULL
WHERE outbox_id = $1 AND channel = $2 AND generation = $3
  AND delivered_at IS NULL AND given_up_at IS NULL
RETURNING 1
"""

# $1 outbox id, $2 what settled (a channel, or '<channel>:failed'), $3 error or NULL.
# ``delivered`` and ``last_error`` stay filled for readers of the outbox row alone.
SETTLE_OUTBOX = """
UPDATE importer_outbox b
SET delivered = ARRAY(SELECT DISTINCT x FROM unnest(b.delivered || $2::varchar) x ORDER BY x),
    last_error = COALESCE($3, b.last_error),
    done_at = CASE WHEN NOT EXISTS (
                  SELECT 1 FROM importer_outbox_delivery d
                  WHERE d.outbox_id = b.id AND d.delivered_at IS NULL AND d.given_up_at IS NULL
              ) THEN now() END
WHERE b.id = $1 AND b.done_at IS NULL
"""

# Each channel of the order's latest outcome, for ``show``: the outcome is found through the
# order's own terminal rows (ix_imports_uuid) and the outbox's unique event_id.
ORDER_DELIVERIES = """
WITH latest AS (
    SELECT b.id, b.event_id, b.stage, b.created_at FROM importer_outbox b
    WHERE b.event_id IN (
        SELECT id FROM imports
        WHERE uuid = $1 AND stage IN ('Import Completed', 'Import Failed')
    )
    ORDER BY b.event_id DESC
    LIMIT 1
)
SELECT l.event_id, l.stage, l.created_at, d.channel, d.attempts, d.due_at, d.last_error,
       d.delivered_at, d.given_up_at
FROM latest l
JOIN importer_outbox_delivery d ON d.outbox_id = l.id
ORDER BY d.channel
"""

# $1 retention (seconds), $2 batch size. The batch is taken as an array first (an InitPlan),
# so the delete probes the primary key for exactly those rows instead of joining the table.
PRUNE_NOTIFICATIONS = """
DELETE FROM importer_outbox WHERE id = ANY(ARRAY(
    SELECT id FROM importer_outbox
    WHERE done_at IS NOT NULL AND done_at < now() - make_interval(secs => $1)
    ORDER BY done_at
    LIMIT $2
))
"""

# Counting stops at $1, like QUEUE_STATS: a receiver down for days must not make the gauge
# cost the backlog.
NOTIFICATION_STATS = """
SELECT (SELECT count(*) FROM (
            SELECT 1 FROM importer_outbox WHERE done_at IS NULL
            ORDER BY next_attempt_at  -- walk the partial index of undelivered rows
            LIMIT $1
        ) capped) AS pending,
       COALESCE((SELECT extract(epoch FROM now() - min(created_at)) FROM (
            SELECT created_at FROM importer_outbox WHERE done_at IS NULL
            ORDER BY next_attempt_at LIMIT $1
        ) oldest), 0)::float8 AS oldest_age
"""
