"""Fault containment on a real PostgreSQL: the failure modes issue 11 names, each reproduced."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import asyncpg
import pytest
import structlog

from biomero_importer.db import sql
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import STAGE_IMPORTED, STAGE_INGEST_FAILED, NewOrder
from biomero_importer.store import ErrorKind, Finish, PostgresStore, classify
from biomero_importer.store.postgres import UNRECORDABLE
from tests import slowfs
from tests.support import (
    PICKED_UP,
    explain_nodes,
    insert_order,
    make_settings,
    make_tiffs,
    non_utf8_folder,
    rows_read,
    running_service,
    start_replica,
    wait_for_stage,
    write_config,
)


async def test_a_non_utf8_symlink_order_fails_alone_and_sigterm_exits_in_time(
    tmp_path: Path, migrated_url: str, import_root: Path
) -> None:
    """The report: such an order killed the batched finish writer; every later order stayed
    'Import Started' and SIGTERM never finished."""
    settings = make_settings(tmp_path, migrated_url, [import_root], shutdown_timeout=5.0)
    replica = start_replica(write_config(tmp_path / "replica.yml", settings))
    try:
        # written as OMERO.biomero writes it: the path is plain UTF-8, the link inside is not
        bad = await insert_order(migrated_url, [non_utf8_folder(import_root)])
        good = await insert_order(migrated_url, make_tiffs(import_root / "plain", 1))
        failed = await wait_for_stage(migrated_url, bad, timeout=60)
        assert failed["stage"] == STAGE_INGEST_FAILED
        assert failed["description"].startswith("Folder links outside the import roots: ")
        assert "r\\xe9sum\\xe9-link" in failed["description"]
        done = await wait_for_stage(migrated_url, good, timeout=60)
        assert done["stage"] == STAGE_IMPORTED
    finally:
        started = time.monotonic()
        replica.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(replica.wait, 60)
        exit_after = time.monotonic() - started
    assert code == 0
    assert exit_after < settings.shutdown_timeout


async def test_one_unwritable_result_fails_only_its_own_order(migrated_url: str) -> None:
    """A batch write that fails for a non-transient reason falls back to row by row: the one
    row PostgreSQL refuses fails its order with a description; the others are written."""
    dsn = asyncpg_dsn(migrated_url)
    conn = await asyncpg.connect(dsn)
    try:
        # a real, non-transient refusal of exactly one row
        await conn.execute(
            "ALTER TABLE imports ADD CONSTRAINT no_poison CHECK (description <> 'poison')"
        )
    finally:
        await conn.close()
    store = PostgresStore(dsn, worker_id="w", lease_seconds=60, pool_size=3)
    await store.open()
    writer = asyncio.create_task(store.serve())
    try:
        orders = [
            NewOrder(
                f"00000000-0000-4000-8000-00000000000{n}",
                "g",
                "u",
                "Dataset",
                "1",
                '["/data/x.tif"]',
            )
            for n in range(3)
        ]
        for order in orders:
            await store.submit(order)
        runs = {c.uuid: c.runs for c in await store.claim(3)}
        assert len(runs) == 3
        results = await asyncio.gather(
            store.finish(Finish(orders[0].uuid, STAGE_IMPORTED, None, run=runs[orders[0].uuid])),
            store.finish(
                Finish(orders[1].uuid, STAGE_INGEST_FAILED, "poison", run=runs[orders[1].uuid])
            ),
            store.finish(Finish(orders[2].uuid, STAGE_IMPORTED, None, run=runs[orders[2].uuid])),
        )
        assert results == [True, True, True]
        details = [await store.order_detail(o.uuid) for o in orders]
        assert [(d.summary.stage, d.summary.description) for d in details if d] == [
            (STAGE_IMPORTED, None),
            (STAGE_INGEST_FAILED, UNRECORDABLE),
            (STAGE_IMPORTED, None),
        ]
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await store.close()


def test_database_errors_are_classified_deliberately() -> None:
    """Before: only connection errors counted as transient; a deadlock, 'too many clients' or
    a read-only database after failover ended a background task."""
    exc = asyncpg.exceptions
    transient = [
        exc.DeadlockDetectedError(""),
        exc.SerializationError(""),
        exc.TooManyConnectionsError(""),
        exc.ReadOnlySQLTransactionError(""),
        exc.LockNotAvailableError(""),
        exc.AdminShutdownError(""),
        exc.QueryCanceledError(""),
        ConnectionResetError(),
        asyncio.TimeoutError(),
    ]
    data = [
        exc.CharacterNotInRepertoireError(""),
        exc.UntranslatableCharacterError(""),
        exc.StringDataRightTruncationError(""),
        UnicodeEncodeError("utf-8", "\udce9", 0, 1, "surrogates not allowed"),
    ]
    other = [exc.UndefinedColumnError(""), exc.CheckViolationError(""), RuntimeError()]
    assert {classify(e) for e in transient} == {ErrorKind.TRANSIENT}
    assert {classify(e) for e in data} == {ErrorKind.DATA}
    assert {classify(e) for e in other} == {ErrorKind.OTHER}


async def test_renewal_never_waits_for_a_row_lock(migrated_url: str) -> None:
    """A client holding an order's row in an open transaction must not stall renewal."""
    dsn = asyncpg_dsn(migrated_url)
    store = PostgresStore(dsn, worker_id="w", lease_seconds=30, pool_size=2)
    await store.open()
    locker = await asyncpg.connect(dsn)
    try:
        locked, free = (
            NewOrder(f"00000000-0000-4000-8000-0000000000a{n}", "g", "u", "Dataset", "1", "[]")
            for n in range(2)
        )
        await store.submit(locked)
        await store.submit(free)
        await store.claim(2)
        tx = locker.transaction()
        await tx.start()
        await locker.execute(
            "SELECT 1 FROM importer_orders WHERE uuid = $1 FOR UPDATE", locked.uuid
        )
        started = time.monotonic()
        leases = await store.renew_leases([locked.uuid, free.uuid])
        assert time.monotonic() - started < 1.0
        assert leases[free.uuid].renewed
        assert not leases[locked.uuid].renewed, "skipped, still owned"
        await tx.rollback()
    finally:
        await locker.close()
        await store.close()


