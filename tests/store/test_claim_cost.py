"""The fair claim stays bounded: no scan in its plan grows with the history or the backlog.

The claim is one statement; what it reads is the running orders, and per user with pending
orders one index probe and at most ``slots`` index entries. Here 200,000 finished orders and
100,000 pending ones (nearly all of one user) sit in the queue table; every scan node of the
executed plan must read a few hundred rows at most, whatever plan PostgreSQL picks.
"""

from __future__ import annotations

import asyncpg
import pytest

from biomero_importer.db import sql
from biomero_importer.db.urls import asyncpg_dsn
from tests.support import explain_nodes, rows_read

SLOTS = 8
# generous: the running orders, plus users x (slots + 1) index entries, plus one probe each
MAX_ROWS_PER_SCAN = 200


@pytest.mark.reliability
@pytest.mark.parametrize("cap", [None, 3])
async def test_claim_reads_a_bounded_number_of_rows(migrated_url: str, cap: int | None) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        # No history rows behind these queue rows: the owner trigger keeps the given names.
        await conn.execute(
            "INSERT INTO importer_orders (uuid, stage, latest_id, user_name, group_name)"
            " SELECT 'f' || n, 'Import Completed', n, 'u' || (n % 40), 'lab'"
            " FROM generate_series(1, 200000) n"
        )
        await conn.execute(
            "INSERT INTO importer_orders (uuid, stage, latest_id, queued_at, user_name,"
            " group_name) SELECT 'p' || n, 'Import Pending', n, now() - n * interval '1 ms',"
            " CASE WHEN n % 50000 = 0 THEN 'other' || n ELSE 'busy' END, 'lab'"
            " FROM generate_series(1, 100000) n"
        )
        await conn.execute(
            "INSERT INTO importer_orders (uuid, stage, latest_id, worker_id, lease_expires_at,"
            " user_name, group_name) SELECT 'r' || n, 'Import Started', n, 'w', now()"
            " + interval '1 hour', 'busy', 'lab' FROM generate_series(1, 20) n"
        )
        await conn.execute("ANALYZE importer_orders")
        tx = conn.transaction()
        await tx.start()
        try:
            nodes = await explain_nodes(conn, sql.CLAIM, SLOTS, "bench", 60.0, cap)
            claimed = await conn.fetch(
                "SELECT uuid, user_name FROM importer_orders WHERE worker_id = 'bench'"
            )
        finally:
            await tx.rollback()
    finally:
        await conn.close()

    for node in nodes:
        if "Scan" not in str(node["Node Type"]):
            continue
        per_loop = rows_read(node)
        assert per_loop <= MAX_ROWS_PER_SCAN, (node["Node Type"], node.get("Index Name"), per_loop)
    users = sorted(row["user_name"] for row in claimed)
    # both light users get a slot despite 99,998 older orders of 'busy' (who runs 20 already);
    # with a cap of 3, busy gets none
    light = ["other100000", "other50000"]
    assert users == (["busy"] * (SLOTS - 2) + light if cap is None else light)


# --- issue 20: waits, cancel requests and the number of users cost nothing -----------------
PENDING = 20_000
GROUPS = 10
# per order claimed: its user's head, its row, its history row and the triggers' probes, plus
# per group two probes of importer_users_ix_head; once per claim, the promotion's probe and
# the running orders; and the index entries this claim's own earlier picks left behind (dead
# to it until it commits: at most one per pick and probe), so slots**2 at most
READS_PER_SLOT = 12 + 3 * GROUPS
READS_PER_CLAIM = 40
_N = "split_part(uuid, '-', 2)::int"


async def _reads_of_one_claim(conn: asyncpg.Connection, slots: int) -> tuple[int, int]:
    """(index entries plus rows of sequential scans read, orders claimed) by one claim, from
    the transaction's own statistics: they count the function's statements and triggers."""
    stats = (
        "SELECT COALESCE(sum(pg_stat_get_xact_tuples_returned(c.oid)), 0)::bigint"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('i', 'r')"
    )
    tx = conn.transaction()
    await tx.start()
    try:
        before = await conn.fetchval(stats)
        claimed = await conn.fetch(sql.CLAIM, slots, "bench", 60.0, None)
        after = await conn.fetchval(stats)
    finally:
        await tx.rollback()
    return after - before, len(claimed)


