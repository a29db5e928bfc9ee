"""Imports slower than lease_seconds: the owner keeps renewing, and nobody takes its orders."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.reliability.harness import Replica, fetch, simulator_objects, terminal_count
from tests.support import make_settings, make_tiffs, write_config

pytestmark = pytest.mark.reliability

ORDERS = 8


async def test_orders_slower_than_their_lease_are_not_taken_over(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root, ORDERS)
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        run_migrations=False,
        lease_seconds=1.5,
        max_attempts=3,
        max_workers=4,
        poll_interval=0.5,
        log_format="json",
        omero_simulator_import_delay=4.0,
    )
    config = write_config(tmp_path / "replica.yml", settings)
    replicas = [Replica(config, tmp_path / f"replica{n}.log") for n in range(2)]
    try:
        # both replicas ready before the orders arrive, so that both get work
        deadline = time.monotonic() + 30
        while not all('"dispatcher_started"' in r.log.read_text() for r in replicas):
            assert time.monotonic() < deadline, "replicas did not start"
            assert all(r.alive for r in replicas), "a replica exited"
            await asyncio.sleep(0.1)
        inserted = await fetch(
            migrated_url,
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files) SELECT 'Demo', 'researcher', '151', 'Dataset',"
            " 'Import Pending', gen_random_uuid()::text, f FROM unnest($1::text[]) AS f"
            " RETURNING uuid",
            [f'["{path}"]' for path in files],
        )
        orders = {row["uuid"] for row in inserted}
        deadline = time.monotonic() + 90
        while (await terminal_count(migrated_url) or 0) < ORDERS:
            assert time.monotonic() < deadline, "orders did not finish"
            assert all(r.alive for r in replicas), "a replica exited"
            await asyncio.sleep(0.2)
    finally:
        codes = [r.stop(timeout=30) for r in replicas]
    assert codes == [0, 0]

    rows = await fetch(migrated_url, "SELECT uuid, stage, description FROM imports ORDER BY id")
    started = Counter(row["uuid"] for row in rows if row["stage"] == "Import Started")
    assert set(started) == orders
    assert all(count == 1 for count in started.values()), started
    descriptions = [row["description"] or "" for row in rows]
    assert not [d for d in descriptions if "stopped while this order ran" in d]
    stages = Counter(row["stage"] for row in rows)
    assert stages == {
        "Import Pending": ORDERS,
        "Import Started": ORDERS,
        "Import Completed": ORDERS,
    }
    # both replicas worked (4 slots each, 8 orders of 4 s), each order is in OMERO once
    workers = set()
    for replica in replicas:
        if '"event": "order_started"' in replica.log.read_text():
            workers.add(replica.log.name)
    assert len(workers) == 2
    objects = simulator_objects(settings.simulator_dir)
    assert sorted(u for u, _, _ in objects) == sorted(orders)
    assert all(count == 1 for _, _, count in objects)
    logs = "".join(r.log.read_text() for r in replicas)
    assert "lease_recovered" not in logs
    assert "order_not_owned_any_more" not in logs
