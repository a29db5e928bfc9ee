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
import pytest

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
    # (importer_refresh_user); the history rows' trigger (importer_track_inserts: its look)
    assert scans == 6


# Calls of plpgsql functions not yet reported (track_functions = 'pl', a superuser setting:
# the embedded server's user is one); like the row counts above, taken as differences.
FUNCTION_CALLS = "SELECT funcname, calls FROM pg_stat_xact_user_functions"
PER_ROW_TRIGGERS = ("importer_track_order", "importer_order_owner", "importer_order_stage_changed")


async def _skip_unless_superuser(conn: asyncpg.Connection) -> None:
    if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        pytest.skip("counting function calls (track_functions) needs a superuser")


async def _calls(conn: asyncpg.Connection) -> dict[str, int]:
    return {r["funcname"]: r["calls"] for r in await conn.fetch(FUNCTION_CALLS)}


def _calls_since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {f: n - before.get(f, 0) for f, n in after.items() if n != before.get(f, 0)}


async def test_a_claim_and_an_ending_run_no_trigger_for_rows_they_applied(
    migrated_url: str,
) -> None:
    """A claim of three orders and their ending write the queue rows themselves: the history
    rows' trigger runs once per statement (one look finds them applied), and neither the
    owner trigger nor the stage trigger runs for a claim (revision c9e1f3a5b7d0; before, each
    of the three ran once per order) or for an ending (revision d0f2b4c6e8a1)."""
    uuids = {await insert_order(migrated_url, [f"/data/{n}.tif"]) for n in range(3)}
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        await _skip_unless_superuser(conn)
        async with conn.transaction():
            await conn.execute("SET LOCAL track_functions = 'pl'")
            before = await _calls(conn)
            claimed = await conn.fetch(sql.CLAIM, 3, "A", 60.0, None)
            calls = _calls_since(before, await _calls(conn))
        assert {r["uuid"] for r in claimed} == uuids
        assert calls.get("importer_track_inserts") == 1
        assert {f: calls[f] for f in PER_ROW_TRIGGERS if f in calls} == {}
        async with conn.transaction():
            await conn.execute("SET LOCAL track_functions = 'pl'")
            before = await _calls(conn)
            ended = await conn.fetch(
                sql.FINISH_MANY,
                [r["uuid"] for r in claimed],
                [STAGE_IMPORTED] * 3,
                ["Imported"] * 3,
                *([[None] * 3] * 2),
                "A",
                [None] * 3,
                [False] * 3,
                [False] * 3,
                [None] * 3,
                [r["runs"] for r in claimed],
            )
            calls = _calls_since(before, await _calls(conn))
        assert len(ended) == 3
        assert calls.get("importer_track_inserts") == 1
        # The ending clears the waits and queues the notifications of all its orders itself,
        # the owed channels looked up once; before revision d0f2b4c6e8a1 the stage trigger
        # ran once per order for that, looking the owed channels up every time.
        assert {f: calls[f] for f in PER_ROW_TRIGGERS if f in calls} == {}
        assert calls.get("importer_owed_channels") == 1
        queue = await conn.fetch(
            "SELECT o.stage, o.worker_id, i.stage AS latest FROM importer_orders o"
            " JOIN imports i ON i.id = o.latest_id WHERE o.uuid = ANY($1::text[])",
            list(uuids),
        )
        assert [tuple(r) for r in queue] == [(STAGE_IMPORTED, None, STAGE_IMPORTED)] * 3
    finally:
        await conn.close()


async def test_a_clients_insert_of_several_rows_is_applied_row_by_row(migrated_url: str) -> None:
    """One client statement inserting two orders, one of them twice: each row takes the
    steps a row of its own would, in id order (the queue row names the last of its order)."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        ids = await conn.fetch(
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files) VALUES"
            " ('Demo', 'ann', '1', 'Dataset', 'Import Pending', 'u-1', '[\"/data/a.tif\"]'),"
            " ('Demo', 'bob', '1', 'Dataset', 'Import Pending', 'u-2', '[\"/data/b.tif\"]'),"
            " ('Demo', 'ann', '1', 'Dataset', 'Import Pending', 'u-1', '[\"/data/c.tif\"]')"
            " RETURNING id, uuid"
        )
        queue = await conn.fetch(
            "SELECT uuid, stage, latest_id, user_name FROM importer_orders ORDER BY uuid"
        )
    finally:
        await conn.close()
    last = {r["uuid"]: r["id"] for r in ids}  # RETURNING lists the rows in insert order
    assert [tuple(r) for r in queue] == [
        ("u-1", "Import Pending", last["u-1"], "ann"),
        ("u-2", "Import Pending", last["u-2"], "bob"),
    ]


async def test_a_claims_run_moves_its_users_head_once(migrated_url: str) -> None:
    """A pick that takes a run of one user's orders moves the user's head once, past the run
    (revision d1f3a5c7e9b2; before, the ready trigger ran and locked the user's row for every
    order of the run)."""
    uuids = [await insert_order(migrated_url, [f"/data/{n}.tif"], user="ann") for n in range(5)]
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        await _skip_unless_superuser(conn)
        head = "SELECT head_seq FROM importer_users WHERE user_name = 'ann'"
        seqs = dict(await conn.fetch("SELECT uuid, queue_seq FROM importer_orders"))
        async with conn.transaction():
            await conn.execute("SET LOCAL track_functions = 'pl'")
            before = await _calls(conn)
            claimed = await conn.fetch(sql.CLAIM, 3, "A", 60.0, None)
            calls = _calls_since(before, await _calls(conn))
        assert [r["uuid"] for r in claimed] == uuids[:3]
        assert "importer_order_ready" not in calls
        assert calls["importer_refresh_user"] == 1
        assert await conn.fetchval(head) == seqs[uuids[3]]
        assert [r["uuid"] for r in await conn.fetch(sql.CLAIM, 5, "A", 60.0, None)] == uuids[3:]
        assert await conn.fetchval(head) is None
    finally:
        await conn.close()
