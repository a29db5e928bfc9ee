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