@pytest.mark.reliability
@pytest.mark.parametrize("users", [1, 4000])
async def test_claim_reads_do_not_grow_with_waits_cancels_or_users(
    migrated_url: str, users: int
) -> None:
    """Before: with every order waiting, one claim read every pending index entry, per user
    with orders (50,051,000 entries at 1,000 users x 100 orders); now it reads O(slots)."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    pending = "stage = 'Import Pending' AND worker_id IS NULL"
    heads = f"{pending} AND {_N} < {users}"
    cases = {
        "no_waits": [],
        "heads_waiting": [
            f"UPDATE importer_orders SET not_before = now() + interval '1 day', waiting = true"
            f" WHERE {heads}"
        ],
        "cancel_heads": [
            f"UPDATE importer_orders SET not_before = NULL, waiting = false WHERE {heads}",
            f"UPDATE importer_orders SET cancel_requested = true WHERE {heads}",
        ],
        "all_waiting": [
            f"UPDATE importer_orders SET cancel_requested = false WHERE {heads}",
            f"UPDATE importer_orders SET not_before = now() + interval '1 day', waiting = true"
            f" WHERE {pending}",
        ],
    }
    try:
        await conn.execute(
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files) SELECT 'lab' || (n % $3), 'u' || (n % $2), '1', 'Dataset',"
            " 'Import Pending', 'o-' || n, '[]' FROM generate_series(0, $1 - 1) n",
            PENDING,
            users,
            GROUPS,
        )
        await conn.execute(
            f"UPDATE importer_orders SET queued_at = now() - interval '1 ms' * ($1 - {_N})",
            PENDING,
        )
        for case, statements in cases.items():
            for statement in statements:
                await conn.execute(statement)
            # as autovacuum leaves them: right after a bulk UPDATE (the case's setup) the first
            # scan of an index also reads the entries of the rows' old versions, once
            await conn.execute("VACUUM ANALYZE importer_orders, importer_users")
            for slots in (4, 16):
                reads, claimed = await _reads_of_one_claim(conn, slots)
                expected = 0 if case == "all_waiting" else min(slots, PENDING)
                assert claimed == expected, (case, slots, claimed)
                bound = READS_PER_CLAIM + READS_PER_SLOT * slots + slots**2
                assert reads <= bound, (case, users, slots, reads, bound)
    finally:
        await conn.close()


@pytest.mark.reliability
async def test_a_burst_after_a_quiet_spell_is_claimed_from_the_ready_index(
    migrated_url: str,
) -> None:
    """Statistics taken while nothing was pending (a quiet facility: autovacuum analyzes a
    table of finished orders) and then a burst of orders. Before: each pick and each look-up
    of the user's next head walked importer_orders_ix_pending, every pending order, and
    sorted them (about 6 ms per pick with 5,000 waiting in the dispatch benchmark, 10x the
    claim's usual cost); now they read the ready index from the head."""
    setup = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        insert = (
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files) SELECT 'lab', 'u', '1', 'Dataset', $2, $3 || n, '[]'"
            " FROM generate_series(1, $1) n"
        )
        await setup.execute(insert, 200, "Import Completed", "done-")
        await setup.execute("ANALYZE importer_orders, importer_users")
        await setup.execute(insert, PENDING // 4, "Import Pending", "burst-")
    finally:
        await setup.close()
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))  # plans made afresh
    try:
        for slots in (1, 4, 16):
            reads, claimed = await _reads_of_one_claim(conn, slots)
            assert claimed == slots
            bound = READS_PER_CLAIM + READS_PER_SLOT * slots + slots**2
            assert reads <= bound, (slots, reads, bound)
    finally:
        await conn.close()


@pytest.mark.reliability
async def test_one_users_backlog_is_claimed_as_one_run(migrated_url: str) -> None:
    """Issue 22: a claim of N slots from one user's backlog moved that user's head N times
    (one update of importer_users, one probe and one pick per order); when no other user has
    an order ready, the claim takes the run of N in one pick and moves the head once."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        await conn.execute(
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files) SELECT 'lab', 'alice', '1', 'Dataset', 'Import Pending',"
            " 'a-' || n, '[]' FROM generate_series(1, 20) n"
        )
        counts = (
            "SELECT pg_stat_get_xact_tuples_updated('importer_users'::regclass),"
            " pg_stat_get_xact_tuples_inserted('imports'::regclass)"
        )
        tx = conn.transaction()
        await tx.start()
        try:
            before = await conn.fetchrow(counts)
            claimed = await conn.fetch(sql.CLAIM, 8, "bench", 60.0, None)
            after = await conn.fetchrow(counts)
        finally:
            await tx.rollback()
        # the oldest eight, each with its 'Import Started' row
        assert sorted(int(row["uuid"][2:]) for row in claimed) == list(range(1, 9))
        assert after[1] - before[1] == 8
        assert after[0] - before[0] == 1
    finally:
        await conn.close()
