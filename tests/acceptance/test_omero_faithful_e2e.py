"""Issue 12 acceptance with real replicas: a SIGTERM in the middle of an OME-Zarr
registration or of the annotate step, then a restart, on a real PostgreSQL and the simulator
(its SQLite state read afterwards)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from biomero_importer.settings import Settings
from tests.omero.test_zarr import make_series_v2
from tests.support import (
    PICKED_UP,
    insert_order,
    make_settings,
    make_tiffs,
    start_replica,
    stop_replica,
    wait_for_stage,
    write_config,
)


def sim(settings: Settings, query: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(settings.simulator_dir / "omero.sqlite", timeout=30)
    try:
        return db.execute(query, args).fetchall()
    except sqlite3.OperationalError:  # not created yet by the replica
        return []
    finally:
        db.close()


async def ledger(url: str, uuid: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        text = await conn.fetchval(
            "SELECT objects::text FROM importer_orders WHERE uuid = $1", uuid
        )
    finally:
        await conn.close()
    return json.loads(text) if text else []


async def sigterm_when(config: Path, url: str, uuid: str, ready: Callable[[], bool]) -> None:
    """Run a replica until ``ready()``, then SIGTERM it and wait for it to exit cleanly."""
    replica = start_replica(config)
    try:
        await wait_for_stage(url, uuid, PICKED_UP, timeout=60)
        deadline = time.monotonic() + 60
        while not ready():
            assert time.monotonic() < deadline, "the replica never got there"
            assert replica.poll() is None, "the replica died"
            await asyncio.sleep(0.005)
    finally:
        assert stop_replica(replica) == 0


async def run_to_the_end(config: Path, url: str, uuid: str) -> asyncpg.Record:
    replica = start_replica(config)
    try:
        return await wait_for_stage(url, uuid, timeout=120)
    finally:
        assert stop_replica(replica) == 0


async def test_sigterm_during_a_multi_image_registration_then_restart(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    series = make_series_v2(import_root / "series.zarr", 8)
    slow = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        use_register_zarr=True,
        omero_simulator_import_delay=0.3,  # per registered image
        shutdown_timeout=0.0,
    )
    uuid = await insert_order(migrated_url, [series])

    def registered() -> list[str]:
        rows = sim(slow, "SELECT client_path FROM objects WHERE order_uuid = ?", uuid)
        return [row[0] for row in rows]

    await sigterm_when(
        write_config(tmp_path / "slow.yml", slow),
        migrated_url,
        uuid,
        lambda: len(registered()) >= 3,
    )
    first = registered()
    assert 3 <= len(first) < 8
    assert (await wait_for_stage(migrated_url, uuid, ["Import Pending"], timeout=5))["stage"]
    # every object registered before the SIGTERM is in the ledger, once
    assert sorted(r["client_path"] for r in await ledger(migrated_url, uuid)) == sorted(first)

    fast = slow.model_copy(update={"omero_simulator_import_delay": 0.0})
    row = await run_to_the_end(write_config(tmp_path / "fast.yml", fast), migrated_url, uuid)
    assert row["stage"] == "Import Completed"
    assert sorted(registered()) == sorted(str(series / str(i)) for i in range(8))
    recorded = await ledger(migrated_url, uuid)
    assert len({(r["type"], r["id"]) for r in recorded}) == len(recorded) == 8
    assert all(r["annotated"] for r in recorded)


async def test_sigterm_during_annotate_of_2000_images_then_one_map_annotation_each(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    folder = import_root / "plate-run"
    folder.mkdir()
    for n in range(2000):
        (folder / f"image{n:04d}.tif").write_bytes(b"II*\x00")  # the simulator reads no pixels
    settings = make_settings(tmp_path, migrated_url, [import_root], shutdown_timeout=0.0)
    uuid = await insert_order(migrated_url, [folder])
    annotated = "SELECT count(DISTINCT map_id) FROM annotations"

    def some_annotated() -> bool:
        rows = sim(settings, annotated)
        return bool(rows) and rows[0][0] >= 200

    config = write_config(tmp_path / "replica.yml", settings)
    await sigterm_when(config, migrated_url, uuid, some_annotated)
    stopped_at = sim(settings, annotated)[0][0]
    assert 200 <= stopped_at < 2000, "SIGTERM landed outside the annotate step"
    assert (await wait_for_stage(migrated_url, uuid, ["Import Pending"], timeout=5))["stage"]

    row = await run_to_the_end(config, migrated_url, uuid)
    assert row["stage"] == "Import Completed"
    per_image = sim(
        settings,
        "SELECT o.id, count(DISTINCT a.map_id) FROM objects o LEFT JOIN annotations a"
        " ON a.object_id = o.id AND a.ns = ? GROUP BY o.id",
        settings.annotation_namespace,
    )
    assert len(per_image) == 2000
    assert {count for _, count in per_image} == {1}
    assert len(await ledger(migrated_url, uuid)) == 2000


async def sigkill_when(config: Path, url: str, uuid: str, ready: Callable[[], bool]) -> None:
    """A replica that dies without a word once ``ready()``: its lease expires and another
    replica recovers the order."""
    replica = start_replica(config)
    try:
        await wait_for_stage(url, uuid, PICKED_UP, timeout=60)
        deadline = time.monotonic() + 60
        while not ready():
            assert time.monotonic() < deadline, "the replica never got there"
            await asyncio.sleep(0.005)
    finally:
        os.killpg(replica.pid, signal.SIGKILL)
        stop_replica(replica)


async def test_recovery_after_sigkill_mid_multi_file_import_imports_each_file_once(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    """Imports are saved to the ledger at most once a second: what the dead replica imported
    after its last save is found by the order's comment annotation, never imported twice."""
    files = make_tiffs(import_root / "run", 8)
    slow = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        lease_seconds=1.5,
        max_attempts=2,
        omero_simulator_import_delay=0.2,
    )
    uuid = await insert_order(migrated_url, files)

    def imported() -> list[str]:
        rows = sim(slow, "SELECT client_path FROM objects WHERE order_uuid = ?", uuid)
        return [row[0] for row in rows]

    await sigkill_when(
        write_config(tmp_path / "slow.yml", slow), migrated_url, uuid, lambda: len(imported()) >= 4
    )
    fast = slow.model_copy(update={"omero_simulator_import_delay": 0.0})
    row = await run_to_the_end(write_config(tmp_path / "fast.yml", fast), migrated_url, uuid)
    assert row["stage"] == "Import Completed"
    assert sorted(imported()) == sorted(str(f) for f in files)
    recorded = await ledger(migrated_url, uuid)
    assert sorted(r["client_path"] for r in recorded) == sorted(str(f) for f in files)


