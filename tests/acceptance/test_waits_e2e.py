"""Issue 15 acceptance, items 1 and 2, end to end: the real service on a real PostgreSQL, real
files written while the order is queued, the simulated OMERO taken down for three minutes,
and the real ``show`` command."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import asyncpg
import pytest

from biomero_importer.omero.port import OMERO_UNAVAILABLE
from biomero_importer.omero.simulator import OFFLINE_FILE
from tests.support import (
    ainvoke,
    history,
    insert_order,
    make_settings,
    make_tiffs,
    running_service,
    wait_for_stage,
    write_config,
)

from .conftest import managed_links, sim_objects

SETTLE_WAIT = "Waiting for files to stop changing ("
OMERO_WAIT = "OMERO unavailable; retrying in "


class Appender(threading.Thread):
    """Appends a block to a file every second, as an acquisition PC copying a dataset does."""

    def __init__(self, path: Path, writes: int) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.writes = writes
        self.last_write = 0.0

    def run(self) -> None:
        for _ in range(self.writes):
            with self.path.open("ab") as out:
                out.write(os.urandom(4096))
            self.last_write = time.time()
            time.sleep(1.0)


async def test_a_file_still_being_written_waits_and_imports_once_writes_stop(
    tmp_path: Path, migrated_url: str, import_root: Path
) -> None:
    growing = import_root / "acquisition" / "stack.ome.tif"
    growing.parent.mkdir()
    growing.write_bytes(b"II*\x00")
    settings = make_settings(tmp_path, migrated_url, [import_root], settle_seconds=3.0)
    writer = Appender(growing, writes=8)
    async with running_service(settings, migrated_url):
        writer.start()
        order = await insert_order(migrated_url, [growing])
        done = await wait_for_stage(migrated_url, order, timeout=60)
        await asyncio.to_thread(writer.join)
    rows = await history(migrated_url, order)
    assert done["stage"] == "Import Completed"
    waits = [r for r in rows if r["stage"] == "Import Pending" and r["description"]]
    assert waits and all(r["description"].startswith(SETTLE_WAIT) for r in waits)
    # the run that imported started once the writes had stopped (and settled)
    last_start = [r for r in rows if r["stage"] == "Import Started"][-1]
    assert last_start["timestamp"].timestamp() >= writer.last_write + settings.settle_seconds
    # every run before it ended in a wait: nothing read the half-written file
    starts = [i for i, r in enumerate(rows) if r["stage"] == "Import Started"]
    for i in starts[:-1]:
        assert rows[i + 1]["description"].startswith(SETTLE_WAIT)
    [obj] = sim_objects(settings.simulator_dir, order)
    [link] = managed_links(settings.simulator_dir, obj)
    assert link.is_symlink() and link.resolve() == growing
    assert link.stat().st_size == growing.stat().st_size == 4 + 8 * 4096


@pytest.mark.reliability
async def test_twenty_orders_ride_out_a_three_minute_omero_outage(
    tmp_path: Path, migrated_url: str, import_root: Path
) -> None:
    """OMERO goes down while orders run (some half way through their files) and stays down
    for three minutes. Every order waits and retries by itself, backing off; once OMERO is
    back all end 'Import Completed' with each file imported exactly once."""
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        omero_simulator_import_delay=0.3,
        transient_backoff=10.0,
        transient_backoff_max=30.0,
        transient_retries=10,
    )
    config = write_config(tmp_path / "settings.yml", settings)
    offline = settings.simulator_dir / OFFLINE_FILE
    files = {n: make_tiffs(import_root / f"run{n}", 3) for n in range(20)}
    async with running_service(settings, migrated_url):
        orders = {n: await insert_order(migrated_url, files[n]) for n in range(20)}
        await wait_for_stage(migrated_url, orders[0], timeout=60)
        offline.touch()
        down_at = time.monotonic()
        await asyncio.sleep(20)
        shown = await ainvoke("show", orders[19], "--config", config)
        assert shown.exit_code == 0, shown.output
        assert OMERO_WAIT in shown.output
        await asyncio.sleep(180 - (time.monotonic() - down_at))
        offline.unlink()
        done = [await wait_for_stage(migrated_url, orders[n], timeout=120) for n in range(20)]
        after = await ainvoke("show", orders[19], "--json", "--config", config)
    assert [d["stage"] for d in done] == ["Import Completed"] * 20
    # While it waited, `show` said when it would be tried again and how many retries it used.
    assert "Next try" in shown.output and "Automatic retries" in shown.output
    record = json.loads(after.output)
    waits = [h["description"] for h in record["history"] if h["stage"] == "Import Pending"]
    assert sum(1 for w in waits if w and w.startswith(OMERO_WAIT)) >= 3
    assert record["retries"] == 0 and record["not_before"] is None  # forgotten at the end
    waited = 0
    for n, order in orders.items():
        rows = await history(migrated_url, order)
        waited += any((r["description"] or "").startswith(OMERO_WAIT) for r in rows)
        assert not any(r["description"] == OMERO_UNAVAILABLE for r in rows)
        objects = sim_objects(settings.simulator_dir, order)
        assert sorted(o.client_path for o in objects) == sorted(str(f) for f in files[n])
    assert waited >= 15  # nearly every order met the outage
    # no duplicates anywhere: one object per file
    everything = [o.client_path for o in sim_objects(settings.simulator_dir)]
    assert len(everything) == len(set(everything)) == 60
    conn = await asyncpg.connect(migrated_url)
    try:
        attempts = await conn.fetch(
            "SELECT attempts, retries FROM importer_orders WHERE uuid = ANY($1::text[])",
            list(orders.values()),
        )
    finally:
        await conn.close()
    # waits use no attempt
    assert {(r["attempts"], r["retries"]) for r in attempts} == {(1, 0)}


async def test_a_permanent_failure_is_not_retried(
    tmp_path: Path, migrated_url: str, import_root: Path
) -> None:
    (bad,) = make_tiffs(import_root / "broken", 1, prefix="bad")
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        omero_simulator_fail_pattern="bad",
        transient_backoff=0.2,
    )
    async with running_service(settings, migrated_url):
        order = await insert_order(migrated_url, [bad])
        failed = await wait_for_stage(migrated_url, order, timeout=30)
        # given time to retry, it does not
        await asyncio.sleep(1.0)
    rows = await history(migrated_url, order)
    assert failed["stage"] == "Import Failed" and "bad0.tif" in failed["description"]
    assert [r["stage"] for r in rows] == ["Import Pending", "Import Started", "Import Failed"]
    assert sim_objects(settings.simulator_dir, order) == []


async def test_retries_run_out_and_the_order_fails_with_the_reason(
    tmp_path: Path, migrated_url: str, import_root: Path
) -> None:
    (file,) = make_tiffs(import_root / "run", 1)
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        transient_backoff=0.2,
        transient_retries=3,
        poll_interval=60.0,  # the replica wakes itself for its waiting orders
    )
    settings.simulator_dir.mkdir(parents=True, exist_ok=True)
    (settings.simulator_dir / OFFLINE_FILE).touch()
    async with running_service(settings, migrated_url):
        order = await insert_order(migrated_url, [file])
        failed = await wait_for_stage(migrated_url, order, timeout=60)
    rows = await history(migrated_url, order)
    assert failed["stage"] == "Import Failed"
    assert failed["description"] == f"{OMERO_UNAVAILABLE} (gave up after 3 automatic retries)"
    waits = [r["description"] for r in rows if r["stage"] == "Import Pending"][1:]
    assert [w.rsplit(", ", 1)[1] for w in waits] == [f"attempt {n} of 3" for n in (1, 2, 3)]
    assert sim_objects(settings.simulator_dir, order) == []
