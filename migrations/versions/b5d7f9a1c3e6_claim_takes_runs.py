"""A claim takes one user's run of orders in one pick when no other user has one ready.

Revision ID: b5d7f9a1c3e6
Revises: a3c5e7f9b1d4
Create Date: 2026-12-02

The fair claim picks one order per step, each step counting the previous ones. When the chosen
user is the only one with an order ready, every remaining step picks that user again, and
each step cost a candidate probe, a pick, an update of the queue row that moved the user's
head (a new row version of ``importer_users`` per order) and an insert of the 'Import Started'
row. Now such a run is one pick of up to the remaining slots (and the user's cap), one update
of their queue rows, one insert of their 'Import Started' rows, and one move of the head. The
choice is unchanged: with any other user ready, the claim goes on one order per step.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "b5d7f9a1c3e6"
down_revision: str | None = "a3c5e7f9b1d4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DECLARED = """
    picked varchar;
    claimed record;
"""
DECLARED_NOW = """
    picks varchar[];
    previous_ids integer[];
    started_ids integer[];
    claimed_groups varchar[];
    claimed_uuids varchar[];
    claimed_attempts integer[];
    claimed_runs integer[];
    claimed_objects text[];
    claimed_queued float8[];
    claimed_retries integer[];
    claimed_waiting float8[];
    claimed_not_before float8[];
    claimed_group varchar;
    run_size integer;
"""
IDS = """
    previous_id integer;
    started_id integer;
