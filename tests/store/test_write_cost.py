"""What one order writes on its own path, counted by PostgreSQL inside the transaction.

``pg_stat_xact_user_tables`` counts row writes not yet reported, triggers included (its
figures may still hold an earlier transaction's, so each step is the difference from the
start of its own transaction, where nothing is reported meanwhile):
a claim and an ending each update the order's queue row once (revision d8f0b2c4e6a5; before,
twice: the lease or its release, then the history trigger for the new row), and an outcome
that owes no notification channel inserts no outbox row (revision c6e8a0b2d4f3).
"""

from __future__ import annotations

import asyncpg

from biomero_importer.db import sql
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import STAGE_IMPORTED, STAGE_IMPORTING
from tests.support import insert_order

WRITES = """
SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables
WHERE relname IN ('imports', 'importer_orders', 'importer_outbox')
"""


async def _counts(conn: asyncpg.Connection) -> dict[str, tuple[int, int]]:
    return {r["relname"]: (r["n_tup_ins"], r["n_tup_upd"]) for r in await conn.fetch(WRITES)}


def _since(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """(inserted, updated) rows per table written between two counts; untouched tables left
    out."""
    written = {}
    for table, (ins, upd) in after.items():
        was_ins, was_upd = before.get(table, (0, 0))
        if (ins - was_ins, upd - was_upd) != (0, 0):
            written[table] = (ins - was_ins, upd - was_upd)
    return written


async def test_a_claim_and_an_ending_each_write_the_queue_row_once(migrated_url: str) -> None:
    uuid = await insert_order(migrated_url, ["/data/a.tif"])
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        async with conn.transaction():
            before = await _counts(conn)
            [claimed] = await conn.fetch(sql.CLAIM, 1, "A", 60.0, None)
            assert claimed["uuid"] == uuid
            assert _since(before, await _counts(conn)) == {
                "imports": (1, 0),  # the 'Import Started' row
                "importer_orders": (0, 1),
            }
        async with conn.transaction():
            before = await _counts(conn)
            ended = await conn.fetch(
                sql.FINISH_MANY,
                [uuid],
                [STAGE_IMPORTED],
                ["Imported"],
                [None],
                [None],
                "A",
                [None],
                [False],
                [False],
                [None],
                [claimed["runs"]],
            )
            assert [(r["uuid"], r["runs"]) for r in ended] == [(uuid, claimed["runs"])]
            # no channel is configured: no outbox row either
            written = _since(before, await _counts(conn))
            assert written == {"imports": (1, 0), "importer_orders": (0, 1)}
        stages = await conn.fetch("SELECT stage FROM imports WHERE uuid = $1 ORDER BY id", uuid)
        queue = await conn.fetchrow(
            "SELECT o.stage, o.worker_id, i.stage AS latest FROM importer_orders o"
            " JOIN imports i ON i.id = o.latest_id WHERE o.uuid = $1",
            uuid,
        )
    finally:
        await conn.close()
    assert [r["stage"] for r in stages] == ["Import Pending", STAGE_IMPORTING, STAGE_IMPORTED]
    assert tuple(queue) == (STAGE_IMPORTED, None, STAGE_IMPORTED)


SCANS = """
SELECT seq_scan + COALESCE(idx_scan, 0) FROM pg_stat_xact_user_tables
WHERE relname = 'importer_orders'
"""


async def test_a_claim_reads_the_running_orders_once(migrated_url: str) -> None:
    """The claim counts the running orders per user and per group from one scan of the
    queue (revision e2c4a6b8d0f1; before, one scan each)."""
    await insert_order(migrated_url, ["/data/a.tif"])
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        async with conn.transaction():
            before = await conn.fetchval(SCANS)
            assert len(await conn.fetch(sql.CLAIM, 1, "A", 60.0, None)) == 1
            scans = await conn.fetchval(SCANS) - before
    finally:
        await conn.close()
    # the due waits; the running orders; the pick; its update; the next head of the user
    # (importer_refresh_user); the history row's trigger (importer_track_order)
    assert scans == 6