async def test_recovery_after_sigkill_mid_registration_registers_the_rest_once(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    series = make_series_v2(import_root / "series.zarr", 6)
    slow = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        use_register_zarr=True,
        lease_seconds=1.5,
        max_attempts=2,
        omero_simulator_import_delay=0.3,
    )
    uuid = await insert_order(migrated_url, [series])

    def registered() -> list[str]:
        rows = sim(slow, "SELECT client_path FROM objects WHERE order_uuid = ?", uuid)
        return [row[0] for row in rows]

    await sigkill_when(
        write_config(tmp_path / "slow.yml", slow),
        migrated_url,
        uuid,
        lambda: len(registered()) >= 2,
    )
    fast = slow.model_copy(update={"omero_simulator_import_delay": 0.0})
    row = await run_to_the_end(write_config(tmp_path / "fast.yml", fast), migrated_url, uuid)
    assert row["stage"] == "Import Completed"
    assert sorted(registered()) == sorted(str(series / str(i)) for i in range(6))
    recorded = await ledger(migrated_url, uuid)
    assert len({(r["type"], r["id"]) for r in recorded}) == len(recorded) == 6


async def test_sql_retry_after_an_orphan_fileset_imports_every_file(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    """The documented SQL retry (every row rewritten to 'Import Pending') after a first
    attempt that left an orphan fileset: one Image per file, or a failure naming the file."""
    good, other = make_tiffs(import_root / "run", 2)
    bad = other.rename(other.with_name("bad.tif"))
    failing = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        omero_simulator_fail_pattern="bad",
        omero_simulator_failure="orphan_fileset",
    )
    uuid = await insert_order(migrated_url, [good, bad])
    first = await run_to_the_end(write_config(tmp_path / "f.yml", failing), migrated_url, uuid)
    assert first["stage"] == "Import Failed" and "bad.tif" in first["description"]
    assert sim(failing, "SELECT count(*) FROM filesets")[0][0] == 2  # one of them an orphan

    async def sql_retry() -> None:
        conn = await asyncpg.connect(migrated_url)
        try:
            await conn.execute("UPDATE imports SET stage = 'Import Pending' WHERE uuid = $1", uuid)
        finally:
            await conn.close()

    # still broken: it fails again, naming the file, never 'Import Completed'
    await sql_retry()
    again = await run_to_the_end(write_config(tmp_path / "f.yml", failing), migrated_url, uuid)
    assert again["stage"] == "Import Failed" and "bad.tif" in again["description"]
    # fixed: every file has its Image
    await sql_retry()
    fixed = make_settings(tmp_path, migrated_url, [import_root])
    last = await run_to_the_end(write_config(tmp_path / "ok.yml", fixed), migrated_url, uuid)
    assert last["stage"] == "Import Completed"
    rows = sim(fixed, "SELECT client_path FROM objects WHERE order_uuid = ?", uuid)
    assert sorted(row[0] for row in rows) == sorted([str(good), str(bad)])
