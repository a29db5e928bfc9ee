"""Claim benchmark: what one fair claim costs on a bad day, by users and by what waits.

Times ``PostgresStore.claim`` (the fair claim and its 'Import Started' rows: what a replica
pays per claim) on a real PostgreSQL (embedded unless --database-url or
BIOMERO_IMPORTER_TEST_DATABASE_URL names one). For each number of users it queues --pending
orders through ``imports`` as SQL writers do (user ``u<n % users>``, each order its own
``queued_at``), then measures four cases:

- ``no_waits``: every order is ready;
- ``heads_waiting``: each user's oldest order waits (``not_before`` a day ahead);
- ``cancel_heads``: each user's oldest order has a cancel request no sweep has ended yet;
- ``all_waiting``: every order waits, as during an OMERO outage: nothing can be claimed.

Claimed orders are handed back at once, so the queue keeps its shape; a claim that finds
nothing is measured like any other (it is the bad day's common case). Besides p50/p99 it
prints what one claim read, from one extra claim inside a transaction that is rolled back:
the index entries and the rows of sequential scans its statements (and their triggers and
functions) read, from the transaction's own statistics (``pg_stat_get_xact_tuples_returned``),
and the buffers of ``EXPLAIN (ANALYZE, BUFFERS)``.

    python benchmarks/claim.py
    python benchmarks/claim.py --users 1 50 1000 10000 --pending 100000 --json
    python benchmarks/claim.py --users 1000 --cases all_waiting --rounds 5

It runs on any revision of the schema (before the ready queue, waits are ``not_before``
only), so the same command measures the code before and after a change.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from dispatch import fresh_database, percentile

from biomero_importer.db import sql
from biomero_importer.db.migrate import migrate
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import STAGE_NEW_ORDER
from biomero_importer.store import Finish, PostgresStore

CASES = ("no_waits", "heads_waiting", "cancel_heads", "all_waiting")

# queue rows of this run: 'o-<n>', n = 0 the oldest; a user's head is n < users
_N = "split_part(uuid, '-', 2)::int"


async def has_column(conn: asyncpg.Connection, table: str, column: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = $1 AND column_name = $2",
            table,
            column,
        )
    )


async def queue(conn: asyncpg.Connection, pending: int, users: int) -> None:
    tables = "imports, importer_orders, importer_outbox"
    if await conn.fetchval("SELECT to_regclass('importer_users') IS NOT NULL"):
        tables += ", importer_users"
    # CASCADE: the outbox's per-channel deliveries (and whatever a later revision hangs on
    # these tables) go with them
    await conn.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    await conn.execute(
        "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
        " stage, uuid, files)"
        " SELECT 'lab' || (n % 10), 'u' || (n % $2), '1', 'Dataset', 'Import Pending',"
        " 'o-' || n, '[\"/data/x.tif\"]' FROM generate_series(0, $1 - 1) n",
        pending,
        users,
    )
    # one INSERT gives every order the same now(): spread them, oldest first by n
    await conn.execute(
        f"UPDATE importer_orders SET queued_at = now() - interval '1 ms' * ($1 - {_N})", pending
    )
    await conn.execute("VACUUM ANALYZE importer_orders")


async def set_case(conn: asyncpg.Connection, case: str, users: int, ready_queue: bool) -> None:
    """Put the queue into ``case`` (from ``no_waits``, or from the case before it)."""
    waits = "not_before = now() + interval '1 day'" + (", waiting = true" if ready_queue else "")
    unwaits = "not_before = NULL" + (", waiting = false" if ready_queue else "")
    heads = f"{_N} < {users}"
    pending = "stage = 'Import Pending' AND worker_id IS NULL"
    statements = {
        "no_waits": [],
        "heads_waiting": [f"UPDATE importer_orders SET {waits} WHERE {pending} AND {heads}"],
        "cancel_heads": [
            f"UPDATE importer_orders SET {unwaits} WHERE {pending} AND {heads}",
            f"UPDATE importer_orders SET cancel_requested = true WHERE {pending} AND {heads}",
        ],
        "all_waiting": [
            f"UPDATE importer_orders SET cancel_requested = false WHERE {pending} AND {heads}",
            f"UPDATE importer_orders SET {waits} WHERE {pending}",
        ],
    }[case]
    for statement in statements:
        await conn.execute(statement)
    await conn.execute("VACUUM ANALYZE importer_orders")


async def reads_of_one_claim(conn: asyncpg.Connection, slots: int) -> dict[str, int]:
    """What one claim reads: run inside a transaction that is rolled back."""
    # this transaction's counters: entries returned by each index, rows read by seq scans
    stats = """
        SELECT COALESCE(sum(pg_stat_get_xact_tuples_returned(c.oid))
                        FILTER (WHERE c.relkind = 'i'), 0)::bigint,
               COALESCE(sum(pg_stat_get_xact_tuples_returned(c.oid))
                        FILTER (WHERE c.relkind = 'r'), 0)::bigint
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public'
    """
    tx = conn.transaction()
    await tx.start()
    try:
        index_before, heap_before = await conn.fetchrow(stats)
        plan = await conn.fetchval(
            f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql.CLAIM}", slots, "reads", 600.0, None
        )
        index_after, heap_after = await conn.fetchrow(stats)
    finally:
        await tx.rollback()
    top = json.loads(plan)[0]["Plan"]
    return {
        "index_entries_read": int(index_after - index_before),
        "seq_rows_read": int(heap_after - heap_before),
        "buffers": int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0)),
    }


async def time_claims(
    store: PostgresStore, rounds: int, slots: int, budget: float
) -> dict[str, float]:
    durations: list[float] = []
    claimed_total = 0
    deadline = time.monotonic() + budget
    while len(durations) < rounds and (len(durations) < 3 or time.monotonic() < deadline):
        started = time.perf_counter()
        claimed = await store.claim(slots)
        durations.append((time.perf_counter() - started) * 1000)
        claimed_total += len(claimed)
        for order in claimed:
            await store.finish(
                Finish(order.uuid, STAGE_NEW_ORDER, "benchmark hand-back", run=order.runs)
            )
    return {
        "claims": len(durations),
        "claimed_per_claim": claimed_total / len(durations),
        "claim_p50_ms": percentile(durations, 50),
        "claim_p99_ms": percentile(durations, 99),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="biomero-claim-bench-"))
    with fresh_database(args.database_url, workdir) as url:
        migrate(url, channel="biomero_importer_orders")
        dsn = asyncpg_dsn(url)
        conn = await asyncpg.connect(dsn)
        if args.no_sync_commit:
            # the claim's own cost, without the disk's flush at each commit (the same for
            # every claim statement; on a busy disk it dominates)
            await conn.execute("ALTER ROLE CURRENT_USER SET synchronous_commit = off")
        store = PostgresStore(dsn, worker_id="bench", lease_seconds=600, pool_size=2)
        await store.open()
        try:
            ready_queue = await has_column(conn, "importer_orders", "waiting")
            for users in args.users:
                await queue(conn, args.pending, users)
                for case in CASES:
                    await set_case(conn, case, users, ready_queue)
                    if case not in args.cases:
                        continue
                    timing = await time_claims(store, args.rounds, args.slots, args.budget)
                    reads = await reads_of_one_claim(conn, args.slots)
                    result = {"users": users, "pending": args.pending, "case": case}
                    results.append({**result, **timing, **reads})
                    if not args.json:
                        print(describe(results[-1], args.slots), flush=True)
        finally:
            await store.close()
            await conn.close()
    return results


def describe(r: dict[str, Any], slots: int) -> str:
    return (
        f"users={r['users']:>6,} pending={r['pending']:,} {r['case']:<14}"
        f" claim of {slots}: p50={r['claim_p50_ms']:8.2f} ms p99={r['claim_p99_ms']:8.2f} ms"
        f" (n={r['claims']}, {r['claimed_per_claim']:.1f} claimed)"
        f" index entries read={r['index_entries_read']:>9,} seq rows={r['seq_rows_read']:>7,}"
        f" buffers={r['buffers']:>7,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--users", type=int, nargs="+", default=[1, 50, 1000, 10_000])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--slots", type=int, default=4, help="orders per claim")
    parser.add_argument("--rounds", type=int, default=200, help="claims per case (at most)")
    parser.add_argument(
        "--budget", type=float, default=15.0, help="seconds per case (at least 3 claims)"
    )
    parser.add_argument(
        "--no-sync-commit",
        action="store_true",
        help="claims commit without waiting for the WAL flush (for the benchmark's role)",
    )
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
