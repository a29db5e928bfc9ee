-- The current schema of biomero-importer's tables, indexes and trigger functions: what
-- `biomero-importer migrate` makes of an empty database (pg_dump --schema-only, normalised).
-- Read it here; change it only through a new revision in migrations/versions, then
-- regenerate this file with: .venv/bin/python -m tests.db.schema_dump
-- (tests/db/test_schema.py checks that it matches the migrations).

CREATE FUNCTION public.importer_channel() RETURNS text
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
    RETURN (
        SELECT convert_from(substring(t.tgargs FROM 1 FOR position('\x00'::bytea IN t.tgargs)
                                      - 1), 'UTF8')
        FROM pg_trigger t
        WHERE t.tgname = 'importer_track_insert' AND t.tgrelid = 'imports'::regclass
    );
END;
$$;

CREATE FUNCTION public.importer_claim(slots integer, worker character varying, lease_seconds double precision, max_running integer) RETURNS TABLE(uuid character varying, group_name character varying, user_name character varying, destination_id character varying, destination_type character varying, files text, file_names text, preprocessing_id integer, container character varying, input_file character varying, output_folder character varying, alt_output_folder character varying, extra_params text, import_options text, attempts integer, runs integer, objects text, queued_at double precision, retries integer, waiting_since double precision, not_before double precision)
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    SET jit TO 'off'
    SET plan_cache_mode TO 'force_generic_plan'
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
    taken integer := 0;
    tries integer := 0;
    id_seq text := pg_get_serial_sequence('imports', 'id');
    -- the session's setting, restored after the promotion and after each pick
    sort_setting text := current_setting('enable_sort');
    got boolean;
BEGIN
    -- Due waits become ready: a bounded batch, oldest due first; orders or users another
    -- transaction holds are left for the next claim, so this never waits on a lock.
    PERFORM set_config('enable_sort', 'off', true);
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
    PERFORM set_config('enable_sort', sort_setting, true);
    IF promoted > 0 THEN
        PERFORM pg_notify(importer_channel(), 'due');
    END IF;

    SELECT COALESCE(array_agg(r.user_name) FILTER (WHERE r.grouped = 1), '{}'),
           COALESCE(array_agg(r.n) FILTER (WHERE r.grouped = 1), '{}'),
           COALESCE(array_agg(r.group_name) FILTER (WHERE r.grouped = 2), '{}'),
           COALESCE(array_agg(r.n) FILTER (WHERE r.grouped = 2), '{}')
    INTO run_users, run_counts, run_groups, group_counts
    FROM (SELECT o.user_name, o.group_name, count(*)::integer AS n,
                 GROUPING(o.user_name, o.group_name) AS grouped
          FROM importer_orders o WHERE o.worker_id IS NOT NULL
          GROUP BY GROUPING SETS ((o.user_name), (o.group_name))) r;

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
        -- ids are drawn first, so importer_track_inserts finds them already applied. Each row
        -- is reached by its key (= ANY, or a lookup per pick that cannot be turned into a
        -- join): a join with the picks could plan a scan of the whole table when its
        -- statistics were taken with nothing pending.
        SELECT array_agg(nextval(id_seq)::integer) INTO started_ids
        FROM generate_series(1, cardinality(picks));
        -- the ready trigger leaves this update to the head move below
        PERFORM set_config('biomero_importer.claiming', 'on', true);
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
        PERFORM set_config('biomero_importer.claiming', 'off', true);
        -- the run began at the head read under the user's lock: the head moves past it once
        PERFORM importer_refresh_user(chosen, h_at, h_seq, NULL, NULL, NULL);
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
    END LOOP;
END;
$$;

CREATE FUNCTION public.importer_finish(text[], text[], text[], text[], text[], character varying, double precision[], boolean[], boolean[], text[], integer[]) RETURNS TABLE(uuid character varying, runs integer)
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    SET jit TO 'off'
    SET "biomero_importer.finishing" TO 'on'
    AS $_$
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
$_$;

CREATE FUNCTION public.importer_notify_cancel() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], 'cancel:' || NEW.uuid);
    RETURN NULL;
