"""Several replicas as real OS processes: exactly-once claims, crash recovery, graceful stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import asyncpg
import psutil

from tests.support import (
    PICKED_UP,
    history,
    insert_order,
    make_settings,
    make_tiffs,
    start_replica,
    stop_replica,
    wait_for_stage,
    write_config,
)


async def _count_terminal(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM importer_orders"
                " WHERE stage IN ('Import Completed', 'Import Failed')"
            )
        )
    finally:
        await conn.close()


async def test_three_replicas_share_500_orders_exactly_once(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root, 5)
    settings = make_settings(tmp_path, migrated_url, [import_root], max_workers=8)
    config = write_config(tmp_path / "replica.yml", settings)
    replicas = [start_replica(config) for _ in range(3)]
    try:
        conn = await asyncpg.connect(migrated_url)
        try:
            await conn.executemany(
                "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
                " stage, uuid, files) VALUES ('Demo', 'researcher', '151', 'Dataset',"
                " 'Import Pending', gen_random_uuid()::text, $1)",
                [(f'["{files[n % 5]}"]',) for n in range(500)],
            )
        finally:
            await conn.close()
        deadline = time.monotonic() + 120
        while await _count_terminal(migrated_url) < 500:
            assert time.monotonic() < deadline, "orders did not finish"
            assert all(r.poll() is None for r in replicas), "a replica died"
            await asyncio.sleep(0.2)
    finally:
        codes = [stop_replica(r) for r in replicas]
    assert codes == [0, 0, 0]
    conn = await asyncpg.connect(migrated_url)
    try:
        rows = await conn.fetch(
            "SELECT uuid, count(*) FILTER (WHERE stage = 'Import Started') AS started,"
            " count(*) FILTER (WHERE stage IN ('Import Completed', 'Import Failed')) AS ended,"
            " count(*) FILTER (WHERE stage = 'Import Completed') AS completed"
            " FROM imports GROUP BY uuid"
        )
        workers = await conn.fetchval("SELECT count(DISTINCT worker_id) FROM importer_orders")
    finally:
        await conn.close()
    assert len(rows) == 500
    assert all(r["started"] == 1 and r["ended"] == 1 and r["completed"] == 1 for r in rows)
    # worker ids are cleared when orders end
    assert workers == 0
    db = sqlite3.connect(settings.simulator_dir / "omero.sqlite")
    try:
        per_order = db.execute(
            "SELECT order_uuid, count(*) FROM objects GROUP BY order_uuid"
        ).fetchall()
    finally:
        db.close()
    assert len(per_order) == 500 and all(count == 1 for _, count in per_order)


async def _kill_mid_order(
    url: str, tmp_path: Path, import_root: Path, max_attempts: int
) -> tuple[str, list[asyncpg.Record], Path]:
    files = make_tiffs(import_root, 1)
    slow = make_settings(
        tmp_path,
        url,
        [import_root],
        lease_seconds=1.5,
        max_attempts=max_attempts,
        omero_simulator_import_delay=30,
    )
    victim = start_replica(write_config(tmp_path / "slow.yml", slow))
    order = await insert_order(url, files)
    await wait_for_stage(url, order, PICKED_UP, timeout=15)
    os.killpg(victim.pid, signal.SIGKILL)
    assert stop_replica(victim) == -signal.SIGKILL
    fast = slow.model_copy(update={"omero_simulator_import_delay": 0.0})
    rescuer = start_replica(write_config(tmp_path / "fast.yml", fast))
    try:
        await wait_for_stage(url, order, timeout=30)
    finally:
        assert stop_replica(rescuer) == 0
    return order, await history(url, order), slow.simulator_dir


async def test_killed_replica_order_is_retried_by_another(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    order, rows, sim = await _kill_mid_order(migrated_url, tmp_path, import_root, max_attempts=2)
    stages = [r["stage"] for r in rows]
    assert stages == [
        "Import Pending",
        "Import Started",
        "Import Pending",
        "Import Started",
        "Import Completed",
    ]
    assert "stopped while this order ran (attempt 1 of 2)" in rows[2]["description"]
    db = sqlite3.connect(sim / "omero.sqlite")
    try:
        (count,) = db.execute(
            "SELECT count(*) FROM objects WHERE order_uuid = ?", (order,)
        ).fetchone()
    finally:
        db.close()
    assert count == 1


async def test_killed_replica_order_fails_when_attempts_are_used_up(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    order, rows, _ = await _kill_mid_order(migrated_url, tmp_path, import_root, max_attempts=1)
    assert [r["stage"] for r in rows] == ["Import Pending", "Import Started", "Import Failed"]
    description = rows[-1]["description"]
    assert "stopped while this order ran (attempt 1 of 1)" in description
    assert f"biomero-importer retry {order}" in description


async def test_sigterm_hands_running_orders_back(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root, 2)
    slow = make_settings(
        tmp_path, migrated_url, [import_root], omero_simulator_import_delay=60, shutdown_timeout=1
    )
    replica = start_replica(write_config(tmp_path / "slow.yml", slow))
    orders = [await insert_order(migrated_url, [f]) for f in files]
    for order in orders:
        await wait_for_stage(migrated_url, order, PICKED_UP, timeout=15)
    children_before = psutil.Process(replica.pid).children(recursive=True)
    started = time.monotonic()
    assert stop_replica(replica, signal.SIGTERM, timeout=20) == 0
    assert time.monotonic() - started < 10
    assert not any(child.is_running() for child in children_before)
    for order in orders:
        rows = await history(migrated_url, order)
        assert rows[-1]["stage"] == "Import Pending"
        assert "shut down while this order ran" in rows[-1]["description"]
    fast = slow.model_copy(update={"omero_simulator_import_delay": 0.0})
    resumed = start_replica(write_config(tmp_path / "fast.yml", fast))
    try:
        for order in orders:
            assert (await wait_for_stage(migrated_url, order))["stage"] == "Import Completed"
    finally:
        assert stop_replica(resumed) == 0
