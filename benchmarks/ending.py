"""What a claim and an ending cost PostgreSQL per order, in the rhythm of a draining replica.

Queues --orders orders (single-row INSERTs, then ANALYZE), then claims them in claims of
--batch and ends them ('Import Completed') in endings of --batch, keeping about --in-flight
orders claimed and not yet ended, as a replica with ``max_workers`` of that size does; on one
connection, with the statements the replica sends (``db/sql.py``). With --channels, replicas
with those notification channels are registered first, so every outcome is owed them. Prints
the microseconds per order of the claims and of the endings (client round trips included:
one per claim or ending, so a small share of a batch of 16) and the outbox rows written. It
runs on any revision, so a change is judged by running it on the build before and after
(``PYTHONPATH=<other checkout>/src``), interleaved:

    python benchmarks/ending.py --orders 6400 --batch 16 --in-flight 64
    python benchmarks/ending.py --channels webhook email
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import asyncpg
from dispatch import INSERT, fresh_database

from biomero_importer.db import sql
from biomero_importer.db.migrate import migrate
from biomero_importer.db.urls import asyncpg_dsn

WORKER = "bench-replica"


async def _end(conn: asyncpg.Connection, claimed: list[asyncpg.Record]) -> None:
    n = len(claimed)
    await conn.fetch(
        sql.FINISH_MANY,
        [c["uuid"] for c in claimed],
        ["Import Completed"] * n,
        [None] * n,
        [None] * n,
        ['[{"type": "Image", "id": 1}]'] * n,
        WORKER,
        [None] * n,
        [False] * n,
        [False] * n,
        [None] * n,
        [c["runs"] for c in claimed],
    )


async def run(url: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        if args.channels:
            await conn.execute(
                "INSERT INTO importer_notify_replicas (worker_id, channels) VALUES ($1, $2)",
                WORKER,
                args.channels,
            )
        await conn.executemany(INSERT, [(f"o-{n}", '["/data/a.tif"]') for n in range(args.orders)])
        await conn.execute("ANALYZE")
        held: list[asyncpg.Record] = []
        claiming = ending = 0.0
        ended = 0
        while True:
            start = time.perf_counter()
            rows = await conn.fetch(sql.CLAIM, args.batch, WORKER, 600.0, None)
            claiming += time.perf_counter() - start
            held.extend(rows)
            if len(held) > args.in_flight or not rows:
                batch, held = held[: args.batch], held[args.batch :]
                if not batch:
                    break
                start = time.perf_counter()
                await _end(conn, batch)
                ending += time.perf_counter() - start
                ended += len(batch)
        outbox = await conn.fetchval("SELECT count(*) FROM importer_outbox")
        deliveries = await conn.fetchval("SELECT count(*) FROM importer_outbox_delivery")
    finally:
        await conn.close()
    print(
        f"{ended} orders in claims and endings of {args.batch}, about {args.in_flight} in"
        f" flight: claim {claiming / ended * 1e6:.1f} µs/order,"
        f" ending {ending / ended * 1e6:.1f} µs/order;"
        f" outbox rows {outbox}, delivery rows {deliveries}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=6400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--channels", nargs="*", default=[], help="channels owed every outcome")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="biomero-ending-"))
    with fresh_database(args.database_url, workdir) as url:
        migrate(url, channel=sql.DEFAULT_CHANNEL)
        asyncio.run(run(url, args))


if __name__ == "__main__":
    main()