END;
$$;

CREATE FUNCTION public.importer_order_owner() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    latest record;
BEGIN
    SELECT i.user_name, i.group_name INTO latest FROM imports i WHERE i.id = NEW.latest_id;
    -- The trigger on imports always points latest_id at a history row; a queue row written
    -- by hand (tests, repairs) may not, and then keeps the names it was given.
    IF FOUND THEN
        NEW.user_name := latest.user_name;
        NEW.group_name := latest.group_name;
    END IF;
    RETURN NEW;
END;
$$;

CREATE FUNCTION public.importer_order_ready() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    was_ready boolean := false;
    is_ready boolean := false;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        was_ready := (OLD.stage = 'Import Pending' AND OLD.worker_id IS NULL AND NOT OLD.cancel_requested AND NOT OLD.waiting);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        is_ready := (NEW.stage = 'Import Pending' AND NEW.worker_id IS NULL AND NOT NEW.cancel_requested AND NOT NEW.waiting);
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

CREATE FUNCTION public.importer_order_stage_changed() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    owed varchar[];
    queued bigint;
BEGIN
    IF NEW.stage NOT IN ('Import Started', 'Import Preprocessing') THEN
        NEW.progress := NULL;
        NEW.progress_at := NULL;
    END IF;
    IF NEW.stage IN ('Import Completed', 'Import Failed')
       AND OLD.stage NOT IN ('Import Completed', 'Import Failed') THEN
        NEW.not_before := NULL;
        NEW.waiting_since := NULL;
        NEW.retries := 0;
        owed := importer_owed_channels();
        IF cardinality(owed) > 0 THEN
            INSERT INTO importer_outbox (uuid, event_id, stage)
            VALUES (NEW.uuid, NEW.latest_id, NEW.stage)
            ON CONFLICT (event_id) DO NOTHING
            RETURNING id INTO queued;
            IF queued IS NOT NULL THEN
                INSERT INTO importer_outbox_delivery (outbox_id, channel)
                SELECT queued, c FROM unnest(owed) c;
            END IF;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

CREATE FUNCTION public.importer_order_wait() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION public.importer_orders_inserted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    -- users in name order: two bulk inserts lock their user rows in the same order
    PERFORM importer_refresh_user(n.user_name, NULL, NULL, NULL, NULL, NULL)
    FROM (SELECT DISTINCT i.user_name FROM inserted i WHERE i.stage = 'Import Pending'
          ORDER BY i.user_name) n;
    RETURN NULL;
END;
$$;

CREATE FUNCTION public.importer_owed_channels() RETURNS character varying[]
    LANGUAGE plpgsql STABLE
    AS $$
BEGIN
    RETURN (
        SELECT COALESCE(array_agg(DISTINCT c ORDER BY c), '{}')
        FROM importer_notify_replicas r, unnest(r.channels) c
        WHERE r.seen_at > (SELECT max(seen_at) FROM importer_notify_replicas)
                          - interval '1 hour'
    );
END;
$$;

CREATE FUNCTION public.importer_refresh_user(name character varying, lost_at timestamp with time zone, lost_seq bigint, gained_at timestamp with time zone, gained_seq bigint, gained_group character varying) RETURNS void
    LANGUAGE plpgsql
    SET enable_sort TO 'off'
    AS $$
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
        WHERE (o.stage = 'Import Pending' AND o.worker_id IS NULL AND NOT o.cancel_requested AND NOT o.waiting)
          AND (o.user_name, o.queued_at, o.queue_seq) > (name, lost_at, lost_seq)
          AND o.user_name <= name
        ORDER BY o.user_name, o.queued_at, o.queue_seq
        LIMIT 1;
    ELSE
        SELECT o.queued_at, o.queue_seq, o.group_name INTO at, seq, grp
        FROM importer_orders o
        WHERE (o.stage = 'Import Pending' AND o.worker_id IS NULL AND NOT o.cancel_requested AND NOT o.waiting) AND o.user_name >= name AND o.user_name <= name
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

