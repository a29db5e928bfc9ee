"""Issue 6 acceptance on a real run: a replica as its own process (the real ``run`` command,
simulator backend, real PostgreSQL) handles a few orders; then its JSON log stream and its
``/metrics`` endpoint are read as an aggregator and Prometheus would read them."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.reliability.harness import free_port
from tests.support import (
    insert_order,
    make_settings,
    make_tiffs,
    start_replica,
    stop_replica,
    wait_for_stage,
    write_config,
)

# Recognisable in any output, and spelled without characters an encoder would change.
OMERO_SECRET = "OmeroPw-recognisable-7f3c9e21d4"
NS = "biomero_importer"


def _replica_config(tmp_path: Path, url: str, root: Path, **overrides: Any) -> Path:
    settings = make_settings(
        tmp_path,
        url,
        [root],
        run_migrations=False,
        poll_interval=0.5,
        log_format="json",
        log_level="INFO",
        omero_user="root",
        omero_password=OMERO_SECRET,
        **overrides,
    )
    assert settings.omero_password is not None
    return write_config(tmp_path / "replica.yml", settings)


async def _run_orders(url: str, root: Path, good: int, bad: int) -> tuple[list[str], list[str]]:
    """``good`` one-image orders and ``bad`` ones naming a missing file, all finished."""
    completed = [await insert_order(url, [path]) for path in make_tiffs(root, good)]
    failed = [await insert_order(url, [f"{root}/missing{n}.tif"]) for n in range(bad)]
    for order in completed:
        assert (await wait_for_stage(url, order, timeout=30))["stage"] == "Import Completed"
    for order in failed:
        assert (await wait_for_stage(url, order, timeout=30))["stage"] == "Import Failed"
    return completed, failed


def _json_lines(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


async def test_json_log_stream_of_a_real_run(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    config = _replica_config(tmp_path, migrated_url, import_root)
    replica = start_replica(config)
    try:
        (good,), (bad,) = await _run_orders(migrated_url, import_root, good=1, bad=1)
    finally:
        assert await asyncio.to_thread(stop_replica, replica, timeout=30) == 0
    stream = config.with_suffix(".log").read_text(errors="replace")

    # Not a terminal: every line on stdout is one JSON object.
    lines = [line for line in stream.splitlines() if line.strip()]
    events = _json_lines(stream)
    assert len(events) == len(lines), [line for line in lines if not line.startswith("{")]
    assert all({"timestamp", "level", "logger", "event"} <= set(e) for e in events)
    worker_ids = {e.get("worker_id") for e in events}
    assert len(worker_ids) == 1 and None not in worker_ids, worker_ids
    assert {"importer_ready", "shutdown_requested"} <= {e["event"] for e in events}

    for order, final in ((good, "Import Completed"), (bad, "Import Failed")):
        mine = [e for e in events if e.get("order_uuid") == order]
        assert mine, f"no event of order {order}"
        assert all(e["worker_id"] in worker_ids for e in mine)
        staged = {(e["event"], e["stage"]) for e in mine if "stage" in e}
        assert ("order_started", "Import Started") in staged, mine
        assert ("order_finished", final) in staged, mine
    failure = next(e for e in events if e.get("order_uuid") == bad and e["level"] == "warning")
    assert "File not found" in failure["reason"]

    # The password was configured, and appears nowhere: stdout, or any order's own log.
    assert OMERO_SECRET in config.read_text()
    assert OMERO_SECRET not in stream
    order_logs = list((tmp_path / "logs").rglob("*"))
    for path in order_logs:
        if path.is_file():
            assert OMERO_SECRET not in path.read_text(errors="replace"), path


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _scrape_until(
    port: int, done: Any, timeout: float = 15
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Scrape until ``done(samples)`` holds (the counters move just after the row is
    written) or time is up; the last scrape either way."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            samples = _samples(await asyncio.to_thread(_get, port, "/metrics"))
        except (urllib.error.URLError, OSError):
            samples = {}
        if (samples and done(samples)) or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.2)


async def _healthz_ok(port: int, timeout: float = 10) -> Any:
    """/healthz once it answers 200 (the health watcher refreshes every 2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return json.loads(await asyncio.to_thread(_get, port, "/healthz"))
        except urllib.error.HTTPError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"/healthz still {exc.code}: {exc.read().decode()}") from None
        await asyncio.sleep(0.2)


async def test_metrics_after_a_run(migrated_url: str, tmp_path: Path, import_root: Path) -> None:
    port = free_port()
    config = _replica_config(tmp_path, migrated_url, import_root, metrics_port=port)
    replica = start_replica(config)
    try:
        before = await _scrape_until(port, lambda s: True)
        assert before, "/metrics did not answer"
        assert before[(f"{NS}_orders_finished_total", (("outcome", "completed"),))] == 0
        assert before[(f"{NS}_pickup_latency_seconds_count", ())] == 0

        await _run_orders(migrated_url, import_root, good=3, bad=2)

        def finished(outcome: str) -> tuple[str, tuple[tuple[str, str], ...]]:
            return (f"{NS}_orders_finished_total", (("outcome", outcome),))

        def settled(s: dict[Any, float]) -> bool:
            return s.get(finished("completed")) == 3 and s.get(finished("failed")) == 2

        after = await _scrape_until(port, settled)
        health = await _healthz_ok(port)
    finally:
        assert await asyncio.to_thread(stop_replica, replica, timeout=30) == 0

    assert after[finished("completed")] == 3
    assert after[finished("failed")] == 2
    assert after[finished("cancelled")] == 0
    assert after[finished("handed_back")] == 0
    pickups = after[(f"{NS}_pickup_latency_seconds_count", ())]
    assert pickups == 5, pickups  # one claim per order (max_attempts 1)
    assert after[(f"{NS}_pickup_latency_seconds_sum", ())] > 0

    def steps(step: str) -> float:
        return after[(f"{NS}_step_duration_seconds_count", (("step", step),))]

    assert steps("import") == 3
    assert steps("annotate") == 3
    assert steps("preprocess") == 0
    assert after[(f"{NS}_running_orders", ())] == 0
    assert health == {
        "status": "ok",
        "checks": {"process": True, "database": True, "listener": True, "helpers": True},
    }
