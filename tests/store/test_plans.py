"""What the statements on an order's path are planned to do, and how often they are planned.

A client that keeps its connection (a web application's pool, a script's loop or
``executemany``), and every replica's pooled connection, runs the triggers' and the claim's
statements from plans its session made at the first calls; PostgreSQL plans them again only
when the tables' statistics change (ANALYZE). With the statistics of a near-empty queue (a
young deployment, or right after a quiet spell) a plan that scans the whole queue is the
cheapest, and it stayed while the queue grew: every later insert of that session read every
queue row, so a burst of N orders cost N² row reads (PostgreSQL 15, pg_stat_statements: 10,000
orders inserted after statistics of 50 took 726 µs each, 159 µs each after statistics of
1,000). Revision f3c5e7a9b1d4 prices sequential scans out of these functions, revision
a7c9e1b3d5f6 keeps the claim's plans instead of planning three statements at every pick, and
revision b8d0f2a4c6e8 keeps the ending's kept plan from walking every running order's lease.
"""

from __future__ import annotations

import json

import asyncpg
import pytest

from biomero_importer.db import sql
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import STAGE_IMPORTED, STAGE_PREPROCESSING

INSERT = (
    "INSERT INTO imports (group_name, user_name, destination_id, destination_type, stage,"
    " uuid, files) VALUES ('Demo', $1, '151', 'Dataset', 'Import Pending', $2, $3)"
)
FILES = json.dumps(["/data/a.tif"])

SCANS = """
SELECT relname, seq_scan FROM pg_stat_xact_user_tables
WHERE relname IN ('importer_orders', 'importer_users', 'imports')
"""


async def _young_queue(conn: asyncpg.Connection, rows: list[tuple[str, str, str]]) -> None:
    """Queue ``rows`` and take the statistics of that small queue."""
    await conn.executemany(INSERT, rows)
    await conn.execute("ANALYZE importer_orders, importer_users, imports")


async def _seq_scans(conn: asyncpg.Connection) -> dict[str, int]:
    """Sequential scans per table so far in this transaction."""
    return {r["relname"]: r["seq_scan"] for r in await conn.fetch(SCANS)}


async def _end(
    conn: asyncpg.Connection, worker: str | None, uuids: list[str], runs: list[int]
) -> list[asyncpg.Record]:
    """An ending of ``uuids`` ('Import Completed') in the name of ``worker``."""
    n = len(uuids)
    return await conn.fetch(
        sql.FINISH_MANY,
        uuids,
        [STAGE_IMPORTED] * n,
        *([[None] * n] * 3),
        worker,
        [None] * n,
        [False] * n,
        [False] * n,
        [None] * n,
        runs,
    )


async def _claim_and_end(conn: asyncpg.Connection, slots: int) -> list[asyncpg.Record]:
    """A claim of ``slots`` by worker A and the ending of every order it took."""
    claimed = await conn.fetch(sql.CLAIM, slots, "A", 60.0, None)
    ended = await _end(conn, "A", [c["uuid"] for c in claimed], [c["runs"] for c in claimed])
    assert {r["uuid"] for r in ended} == {c["uuid"] for c in claimed}
    return claimed


async def test_a_long_client_session_never_scans_the_queue_after_small_statistics(
    migrated_url: str,
) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        # the statistics of a young queue: 20 rows on one page
        await _young_queue(conn, [("researcher", f"early-{n}", FILES) for n in range(20)])
    finally:
        await conn.close()

    client = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        # The session plans its lookups while the queue is small, then keeps inserting. A
        # second user's orders and a second row of one order (a client's own stage change)
        # take the triggers' other branches.
        rows = [("researcher", f"burst-{n}", FILES) for n in range(300)]
        rows += [("other", f"other-{n}", FILES) for n in range(20)]
        rows.append(("researcher", "burst-7", FILES))
        async with client.transaction():
            before = await _seq_scans(client)
            await client.executemany(INSERT, rows)
            after = await _seq_scans(client)
    finally:
        await client.close()
    scans = {table: after[table] - before.get(table, 0) for table in after}
    # importer_users has a row per user: a scan of it reads two rows here and stays tiny
    assert scans.get("importer_orders", 0) == 0, scans
    assert scans.get("imports", 0) == 0, scans


async def test_a_replicas_claims_and_endings_never_scan_the_queue_after_small_statistics(
    migrated_url: str,
) -> None:
    """The same for a replica's pooled connection: it plans the claim and the ending while the
    queue is young, then drains a burst that came after."""
    client = await asyncpg.connect(asyncpg_dsn(migrated_url))
    replica = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        await _young_queue(client, [("researcher", f"early-{n}", FILES) for n in range(20)])
        # more than the five runs after which PostgreSQL may keep a generic plan
        for _ in range(8):
            await _claim_and_end(replica, 2)
        await client.executemany(INSERT, [("researcher", f"burst-{n}", FILES) for n in range(500)])
        async with replica.transaction():
            before = await _seq_scans(replica)
            for _ in range(5):
                assert len(await _claim_and_end(replica, 8)) == 8
            after = await _seq_scans(replica)
    finally:
        await client.close()
        await replica.close()
    scans = {table: after[table] - before.get(table, 0) for table in after}
    assert scans.get("importer_orders", 0) == 0, scans
    assert scans.get("imports", 0) == 0, scans


