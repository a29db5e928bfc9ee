"""The chaos run: 1,000 orders through 3 replicas while replicas, listeners and PostgreSQL die.

Replicas are real ``biomero-importer run`` processes, killed with SIGKILL (their whole process
group) and restarted; the listeners' backends are ended with ``pg_terminate_backend``; the
embedded PostgreSQL is stopped and started once mid-run. Afterwards every order must have
ended, no attempt may have two endings, and no file may be in OMERO twice.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from pathlib import Path

import asyncpg
import numpy as np
import psutil
import pytest
import tifffile

from tests.conftest import PgServer
from tests.pg_control import start_server, stop_server
from tests.reliability.harness import (
    Replica,
    attempt_problems,
    fetch,
    leftover_containers,
    new_children,
    processes_using,
    simulator_objects,
    terminal_count,
    terminate_listeners,
)
from tests.support import TERMINAL, make_settings, write_config

pytestmark = pytest.mark.reliability

ORDERS = 1000
REPLICAS = 3
FAIL_EVERY = 20  # every 20th file matches the simulator's fail pattern: 5%
KILL_EVERY = 2.5  # seconds between SIGKILLs of a random replica
LISTENER_KILL_EVERY = 2.0
PG_DOWN_SECONDS = 3.0
# A replica needs about 2 s to boot; PostgreSQL is stopped only when every replica is past
# its startup (a replica that cannot reach the database at startup exits: see the README).
SETTLED = 4.0
RUN_TIMEOUT = 200.0
STOPPED_WHILE_RUNNING = "The importer stopped while this order ran"


def _make_files(root: Path) -> list[Path]:
    """One distinct file per order; every FAIL_EVERY-th is named to fail in the simulator."""
    root.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((4, 4), dtype=np.uint8)
    paths = []
    for n in range(ORDERS):
        name = f"fail{n:04d}.tif" if n % FAIL_EVERY == 0 else f"image{n:04d}.tif"
        path = root / name
        tifffile.imwrite(path, pixels)
        paths.append(path)
    return paths


async def _insert_all(url: str, files: list[Path]) -> dict[str, Path]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
            " stage, uuid, files)"
            " SELECT 'Demo', 'researcher', '151', 'Dataset', 'Import Pending',"
            " gen_random_uuid()::text, f FROM unnest($1::text[]) AS f"
            " RETURNING uuid, files",
            [f'["{path}"]' for path in files],
        )
    finally:
        await conn.close()
    by_text = {f'["{path}"]': path for path in files}
    return {row["uuid"]: by_text[row["files"]] for row in rows}


async def test_chaos_run_loses_nothing_and_imports_nothing_twice(
    pg_server: PgServer,
    migrated_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = random.Random(7)
    root = tmp_path / "data"
    files = _make_files(root)
    settings = make_settings(
        tmp_path,
        migrated_url,
        [root],
        run_migrations=False,
        lease_seconds=2.0,
        max_attempts=5,
        max_workers=3,
        poll_interval=1.0,
        shutdown_timeout=2.0,
        db_pool_size=4,
        log_format="json",
        omero_simulator_import_delay=0.15,
        omero_simulator_fail_pattern=r"/fail\d+\.tif$",
    )
    config = write_config(tmp_path / "replica.yml", settings)
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    orders = await _insert_all(migrated_url, files)
    assert len(orders) == ORDERS

    started = time.monotonic()
    replicas = [Replica(config, tmp_path / f"replica{n}.log") for n in range(REPLICAS)]
    kills = listener_kills = pg_restarts = 0
    crashes: list[int] = []
    next_kill = started + KILL_EVERY
    next_listener_kill = started + LISTENER_KILL_EVERY
    try:
        while True:
            done = await terminal_count(migrated_url)
            if done == ORDERS:
                break
            now = time.monotonic()
            assert now - started < RUN_TIMEOUT, f"only {done} of {ORDERS} orders ended"
            for replica in replicas:
                # a replica that exits on its own (not killed by us) is a crash
                if not replica.alive:
                    crashes.append(replica.proc.returncode)
                    replica.start()
            pg_due = (
                pg_server.embedded is not None and not pg_restarts and (done or 0) >= ORDERS * 0.4
            )
            if pg_due and all(now - r.started_at > SETTLED for r in replicas):
                assert pg_server.embedded is not None
                await asyncio.to_thread(stop_server, pg_server.embedded)
                try:
                    await asyncio.sleep(PG_DOWN_SECONDS)
                finally:
                    await asyncio.to_thread(start_server, pg_server.embedded)
                pg_restarts += 1
                continue
            if now >= next_kill and not pg_due:
                victim = rng.choice(replicas)
                victim.kill()
                kills += 1
                victim.start()
                next_kill = now + KILL_EVERY
            if now >= next_listener_kill:
                listener_kills += await terminate_listeners(migrated_url)
                next_listener_kill = now + LISTENER_KILL_EVERY
            await asyncio.sleep(0.2)
        wall = time.monotonic() - started
    finally:
        for replica in replicas:
            replica.stop(timeout=30)

    logs = "\n".join(r.log.read_text(errors="replace") for r in replicas)
    assert not crashes, f"replicas exited on their own with {crashes}:\n{logs[-3000:]}"

    rows = await fetch(migrated_url, "SELECT uuid, stage, description FROM imports ORDER BY id")
    history: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        history[row["uuid"]].append(row)
    assert set(history) == set(orders)

    problems = [p for uuid in orders for p in attempt_problems(history[uuid])]
    lost = sum(1 for uuid in orders if history[uuid][-1]["stage"] not in TERMINAL)
    objects = simulator_objects(settings.simulator_dir)
    duplicated = sum(1 for _, _, count in objects if count > 1)
    summary = (
        f"chaos: orders={ORDERS} kills={kills} pg_restarts={pg_restarts}"
        f" listener_kills={listener_kills} lost={lost} duplicated={duplicated} wall={wall:.1f}s"
    )
    with capsys.disabled():
        print(f"\n{summary}")  # noqa: T201

    assert lost == 0
    assert duplicated == 0
    assert problems == []
    assert kills >= 3
    assert listener_kills >= 1
    if pg_server.embedded is not None:
        assert pg_restarts == 1

    imported = defaultdict(set)
    for uuid, client_path, _ in objects:
        imported[uuid].add(client_path)
    gave_up = []
    for uuid, path in orders.items():
        last = history[uuid][-1]
        if path.name.startswith("fail"):
            assert last["stage"] == "Import Failed", (uuid, last["description"])
            assert path.name in (last["description"] or ""), last["description"]
            assert uuid not in imported
        elif last["stage"] == "Import Failed":
            # only an order whose every attempt was killed may fail, and it must say so
            assert STOPPED_WHILE_RUNNING in (last["description"] or ""), last["description"]
            gave_up.append(uuid)
        else:
            # completed: exactly this order's file is in OMERO
            assert imported[uuid] == {str(path)}, (uuid, imported[uuid])
        if last["stage"] == "Import Failed":
            assert (last["description"] or "").strip(), f"{uuid} failed without a description"
    assert len(gave_up) <= 5, f"{len(gave_up)} orders used up all their attempts"

    assert leftover_containers() == []
    leaked = processes_using(str(tmp_path)) + new_children(children_before)
    assert leaked == [], [p.info if hasattr(p, "info") else p for p in leaked]
