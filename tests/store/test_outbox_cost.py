"""The outbox statements stay bounded: delivered rows and long histories are never scanned.

15,000 delivered outbox rows, 5,000 still owed (their webhook delivery rows, of which 100 are
due, and delivered email rows) and 100,000 history rows of 20,000 orders: claiming a batch of
one channel reads the due rows of that channel, and per claimed row its outcome's history row
and that order's own rows; ``show``'s read of one order's channels reads that order's rows;
pruning reads one batch; the backlog count stops at its cap. Every scan node of the executed
plans is checked, whatever plan PostgreSQL picks.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from biomero_importer.db import sql
from biomero_importer.db.urls import asyncpg_dsn
from tests.support import explain_nodes, rows_read

BATCH = 50
ROWS_PER_ORDER = 5


def scans(nodes: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """(node, rows read over all its loops) for every scan node."""
    return [
        (
            f"{n['Node Type']} {n.get('Index Name') or n.get('Relation Name')}",
            rows_read(n) * int(n.get("Actual Loops", 1)),
        )
        for n in nodes
        if "Scan" in str(n["Node Type"])
    ]


@pytest.mark.reliability
async def test_outbox_statements_read_a_bounded_number_of_rows(migrated_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        async with conn.transaction():
            # bulk rows without the queue triggers: only the statements' plans matter here
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "INSERT INTO imports (id, group_name, user_name, destination_id,"
                " destination_type, stage, uuid, files, timestamp)"
                " SELECT n, 'lab', 'u' || (n % 40), '1', 'Dataset',"
                " CASE n % 5 WHEN 1 THEN 'Import Pending' WHEN 2 THEN 'Import Started'"
                " WHEN 0 THEN 'Import Completed' ELSE 'Import Started' END,"
                " 'o' || ((n - 1) / 5), '[]', now() - (200000 - n) * interval '1 s'"
                " FROM generate_series(1, 100000) n"
            )
            await conn.execute(
                "INSERT INTO importer_orders (uuid, stage, latest_id, user_name, group_name)"
                " SELECT 'o' || k, 'Import Completed', k * 5 + 5, 'u', 'lab'"
                " FROM generate_series(0, 19999) k"
            )
            # outcome k is order k's terminal row (id k*5+5): 1,000 delivered long ago (to be
            # pruned), 14,000 delivered lately, 5,000 owed of which 100 are due now
            await conn.execute(
                "INSERT INTO importer_outbox (uuid, event_id, stage, created_at,"
                " next_attempt_at, done_at, delivered)"
                " SELECT 'o' || k, k * 5 + 5, 'Import Completed', now() - interval '20 days',"
                " CASE WHEN k < 15100 THEN now() - interval '1 minute'"
                " ELSE now() + interval '1 hour' END,"
                " CASE WHEN k < 1000 THEN now() - interval '10 days'"
                " WHEN k < 15000 THEN now() - interval '1 day' END,"
                " CASE WHEN k < 15000 THEN '{webhook}'::varchar[] ELSE '{}' END"
                " FROM generate_series(0, 19999) k"
            )
            await conn.execute(
                "INSERT INTO importer_outbox_delivery (outbox_id, channel, due_at, delivered_at)"
                " SELECT b.id, c, CASE WHEN k < 15100 THEN now() - interval '1 minute'"
                " ELSE now() + interval '1 hour' END,"
                " CASE WHEN c = 'email' OR k < 15000 THEN now() - interval '1 day' END"
                " FROM generate_series(0, 19999) k"
                " JOIN importer_outbox b ON b.event_id = k * 5 + 5,"
                " unnest(ARRAY['email', 'webhook']) c"
            )
        await conn.execute("ANALYZE imports")
        await conn.execute("ANALYZE importer_orders")
        await conn.execute("ANALYZE importer_outbox")
        await conn.execute("ANALYZE importer_outbox_delivery")
        tx = conn.transaction()
        await tx.start()
        try:
            claim = await explain_nodes(conn, sql.CLAIM_DELIVERIES, "webhook", BATCH, 300.0, "A")
            claimed = await conn.fetchval(
                "SELECT count(*) FROM importer_outbox_delivery WHERE attempts = 1"
            )
            shown = await explain_nodes(conn, sql.ORDER_DELIVERIES, "o15050")
            prune = await explain_nodes(conn, sql.PRUNE_NOTIFICATIONS, 7 * 24 * 3600.0, 1000)
            stats = await explain_nodes(conn, sql.NOTIFICATION_STATS, sql.QUEUE_STATS_CAP)
        finally:
            await tx.rollback()
    finally:
        await conn.close()

    assert claimed == BATCH
    # the due rows, then per claimed row: its outcome row, its queue row, its own history
    bound = BATCH * (ROWS_PER_ORDER + 4) + 200
    for name, read in scans(claim):
        assert read <= bound, (name, read)
    for name, read in scans(shown):
        assert read <= ROWS_PER_ORDER + 10, (name, read)
    for name, read in scans(prune):
        assert read <= 2 * 1000 + 100, (name, read)
    for name, read in scans(stats):
        assert read <= 2 * 5000 + 100, (name, read)