"""
IDS_NOW = """
"""
PICK = """\
        -- (a range over the user, as in importer_refresh_user: plans never walk another index)
        PERFORM set_config('enable_sort', 'off', true);
        SELECT o.uuid, o.latest_id INTO picked, previous_id FROM importer_orders o
        WHERE (o.stage = 'Import Pending' AND o.worker_id IS NULL AND NOT o.cancel_requested AND NOT o.waiting)
          AND (o.user_name, o.queued_at, o.queue_seq) >= (chosen, h_at, h_seq)
          AND o.user_name <= chosen
        ORDER BY o.user_name, o.queued_at, o.queue_seq
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        got := FOUND;
        PERFORM set_config('enable_sort', sort_setting, true);
        CONTINUE WHEN NOT got;
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
"""
PICK_NOW = """\
        -- No other user has an order ready: each remaining step would choose this user
        -- again, so the steps are taken as one run (users skipped here count as ready).
        run_size := 1;
        IF NOT EXISTS (SELECT 1 FROM importer_users u
                       WHERE u.head_seq IS NOT NULL AND u.user_name <> chosen) THEN
            run_size := slots - taken;
            IF max_running IS NOT NULL THEN
                run_size := LEAST(run_size, max_running - running_now);
            END IF;
        END IF;
        -- (a range over the user, as in importer_refresh_user: plans never walk another index)
        PERFORM set_config('enable_sort', 'off', true);
        SELECT array_agg(p.uuid), array_agg(p.latest_id) INTO picks, previous_ids
        FROM (SELECT o.uuid, o.latest_id FROM importer_orders o
              WHERE (o.stage = 'Import Pending' AND o.worker_id IS NULL AND NOT o.cancel_requested AND NOT o.waiting)
                AND (o.user_name, o.queued_at, o.queue_seq) >= (chosen, h_at, h_seq)
                AND o.user_name <= chosen
              ORDER BY o.user_name, o.queued_at, o.queue_seq
              LIMIT run_size
              FOR UPDATE SKIP LOCKED) p;
        got := picks IS NOT NULL;
        PERFORM set_config('enable_sort', sort_setting, true);
        CONTINUE WHEN NOT got;
        -- this user may have more to give in a later step
        skipped := skipped[1:array_length(skipped, 1) - 1];

        -- The claim and its 'Import Started' rows in one update of the queue rows: the rows'
        -- ids are drawn first, so importer_track_order finds them already applied. Each row
        -- is reached by its key (= ANY, or a lookup per pick that cannot be turned into a
        -- join): a join with the picks could plan a scan of the whole table when its
        -- statistics were taken with nothing pending.
        SELECT array_agg(nextval(id_seq)::integer) INTO started_ids
        FROM generate_series(1, cardinality(picks));
        WITH claimed AS (
            UPDATE importer_orders o
            SET stage = 'Import Started',
                latest_id = started_ids[array_position(picks, o.uuid)],
                worker_id = worker,
                last_worker_id = worker,
                lease_expires_at = now() + make_interval(secs => lease_seconds),
                attempts = o.attempts + 1,
                runs = o.runs + 1,
                updated_at = now()
            WHERE o.uuid = ANY (picks)
            RETURNING o.uuid, o.group_name, o.attempts, o.runs, o.objects::text AS objects,
                      extract(epoch FROM o.queued_at)::float8 AS queued_at, o.retries,
                      extract(epoch FROM o.waiting_since)::float8 AS waiting_since,
                      extract(epoch FROM o.not_before)::float8 AS not_before
        )
        SELECT array_agg(c.group_name), array_agg(c.uuid), array_agg(c.attempts),
               array_agg(c.runs), array_agg(c.objects), array_agg(c.queued_at),
               array_agg(c.retries), array_agg(c.waiting_since), array_agg(c.not_before)
        INTO claimed_groups, claimed_uuids, claimed_attempts, claimed_runs, claimed_objects,
             claimed_queued, claimed_retries, claimed_waiting, claimed_not_before
        FROM claimed c;
        taken := taken + cardinality(picks);
        slot := array_position(run_users, chosen);
        IF slot IS NULL THEN
            run_users := run_users || chosen;
            run_counts := run_counts || cardinality(picks);
        ELSE
            run_counts[slot] := run_counts[slot] + cardinality(picks);
        END IF;
        FOREACH claimed_group IN ARRAY claimed_groups LOOP
            slot := array_position(run_groups, claimed_group);
            IF slot IS NULL THEN
                run_groups := run_groups || claimed_group;
                group_counts := group_counts || 1;
            ELSE
                group_counts[slot] := group_counts[slot] + 1;
            END IF;
        END LOOP;

        RETURN QUERY
        WITH started AS (
            INSERT INTO imports (id, group_name, user_name, destination_id, destination_type,
                                 stage, uuid, files, file_names, description,
                                 preprocessing_id, timestamp, import_options)
            SELECT s.new_id, i.group_name, i.user_name, i.destination_id, i.destination_type,
                   'Import Started', i.uuid, i.files, i.file_names, NULL, i.preprocessing_id,
                   clock_timestamp(), i.import_options
            FROM unnest(previous_ids, started_ids) AS s(old_id, new_id)
            CROSS JOIN LATERAL (SELECT * FROM imports r WHERE r.id = s.old_id LIMIT 1) i
            RETURNING *
        )
        SELECT s.uuid, s.group_name, s.user_name, s.destination_id, s.destination_type,
               s.files, s.file_names, s.preprocessing_id, p.container, p.input_file,
               p.output_folder, p.alt_output_folder, p.extra_params::text, s.import_options,
               c.attempts, c.runs, c.objects, c.queued_at, c.retries, c.waiting_since,
               c.not_before
        FROM started s
        JOIN unnest(claimed_uuids, claimed_attempts, claimed_runs, claimed_objects,
                    claimed_queued, claimed_retries, claimed_waiting, claimed_not_before)
             AS c(uuid, attempts, runs, objects, queued_at, retries, waiting_since, not_before)
             ON c.uuid = s.uuid
        LEFT JOIN imports_preprocessing p ON p.id = s.preprocessing_id;
"""


def _previous_claim() -> str:
    """f1b3d5e7a9c2's importer_claim, from its module as alembic loaded it for this run."""
    script = op.get_context().script
    found = None if script is None else script.get_revision("f1b3d5e7a9c2")
    if found is None:
        raise RuntimeError("revision f1b3d5e7a9c2 is not in this migration run's scripts")
    claim: str = found.module._claim()
    return claim


def _claim() -> str:
    claim = _previous_claim()
    for old, new in ((DECLARED, DECLARED_NOW), (IDS, IDS_NOW), (PICK, PICK_NOW)):
        if claim.count(old) != 1:
            raise RuntimeError(f"importer_claim: {old.strip()[:60]!r} is not where expected")
        claim = claim.replace(old, new)
    return claim


def upgrade() -> None:
    op.execute(_claim())


def downgrade() -> None:
    op.execute(_previous_claim())
