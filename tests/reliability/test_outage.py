"""PostgreSQL down for 30 s while orders run: the replica waits, says so calmly, and finishes."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import PgServer
from tests.pg_control import start_server, stop_server
from tests.reliability.harness import Replica, fetch, free_port, terminal_count
from tests.support import PICKED_UP, insert_order, make_settings, make_tiffs, write_config

pytestmark = pytest.mark.reliability

OUTAGE_SECONDS = 30.0
ORDERS = 12


def _healthz(port: int) -> int | None:
    """Status of GET /healthz, or None when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


async def _wait_health(port: int, status: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(_healthz, port)
        if seen == status:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"/healthz did not return {status} within {timeout}s (last: {seen})")


async def test_thirty_second_database_outage(
    pg_server: PgServer, migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    if pg_server.embedded is None:
        pytest.skip("stopping PostgreSQL needs the embedded server")
    files = make_tiffs(import_root, ORDERS)
    port = free_port()
    settings = make_settings(
        tmp_path,
        migrated_url,
        [import_root],
        run_migrations=False,
        lease_seconds=5.0,
        max_attempts=3,
        max_workers=4,
        poll_interval=1.0,
        log_format="json",
        metrics_port=port,
        omero_simulator_import_delay=1.5,
    )
    replica = Replica(write_config(tmp_path / "replica.yml", settings), tmp_path / "replica.log")
    try:
        await _wait_health(port, 200, timeout=30)
        orders = [await insert_order(migrated_url, [path]) for path in files]
        # wait until orders are mid-flight: claimed and inside their (slow) import
        deadline = time.monotonic() + 20
        while True:
            rows = await fetch(
                migrated_url,
                "SELECT count(*) AS n FROM importer_orders WHERE stage = ANY($1::text[])",
                list(PICKED_UP),
            )
            if rows[0]["n"] >= 4:
                break
            assert time.monotonic() < deadline, "orders were not picked up"
            await asyncio.sleep(0.05)

        await asyncio.to_thread(stop_server, pg_server.embedded)
        outage_started = time.monotonic()
        statuses: list[int | None] = []
        try:
            while time.monotonic() - outage_started < OUTAGE_SECONDS:
                assert replica.alive, "the replica exited during the outage"
                statuses.append(await asyncio.to_thread(_healthz, port))
                await asyncio.sleep(0.5)
        finally:
            await asyncio.to_thread(start_server, pg_server.embedded)
        assert replica.alive
        # /healthz keeps answering, and says the database is down
        assert None not in statuses, statuses
        assert 503 in statuses, statuses
        first_503 = statuses.index(503)
        assert all(s == 503 for s in statuses[first_503:]), statuses

        deadline = time.monotonic() + 90
        while (await terminal_count(migrated_url) or 0) < ORDERS:
            assert time.monotonic() < deadline, "orders did not finish after the outage"
            assert replica.alive, "the replica exited after the outage"
            await asyncio.sleep(0.2)
        await _wait_health(port, 200, timeout=15)
    finally:
        code = replica.stop(timeout=30)
    assert code == 0

    latest = await fetch(
        migrated_url,
        "SELECT o.uuid, o.stage, i.description FROM importer_orders o"
        " JOIN imports i ON i.id = o.latest_id",
    )
    assert {row["uuid"] for row in latest} == set(orders)
    assert all(row["stage"] == "Import Completed" for row in latest), [
        (row["stage"], row["description"]) for row in latest
    ]

    log = (tmp_path / "replica.log").read_text(errors="replace")
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    waits = Counter(e["during"] for e in events if e["event"] == "database_unavailable")
    assert waits, "the outage was not logged"
    # Once per backoff step (0.1 s doubling to 5 s: about 12 steps in 30 s) of each call that
    # waits, never once per failed query; only the running orders' writes wait side by side.
    for during, count in waits.items():
        callers = settings.max_workers if during in ("record_objects", "append_stage") else 1
        assert count <= 14 * callers, (during, count)
    assert not [e for e in events if e["level"] in ("error", "critical")]
    # asyncpg's pool logs its own reconnect attempts with a traceback, on a doubling backoff;
    # nothing else may log one
    tracebacks = [line for line in log.splitlines() if "Traceback" in line]
    assert all('"logger": "asyncpg.pool"' in line for line in tracebacks), tracebacks
    assert len(tracebacks) <= 8, f"{len(tracebacks)} tracebacks logged during the outage"
