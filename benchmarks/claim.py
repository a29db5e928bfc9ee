"""Claim benchmark: what one fair claim costs as the history and the pending queue grow.

Times ``PostgresStore.claim`` (the fair CLAIM statement plus the 'Import Started' rows, one
transaction: what a replica pays per claim) on a real PostgreSQL (embedded unless
--database-url or BIOMERO_IMPORTER_TEST_DATABASE_URL names one). Each case queues --pending
orders spread over --users users, then claims --slots orders at a time and hands them back at
once, so the queue keeps its size. The history is grown in place from the first size to the
second, so both sizes are measured on one database.

    python benchmarks/claim.py
    python benchmarks/claim.py --history 10000 1000000 --pending 10000 --users 1 50 1000 --json
    python benchmarks/claim.py --history 10000 --users 1 50 --waiting 0 5000 9000

--waiting N makes the N first-queued orders wait (``not_before`` a day ahead), as orders do
during an OMERO outage: the claim skips them, and this shows what skipping costs.
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
from dispatch import fill_history, fresh_database, percentile

from biomero_importer.db.migrate import migrate
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import STAGE_NEW_ORDER
from biomero_importer.store import Finish, PostgresStore


async def queue_pending(url: str, pending: int, users: int, tag: str) -> None:
    """``pending`` orders, user ``u<n % users>`` in one of 10 groups, oldest first by id."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files)"
            " SELECT 'lab' || (n % 10), 'u' || (n % $2), '1', 'Dataset', 'Import Pending',"
            " $3 || '-' || n, '[\"/data/x.tif\"]' FROM generate_series(0, $1 - 1) n",
            pending,
            users,
            tag,
        )
        await conn.execute("ANALYZE importer_orders")
    finally:
        await conn.close()


async def make_waiting(url: str, waiting: int, tag: str) -> None:
    """The ``waiting`` first orders of ``queue_pending`` wait a day (``not_before``)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE importer_orders SET not_before = now() + interval '1 day'"
            " WHERE uuid IN (SELECT $2 || '-' || n FROM generate_series(0, $1 - 1) n)",
            waiting,
            tag,
        )
        await conn.execute("ANALYZE importer_orders")
    finally:
        await conn.close()


async def drop_pending(url: str) -> None:
    """End every pending order of the previous case (a benchmark database only)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE importer_orders SET stage = 'Import Failed' WHERE stage = 'Import Pending'"
        )
    finally:
        await conn.close()


async def time_claims(url: str, rounds: int, slots: int) -> dict[str, float]:
    store = PostgresStore(asyncpg_dsn(url), worker_id="bench", lease_seconds=600, pool_size=2)
    await store.open()
    durations: list[float] = []
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            claimed = await store.claim(slots)
            durations.append((time.perf_counter() - started) * 1000)
            assert len(claimed) == slots, len(claimed)
            for order in claimed:
                await store.finish(Finish(order.uuid, STAGE_NEW_ORDER, "benchmark hand-back"))
    finally:
        await store.close()
    return {
        "claim_p50_ms": percentile(durations, 50),
        "claim_p99_ms": percentile(durations, 99),
        "claim_mean_ms": sum(durations) / len(durations),
    }


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="biomero-claim-bench-"))
    with fresh_database(args.database_url, workdir) as url:
        migrate(url, channel="biomero_importer_orders")
        filled = 0
        for history in sorted(args.history):
            await fill_history(url, history - filled)
            filled = history
            for users in args.users:
                for waiting in args.waiting:
                    await drop_pending(url)
                    tag = f"h{history}-u{users}-w{waiting}"
                    await queue_pending(url, args.pending, users, tag)
                    await make_waiting(url, waiting, tag)
                    timing = await time_claims(url, args.rounds, args.slots)
                    result = {
                        "history_rows": history,
                        "pending": args.pending,
                        "users": users,
                        "waiting": waiting,
                    }
                    results.append({**result, **timing})
                    if not args.json:  # as each case ends: the large history takes minutes
                        print(describe(results[-1], args.slots), flush=True)
    return results


def describe(r: dict[str, Any], slots: int) -> str:
    return (
        f"history={r['history_rows']:>9,} pending={r['pending']:,} users={r['users']:>5}"
        f" waiting={r['waiting']:>6,}:"
        f" claim of {slots} p50={r['claim_p50_ms']:.2f} ms"
        f" p99={r['claim_p99_ms']:.2f} ms mean={r['claim_mean_ms']:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--pending", type=int, default=10_000)
    parser.add_argument("--users", type=int, nargs="+", default=[1, 50, 1000])
    parser.add_argument(
        "--waiting", type=int, nargs="+", default=[0], help="of them waiting (not_before ahead)"
    )
    parser.add_argument("--slots", type=int, default=4, help="orders per claim")
    parser.add_argument("--rounds", type=int, default=300, help="claims per case")
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON list")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