OUR_SETTINGS = """
SELECT p.proname, p.proconfig FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = current_schema() AND p.proname LIKE 'importer%'
  AND p.proconfig IS NOT NULL
"""


async def test_every_function_that_prices_out_scans_also_turns_jit_off(migrated_url: str) -> None:
    """A scan a plan cannot avoid costs 10^10 with ``enable_seqscan = off``, past every JIT
    threshold: where the server has JIT, such a statement is compiled at each execution (83 ms
    each for the ending's channel lookup on PostgreSQL 15). So the two settings go together."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        settings = {r["proname"]: set(r["proconfig"]) for r in await conn.fetch(OUR_SETTINGS)}
    finally:
        await conn.close()
    pricing_out = {name for name, config in settings.items() if "enable_seqscan=off" in config}
    assert {"importer_track_inserts", "importer_claim", "importer_finish"} <= pricing_out
    assert all("jit=off" in settings[name] for name in pricing_out), settings


async def test_no_statement_of_an_orders_path_is_compiled_by_jit(migrated_url: str) -> None:
    """Where the server has JIT (the embedded PostgreSQL has none: run it with
    BIOMERO_IMPORTER_TEST_DATABASE_URL naming one that has), auto_explain reports every
    statement of a client's insert, a claim and an ending, nested ones included."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        if not await conn.fetchval("SELECT pg_jit_available()"):
            pytest.skip("this PostgreSQL has no JIT")
        try:
            await conn.execute("LOAD 'auto_explain'")
        except (asyncpg.InsufficientPrivilegeError, asyncpg.UndefinedFileError) as exc:
            pytest.skip(f"auto_explain cannot be loaded here: {exc}")
        for setting in (
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_nested_statements = on",
            "auto_explain.log_analyze = on",
            "auto_explain.log_timing = off",
            "auto_explain.log_level = notice",
            "client_min_messages = notice",
        ):
            await conn.execute(f"SET {setting}")
        plans: list[str] = []
        conn.add_log_listener(lambda _conn, message: plans.append(message.message))
        await conn.execute(INSERT, "researcher", "jit-1", FILES)
        assert len(await _claim_and_end(conn, 1)) == 1
        await conn.execute("SELECT 1")  # the notices above have arrived
    finally:
        await conn.close()
    assert plans, "auto_explain reported nothing"
    # each report: its duration, then "Query Text:" and the statement
    jitted = [" ".join(plan.split())[:160] for plan in plans if "JIT:" in plan]
    assert not jitted, jitted


async def test_a_claim_and_an_ending_are_not_planned_again_once_the_session_has_them(
    migrated_url: str,
) -> None:
    """PostgreSQL plans a statement of a function afresh at every call as long as it expects
    the fresh plan to be cheaper than the kept one, which for the claim's pick (its LIMIT and
    its user are parameters) and for its update (the picks) was always: three plannings per
    pick, about 220 µs of a 1.2 ms claim of 8 (PostgreSQL 15, pg_stat_statements with
    track_planning). ``log_planner_stats`` reports every planning, nested ones included."""
    client = await asyncpg.connect(asyncpg_dsn(migrated_url))
    replica = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        # two users: a claim of 2 takes one order per pick, two picks per claim
        rows = [(user, f"{user}-{n}", FILES) for n in range(40) for user in ("ann", "bob")]
        await _young_queue(client, rows)
        for _ in range(8):  # past the five calls after which a kept plan may be chosen
            await _claim_and_end(replica, 2)
        plannings: list[str] = []
        replica.add_log_listener(lambda _conn, message: plannings.append(message.message))
        try:
            await replica.execute("SET log_planner_stats = on")
        except asyncpg.InsufficientPrivilegeError:
            pytest.skip("log_planner_stats needs a superuser")
        await replica.execute("SET client_min_messages = log")
        for _ in range(3):
            assert len(await _claim_and_end(replica, 2)) == 2
        await replica.execute("RESET log_planner_stats")
    finally:
        await client.close()
        await replica.close()
    assert [p for p in plannings if "PLANNER STATISTICS" in p] == []


LEASE_READS = "SELECT pg_stat_get_xact_tuples_returned('importer_orders_ix_leases'::regclass)"


async def _many_running(client: asyncpg.Connection, replica: asyncpg.Connection) -> None:
    """Statistics taken while nothing ran, the replica's session past its first plans, and
    300 orders running on another replica (B) beside 8 ready ones."""
    await _young_queue(client, [("researcher", f"early-{n}", FILES) for n in range(20)])
    for _ in range(8):  # past the five calls after which a kept plan may be chosen
        await _claim_and_end(replica, 2)
    await client.executemany(INSERT, [("other", f"busy-{n}", FILES) for n in range(300)])
    assert len(await client.fetch(sql.CLAIM, 300, "B", 600.0, None)) == 300
    await client.executemany(INSERT, [("researcher", f"late-{n}", FILES) for n in range(8)])