CREATE FUNCTION public.importer_track_inserts() RETURNS trigger
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    SET jit TO 'off'
    AS $$
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

CREATE FUNCTION public.importer_track_order() RETURNS trigger
    LANGUAGE plpgsql
    SET enable_seqscan TO 'off'
    SET jit TO 'off'
    AS $$
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

CREATE TABLE public.alembic_version_omeroadi (
    version_num character varying(32) NOT NULL
);

CREATE TABLE public.importer_notify_replicas (
    worker_id character varying NOT NULL,
    channels character varying[] NOT NULL,
    endpoints json DEFAULT '{}'::json NOT NULL,
    seen_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE public.importer_orders (
    uuid character varying(36) NOT NULL,
    stage character varying NOT NULL,
    latest_id integer NOT NULL,
    queued_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    worker_id character varying,
    last_worker_id character varying,
    lease_expires_at timestamp with time zone,
    attempts integer DEFAULT 0 NOT NULL,
    runs integer DEFAULT 0 NOT NULL,
    cancel_requested boolean DEFAULT false NOT NULL,
    objects json,
    user_name character varying DEFAULT ''::character varying NOT NULL,
    group_name character varying DEFAULT ''::character varying NOT NULL,
    not_before timestamp with time zone,
    waiting_since timestamp with time zone,
    retries integer DEFAULT 0 NOT NULL,
    progress json,
    progress_at timestamp with time zone,
    waiting boolean DEFAULT false NOT NULL,
    wait_cause character varying,
    queue_seq bigint NOT NULL
);

CREATE SEQUENCE public.importer_orders_queue_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.importer_orders_queue_seq OWNED BY public.importer_orders.queue_seq;

CREATE TABLE public.importer_outbox (
    id bigint NOT NULL,
    uuid character varying(36) NOT NULL,
    event_id integer NOT NULL,
    stage character varying NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    next_attempt_at timestamp with time zone DEFAULT now() NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    delivered character varying[] DEFAULT '{}'::character varying[] NOT NULL,
    done_at timestamp with time zone,
    last_error character varying
);

CREATE TABLE public.importer_outbox_delivery (
    outbox_id bigint NOT NULL,
    channel character varying NOT NULL,
    due_at timestamp with time zone DEFAULT now() NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    generation bigint DEFAULT 0 NOT NULL,
    claimed_by character varying,
    last_error character varying,
    delivered_at timestamp with time zone,
    given_up_at timestamp with time zone
);

ALTER TABLE public.importer_outbox ALTER COLUMN id ADD GENERATED BY DEFAULT AS IDENTITY (
    SEQUENCE NAME public.importer_outbox_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE public.importer_users (
    user_name character varying NOT NULL,
    head_queued_at timestamp with time zone,
    head_seq bigint,
    head_group character varying
);

CREATE TABLE public.imports (
    id integer NOT NULL,
    group_name character varying NOT NULL,
    user_name character varying NOT NULL,
    destination_id character varying NOT NULL,
    destination_type character varying NOT NULL,
    stage character varying NOT NULL,
    uuid character varying(36) NOT NULL,
    "timestamp" timestamp with time zone DEFAULT now(),
    files text NOT NULL,
    file_names text,
    description text,
    preprocessing_id integer,
    import_options text
);

CREATE SEQUENCE public.imports_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.imports_id_seq OWNED BY public.imports.id;

CREATE TABLE public.imports_preprocessing (
    id integer NOT NULL,
    container character varying NOT NULL,
    input_file character varying NOT NULL,
    output_folder character varying NOT NULL,
    alt_output_folder character varying,
    extra_params json
);

CREATE SEQUENCE public.imports_preprocessing_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

ALTER SEQUENCE public.imports_preprocessing_id_seq OWNED BY public.imports_preprocessing.id;

ALTER TABLE ONLY public.importer_orders ALTER COLUMN queue_seq SET DEFAULT nextval('public.importer_orders_queue_seq'::regclass);

ALTER TABLE ONLY public.imports ALTER COLUMN id SET DEFAULT nextval('public.imports_id_seq'::regclass);

ALTER TABLE ONLY public.imports_preprocessing ALTER COLUMN id SET DEFAULT nextval('public.imports_preprocessing_id_seq'::regclass);

ALTER TABLE ONLY public.alembic_version_omeroadi
    ADD CONSTRAINT alembic_version_omeroadi_pkc PRIMARY KEY (version_num);

ALTER TABLE ONLY public.importer_notify_replicas
    ADD CONSTRAINT importer_notify_replicas_pkey PRIMARY KEY (worker_id);

ALTER TABLE ONLY public.importer_orders
    ADD CONSTRAINT importer_orders_pkey PRIMARY KEY (uuid);

ALTER TABLE ONLY public.importer_outbox_delivery
    ADD CONSTRAINT importer_outbox_delivery_pkey PRIMARY KEY (outbox_id, channel);

ALTER TABLE ONLY public.importer_outbox
    ADD CONSTRAINT importer_outbox_event_id_key UNIQUE (event_id);

ALTER TABLE ONLY public.importer_outbox
    ADD CONSTRAINT importer_outbox_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.importer_users
    ADD CONSTRAINT importer_users_pkey PRIMARY KEY (user_name);

ALTER TABLE ONLY public.imports
    ADD CONSTRAINT imports_pkey PRIMARY KEY (id);

ALTER TABLE ONLY public.imports_preprocessing
    ADD CONSTRAINT imports_preprocessing_pkey PRIMARY KEY (id);

CREATE INDEX importer_orders_ix_cancel_pending ON public.importer_orders USING btree (queue_seq) WHERE (((stage)::text = 'Import Pending'::text) AND (worker_id IS NULL) AND cancel_requested);

CREATE INDEX importer_orders_ix_latest ON public.importer_orders USING btree (latest_id);

CREATE INDEX importer_orders_ix_leases ON public.importer_orders USING btree (lease_expires_at) WHERE (worker_id IS NOT NULL);

CREATE INDEX importer_orders_ix_pending ON public.importer_orders USING btree (queued_at) WHERE (((stage)::text = 'Import Pending'::text) AND (worker_id IS NULL));

CREATE INDEX importer_orders_ix_ready ON public.importer_orders USING btree (user_name, queued_at, queue_seq) WHERE (((stage)::text = 'Import Pending'::text) AND (worker_id IS NULL) AND (NOT cancel_requested) AND (NOT waiting));

CREATE INDEX importer_orders_ix_stage_updated ON public.importer_orders USING btree (stage, updated_at);

CREATE INDEX importer_orders_ix_updated ON public.importer_orders USING btree (updated_at);

CREATE INDEX importer_orders_ix_wait_cause ON public.importer_orders USING btree (wait_cause, queued_at, queue_seq) WHERE (((stage)::text = 'Import Pending'::text) AND (worker_id IS NULL) AND waiting AND (wait_cause IS NOT NULL));

CREATE INDEX importer_orders_ix_waiting ON public.importer_orders USING btree (not_before, queue_seq) WHERE (((stage)::text = 'Import Pending'::text) AND (worker_id IS NULL) AND waiting);

CREATE INDEX importer_outbox_delivery_ix_due ON public.importer_outbox_delivery USING btree (channel, due_at) WHERE ((delivered_at IS NULL) AND (given_up_at IS NULL));

CREATE INDEX importer_outbox_ix_done ON public.importer_outbox USING btree (done_at) WHERE (done_at IS NOT NULL);

CREATE INDEX importer_outbox_ix_due ON public.importer_outbox USING btree (next_attempt_at) WHERE (done_at IS NULL);

CREATE INDEX importer_users_ix_head ON public.importer_users USING btree (head_group, head_queued_at, head_seq) WHERE (head_seq IS NOT NULL);

CREATE INDEX imports_ix_group_name ON public.imports USING btree (group_name);

CREATE INDEX imports_ix_uuid_timestamp ON public.imports USING btree (uuid, "timestamp");

CREATE INDEX ix_imports_user_name ON public.imports USING btree (user_name);

CREATE INDEX ix_imports_uuid ON public.imports USING btree (uuid);

CREATE TRIGGER importer_cancel_requested AFTER UPDATE OF cancel_requested ON public.importer_orders FOR EACH ROW WHEN ((new.cancel_requested AND (NOT old.cancel_requested))) EXECUTE FUNCTION public.importer_notify_cancel('biomero_importer_orders');

CREATE TRIGGER importer_order_owner BEFORE INSERT ON public.importer_orders FOR EACH ROW EXECUTE FUNCTION public.importer_order_owner();

CREATE TRIGGER importer_order_owner_moved BEFORE UPDATE OF latest_id ON public.importer_orders FOR EACH ROW WHEN ((NOT ((old.worker_id)::text IS DISTINCT FROM (new.worker_id)::text))) EXECUTE FUNCTION public.importer_order_owner();

CREATE TRIGGER importer_order_ready_delete AFTER DELETE ON public.importer_orders FOR EACH ROW WHEN ((((old.stage)::text = 'Import Pending'::text) AND (old.worker_id IS NULL) AND (NOT old.cancel_requested) AND (NOT old.waiting))) EXECUTE FUNCTION public.importer_order_ready();

CREATE TRIGGER importer_order_ready_insert AFTER INSERT ON public.importer_orders REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION public.importer_orders_inserted();

CREATE TRIGGER importer_order_ready_update AFTER UPDATE ON public.importer_orders FOR EACH ROW WHEN (((((((old.stage)::text = 'Import Pending'::text) AND (old.worker_id IS NULL) AND (NOT old.cancel_requested) AND (NOT old.waiting)) IS DISTINCT FROM (((new.stage)::text = 'Import Pending'::text) AND (new.worker_id IS NULL) AND (NOT new.cancel_requested) AND (NOT new.waiting))) OR ((old.user_name)::text IS DISTINCT FROM (new.user_name)::text) OR (((new.stage)::text = 'Import Pending'::text) AND (new.worker_id IS NULL) AND (NOT new.cancel_requested) AND (NOT new.waiting) AND ((((old.group_name)::text IS DISTINCT FROM (new.group_name)::text) OR (old.queued_at IS DISTINCT FROM new.queued_at)) OR (old.queue_seq IS DISTINCT FROM new.queue_seq)))) AND (current_setting('biomero_importer.claiming'::text, true) IS DISTINCT FROM 'on'::text))) EXECUTE FUNCTION public.importer_order_ready();

CREATE TRIGGER importer_order_stage_changed BEFORE UPDATE OF stage ON public.importer_orders FOR EACH ROW WHEN ((((old.stage)::text IS DISTINCT FROM (new.stage)::text) AND ((new.stage)::text <> ALL ((ARRAY['Import Started'::character varying, 'Import Preprocessing'::character varying])::text[])) AND (current_setting('biomero_importer.finishing'::text, true) IS DISTINCT FROM 'on'::text))) EXECUTE FUNCTION public.importer_order_stage_changed();

CREATE TRIGGER importer_order_wait BEFORE INSERT OR UPDATE ON public.importer_orders FOR EACH ROW WHEN ((new.waiting OR (new.wait_cause IS NOT NULL))) EXECUTE FUNCTION public.importer_order_wait();

CREATE TRIGGER importer_track_insert AFTER INSERT ON public.imports REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION public.importer_track_inserts('biomero_importer_orders');

CREATE TRIGGER importer_track_retry AFTER UPDATE OF stage ON public.imports FOR EACH ROW WHEN (((new.stage)::text = 'Import Pending'::text)) EXECUTE FUNCTION public.importer_track_order('biomero_importer_orders');

ALTER TABLE ONLY public.importer_outbox_delivery
    ADD CONSTRAINT importer_outbox_delivery_outbox_id_fkey FOREIGN KEY (outbox_id) REFERENCES public.importer_outbox(id) ON DELETE CASCADE;

ALTER TABLE ONLY public.imports
    ADD CONSTRAINT imports_preprocessing_id_fkey FOREIGN KEY (preprocessing_id) REFERENCES public.imports_preprocessing(id);