@pytest.mark.reliability
async def test_queue_stats_and_the_cancel_sweep_do_not_grow_with_the_backlog(
    migrated_url: str,
) -> None:
    """Before: both counted or scanned the whole pending set every few seconds per replica."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated_url))
    try:
        # finished orders first, so a scan that is not bounded would have to read past them
        await conn.execute(
            "INSERT INTO importer_orders (uuid, stage, latest_id)"
            " SELECT 'f' || n, 'Import Completed', n FROM generate_series(1, 200000) n"
        )
        await conn.execute(
            "INSERT INTO importer_orders (uuid, stage, latest_id, queued_at)"
            " SELECT 'o' || n, 'Import Pending', n, now() - n * interval '1 ms'"
            " FROM generate_series(1, 1000000) n"
        )
        await conn.execute("UPDATE importer_orders SET cancel_requested = true WHERE uuid = 'o7'")
        await conn.execute("ANALYZE importer_orders")
        for query, args in (
            (sql.QUEUE_STATS, (sql.QUEUE_STATS_CAP,)),
            # the sweep's SELECT part: the INSERT would end the order
            (sql.CANCEL_PENDING.split("INSERT INTO")[0] + "SELECT uuid FROM picked", (None, 100)),
        ):
            # rows each scan touched: returned plus filtered out, whatever plan is chosen
            scans = [n for n in await explain_nodes(conn, query, *args) if "Scan" in str(n)]
            for scan in scans:
                read = rows_read(scan)
                assert read <= sql.QUEUE_STATS_CAP + 1, (query, scan["Node Type"], read)
        pending, oldest = await conn.fetchrow(sql.QUEUE_STATS, sql.QUEUE_STATS_CAP)
        assert pending == sql.QUEUE_STATS_CAP
        assert oldest >= 999
    finally:
        await conn.close()


async def test_a_hung_mount_fails_its_order_without_delaying_any_other(
    tmp_path: Path, migrated_url: str, import_root: Path
) -> None:
    """Before: validation walked folders and resolved paths on the event loop, so one slow
    mount stopped lease renewal for every running order. Here a real FUSE mount answers a
    lookup after three lease periods."""
    lease = 1.0
    backing = tmp_path / "backing"
    make_tiffs(backing, 1, prefix="stuck")
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        lease_seconds=lease,
        storage_timeout=2.0,
        omero_simulator_import_delay=2.5,  # other orders run across several lease renewals
        poll_interval=60.0,
        transient_retries=0,  # the failure itself is under test, not its automatic retry
    )
    with (
        slowfs.mounted(backing, import_root / "share", "stuck0.tif", 3 * lease) as share,
        structlog.testing.capture_logs() as logs,
    ):
        async with running_service(settings, migrated_url) as service:
            hung = await insert_order(migrated_url, [share / "stuck0.tif"])
            await asyncio.sleep(0.2)  # its validation is now blocked in the kernel
            submitted = time.monotonic()
            other = await insert_order(migrated_url, make_tiffs(import_root / "local", 1))
            started = await wait_for_stage(migrated_url, other, PICKED_UP, timeout=5)
            picked_after = time.monotonic() - submitted
            done = await wait_for_stage(migrated_url, other, timeout=30)
            failed = await wait_for_stage(migrated_url, hung, timeout=30)
            lag = service.metrics.event_loop_lag._value.get()
    assert started["stage"] in PICKED_UP and picked_after < 1.0
    assert done["stage"] == STAGE_IMPORTED
    assert failed["stage"] == STAGE_INGEST_FAILED
    assert failed["description"] == (f"Storage did not answer within 2 s: {share / 'stuck0.tif'}")
    assert not [e for e in logs if e["event"] in ("order_fenced", "order_stopping")]
    assert lag < 0.5