async def test_an_ending_reads_its_own_orders_however_many_others_are_running(
    migrated_url: str,
) -> None:
    """The ending's kept plan came from statistics taken while no order was running, when
    ``worker_id = $6`` looked like one row: it walked every lease (importer_orders_ix_leases)
    and compared each with each order it ended. With 6,400 orders running, an ending of 32
    took 50 ms instead of 3 (PostgreSQL 15); it may read only the orders it ends."""
    client = await asyncpg.connect(asyncpg_dsn(migrated_url))
    replica = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        await _many_running(client, replica)
        async with replica.transaction():
            claimed = await replica.fetch(sql.CLAIM, 8, "A", 60.0, None)
            assert len(claimed) == 8
            before = await replica.fetchval(LEASE_READS)
            ended = await _end(
                replica, "A", [c["uuid"] for c in claimed], [c["runs"] for c in claimed]
            )
            reads = await replica.fetchval(LEASE_READS) - before
    finally:
        await client.close()
        await replica.close()
    assert len(ended) == 8
    assert reads == 0, f"the ending read {reads} leases"


@pytest.mark.parametrize(
    ("statement", "args"),
    [
        (sql.APPEND_STAGE, (STAGE_PREPROCESSING, None, None)),
        (sql.RECORD_OBJECTS, ("[]",)),
        (sql.RECORD_PROGRESS, ('{"units_done": 1}',)),
    ],
    ids=["append_stage", "record_objects", "record_progress"],
)
async def test_an_owners_write_reads_its_own_order_however_many_others_are_running(
    migrated_url: str, statement: str, args: tuple[str | None, ...]
) -> None:
    """The same for the owner's writes to one order, prepared statements the pool keeps:
    their generic plans walked every running order's lease to find the one they name."""
    client = await asyncpg.connect(asyncpg_dsn(migrated_url))
    replica = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        await _many_running(client, replica)
        claimed = await replica.fetch(sql.CLAIM, 8, "A", 60.0, None)
        assert len(claimed) == 8
        # uuid and worker first and the run last, as each of these statements takes them
        calls = [(c["uuid"], "A", *args, c["runs"]) for c in claimed]
        for call in calls[:6]:  # past the five runs after which the generic plan may be kept
            await replica.execute(statement, *call)
        async with replica.transaction():
            before = await replica.fetchval(LEASE_READS)
            for call in calls[6:]:
                await replica.execute(statement, *call)
            reads = await replica.fetchval(LEASE_READS) - before
    finally:
        await client.close()
        await replica.close()
    assert reads == 0, f"two writes read {reads} leases"


async def test_a_lease_renewal_reads_its_own_orders_however_many_others_are_running(
    migrated_url: str,
) -> None:
    """A heartbeat renews the replica's own leases; its generic plan walked every replica's."""
    client = await asyncpg.connect(asyncpg_dsn(migrated_url))
    replica = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        await _many_running(client, replica)
        uuids = [c["uuid"] for c in await replica.fetch(sql.CLAIM, 8, "A", 60.0, None)]
        for _ in range(6):  # past the five runs after which the generic plan may be kept
            await replica.fetch(sql.RENEW_LEASES, "A", uuids, 60.0)
        async with replica.transaction():
            before = await replica.fetchval(LEASE_READS)
            renewed = await replica.fetch(sql.RENEW_LEASES, "A", uuids, 60.0)
            reads = await replica.fetchval(LEASE_READS) - before
    finally:
        await client.close()
        await replica.close()
    assert sorted(r["uuid"] for r in renewed if r["renewed"]) == sorted(uuids)
    assert reads == 0, f"a renewal of 8 read {reads} leases"


async def test_the_owner_test_takes_no_worker_for_the_owner_of_an_unowned_order(
    migrated_url: str,
) -> None:
    """The owner test that keeps the plans off the leases index must still answer as '=':
    an ending or a progress write in the name of no worker (NULL) touches no order, least of
    all the waiting ones nobody owns (``IS NOT DISTINCT FROM`` would have ended them)."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        await conn.executemany(INSERT, [("researcher", f"unowned-{n}", FILES) for n in range(2)])
        uuids = ["unowned-0", "unowned-1"]
        ended = await _end(conn, None, uuids, [0, 0])
        written = await conn.execute(sql.RECORD_OBJECTS, "unowned-0", None, "[]", 0)
        stages = await conn.fetch(
            "SELECT stage FROM importer_orders WHERE uuid = ANY($1::text[])", uuids
        )
    finally:
        await conn.close()
    assert ended == []
    assert written == "UPDATE 0"
    assert [r["stage"] for r in stages] == ["Import Pending"] * 2
