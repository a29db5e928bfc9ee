"""Cancel through the database: running orders stop within a second, pending ones never start."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg

from tests.support import (
    PICKED_UP,
    history,
    insert_order,
    make_settings,
    make_tiffs,
    running_service,
    wait_for_stage,
)


async def _request_cancel(url: str, order: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE importer_orders SET cancel_requested = true WHERE uuid = $1", order
        )
    finally:
        await conn.close()


async def test_cancel_stops_a_running_order_within_a_second(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root, 1)
    settings = make_settings(
        tmp_path, migrated_url, [import_root], omero_simulator_import_delay=60, lease_seconds=30
    )
    async with running_service(settings, migrated_url) as service:
        order = await insert_order(migrated_url, files)
        await wait_for_stage(migrated_url, order, PICKED_UP, timeout=5)
        started = time.monotonic()
        await _request_cancel(migrated_url, order)
        done = await wait_for_stage(migrated_url, order, timeout=5)
        elapsed = time.monotonic() - started
        # the slot is freed just after the terminal row is written (same event loop turn or
        # the next): it must be free, not merely soon
        for _ in range(100):
            if service.dispatcher.running_count == 0:
                break
            await asyncio.sleep(0.01)
        assert service.dispatcher.running_count == 0
    assert done["stage"] == "Import Failed"
    assert done["description"] == "Cancelled"
    assert elapsed < 1.0


async def test_cancel_of_a_pending_order_ends_it_without_starting(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root, 1)
    order = await insert_order(migrated_url, files)
    await _request_cancel(migrated_url, order)
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=0.2)
    async with running_service(settings, migrated_url):
        done = await wait_for_stage(migrated_url, order, timeout=5)
    assert done["description"] == "Cancelled"
    assert [r["stage"] for r in await history(migrated_url, order)] == [
        "Import Pending",
        "Import Failed",
    ]
