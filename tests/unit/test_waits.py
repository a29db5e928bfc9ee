"""Settle before import and automatic retry of transient failures (issue 15, items 1 and 2),
in the unit tier: the real dispatcher, pipeline and simulator around the in-memory store."""

from __future__ import annotations

import asyncio
import os
import random
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.dispatcher.dispatcher import RetryPolicy
from biomero_importer.model import (
    STAGE_IMPORTED,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    ClaimedOrder,
    Outcome,
)
from biomero_importer.omero.port import OMERO_UNAVAILABLE
from biomero_importer.omero.simulator import OFFLINE_FILE
from biomero_importer.store import MemoryStore
from biomero_importer.text import DESCRIPTION_LIMIT, duration
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit

RETRY_WAIT = re.compile(r"^OMERO unavailable; retrying in \d+ (s|min|h), attempt (\d+) of (\d+)$")


def claimed(retries: int) -> ClaimedOrder:
    return ClaimedOrder(
        uuid="u",
        group_name="g",
        user_name="u",
        destination_id="1",
        destination_type="Dataset",
        files="[]",
        file_names=None,
        preprocessing_id=None,
        preprocessing=None,
        attempt=1,
        runs=1,
        queued_at=0.0,
        retries=retries,
    )


def omero_down() -> Outcome:
    return Outcome(STAGE_INGEST_FAILED, OMERO_UNAVAILABLE, transient="omero")


# --- the policy ------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(retries=10, backoff=60.0, backoff_max=3600.0)
    rng = random.Random(7)
    for used in range(10):
        base = min(60.0 * 2**used, 3600.0)
        delays = [policy.delay(used, rng) for _ in range(200)]
        assert all(0.8 * base <= d <= 1.2 * base for d in delays)
        # jittered: orders that failed together do not come back together
        assert max(delays) - min(delays) > 0.2 * base


def test_a_transient_failure_with_retries_left_becomes_a_wait() -> None:
    policy = RetryPolicy(retries=5, backoff=60.0, backoff_max=3600.0)
    failed = omero_down()
    failed.objects = [{"type": "Image", "id": 3}]
    wait = policy.outcome(claimed(1), failed, random.Random(1))
    assert wait.stage == STAGE_NEW_ORDER and wait.transient == "omero"
    match = RETRY_WAIT.match(wait.description or "")
    assert match is not None, wait.description
    assert (match.group(2), match.group(3)) == ("2", "5")
    assert wait.wait_seconds is not None and 96 <= wait.wait_seconds <= 144
    assert f"retrying in {duration(wait.wait_seconds)}," in (wait.description or "")
    # what the run created is kept for the next one (the exactly-once ledger)
    assert wait.objects == [{"type": "Image", "id": 3}]


def test_no_retries_left_fails_with_the_reason_and_says_so() -> None:
    policy = RetryPolicy(retries=5)
    failed = policy.outcome(claimed(5), omero_down(), random.Random(1))
    assert failed.stage == STAGE_INGEST_FAILED and failed.wait_seconds is None
    assert failed.description == f"{OMERO_UNAVAILABLE} (gave up after 5 automatic retries)"
    long = Outcome(STAGE_INGEST_FAILED, "x" * 5000, transient="storage")
    cut = policy.outcome(claimed(5), long, random.Random(1)).description or ""
    assert len(cut) <= DESCRIPTION_LIMIT and cut.endswith("(gave up after 5 automatic retries)")
    # retries switched off: the failure as it was
    off = RetryPolicy(retries=0).outcome(claimed(0), omero_down(), random.Random(1))
    assert off.description == OMERO_UNAVAILABLE


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0 s"),
        (45.4, "45 s"),
        (89, "89 s"),
        (240, "4 min"),
        (3600, "60 min"),
        (5400, "1 h 30 min"),
        (7200, "2 h"),
    ],
)
def test_durations_read_as_people_say_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# --- the service -----------------------------------------------------------------------------


def objects_of(settings: Any, uuid: str) -> list[str]:
    db = sqlite3.connect(settings.simulator_dir / "omero.sqlite")
    try:
        rows = db.execute("SELECT client_path FROM objects WHERE order_uuid = ?", (uuid,))
        return [row[0] for row in rows]
    finally:
        db.close()


async def descriptions(store: MemoryStore, uuid: str) -> list[tuple[str, str | None]]:
    return [(e.stage, e.description) for e in await store.order_events(uuid)]


async def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_orders_wait_out_an_omero_outage_and_complete_once(
    tmp_path: Path, root: Path
) -> None:
    """The replica's fallback poll is 60 s: it finds its waiting orders by its own wake-up."""
    files = make_tiffs(root / "run", 3)
    # the OMERO probe looks again within 0.5 s (its 5 s default is real-time cost here)
    settings = unit_settings(
        tmp_path,
        root,
        transient_backoff=0.3,
        transient_retries=20,
        poll_interval=60.0,
        dependency_probe_backoff=0.2,
        dependency_probe_backoff_max=0.5,
    )
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    offline = settings.simulator_dir / OFFLINE_FILE
    orders = [order([f]) for f in files]
    async with memory_replica(settings, store) as (service, _):
        offline.touch()
        for placed in orders:
            await store.submit(placed)

        async def all_waited() -> bool:
            for placed in orders:
                rows = await descriptions(store, placed.uuid)
                if not any(RETRY_WAIT.match(d or "") for _, d in rows):
                    return False
            return True

        await wait_for(all_waited)
        detail = await store.order_detail(orders[0].uuid)
        assert detail is not None and detail.summary.stage in (STAGE_NEW_ORDER, "Import Started")
        offline.unlink()
        results = [await finished(store, placed.uuid) for placed in orders]
        waits = service.metrics.order_waits.labels(reason="omero")._value.get()
        details = [await store.order_detail(placed.uuid) for placed in orders]
    assert results == [(STAGE_IMPORTED, None)] * 3
    for placed, file, detail in zip(orders, files, details, strict=True):
        assert objects_of(settings, placed.uuid) == [str(file)]
        # the waits used no attempt; retries are forgotten once the order ends
        assert detail is not None and detail.attempts == 1 and detail.retries == 0
    assert waits >= 3


async def test_retries_run_out_then_the_order_fails_with_the_reason(
    tmp_path: Path, root: Path
) -> None:
    (file,) = make_tiffs(root / "run", 1)
    settings = unit_settings(tmp_path, root, transient_backoff=0.05, transient_retries=2)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    (settings.simulator_dir).mkdir(parents=True, exist_ok=True)
    (settings.simulator_dir / OFFLINE_FILE).touch()
    placed = order([file])
    async with memory_replica(settings, store):
        await store.submit(placed)
        stage, description = await finished(store, placed.uuid)
        rows = await descriptions(store, placed.uuid)
    assert stage == STAGE_INGEST_FAILED
    assert description == f"{OMERO_UNAVAILABLE} (gave up after 2 automatic retries)"
    attempts = [RETRY_WAIT.match(d or "") for s, d in rows if s == STAGE_NEW_ORDER]
    assert [(m.group(2), m.group(3)) for m in attempts if m] == [("1", "2"), ("2", "2")]
    assert objects_of(settings, placed.uuid) == []


async def test_a_permanent_failure_is_never_retried(tmp_path: Path, root: Path) -> None:
    (bad,) = make_tiffs(root / "run", 1, prefix="bad")
    settings = unit_settings(
        tmp_path, root, transient_backoff=0.05, omero_simulator_fail_pattern="bad"
    )
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order([bad])
    async with memory_replica(settings, store) as (service, _):
        await store.submit(placed)
        stage, description = await finished(store, placed.uuid)
        waits = sum(
            service.metrics.order_waits.labels(reason=r)._value.get()
            for r in ("settle", "omero", "storage", "container_runtime")
        )
        rows = await descriptions(store, placed.uuid)
    assert stage == STAGE_INGEST_FAILED and "bad0.tif" in (description or "")
    assert [s for s, _ in rows] == [
        STAGE_NEW_ORDER,
        "Import Started",
        STAGE_INGEST_FAILED,
    ]
    assert waits == 0


# --- settle ----------------------------------------------------------------------------------


async def test_an_order_waits_while_a_file_in_its_folder_changes(
    tmp_path: Path, root: Path
) -> None:
    folder = root / "acquisition"
    (file,) = make_tiffs(folder, 1)
    settings = unit_settings(tmp_path, root, settle_seconds=0.3, poll_interval=60.0)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order([folder])
    async with memory_replica(settings, store):
        # still being written: a new file appears in the folder
        (late,) = make_tiffs(folder, 1, prefix="late")
        await store.submit(placed)
        stage, _ = await finished(store, placed.uuid)
        rows = await descriptions(store, placed.uuid)
    waits = [d for s, d in rows if s == STAGE_NEW_ORDER and d]
    # the first look, then a second one settle_seconds later that found nothing changed
    assert waits == ["Waiting for files to stop changing (looking again in 0 s)"]
    assert stage == STAGE_IMPORTED
    assert sorted(objects_of(settings, placed.uuid)) == sorted([str(file), str(late)])


async def test_files_that_never_settle_fail_naming_the_file(tmp_path: Path, root: Path) -> None:
    (file,) = make_tiffs(root / "busy", 1)
    settings = unit_settings(
        tmp_path, root, settle_seconds=0.3, settle_max_wait=1.0, poll_interval=60.0
    )
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order([file])
    stop = asyncio.Event()

    async def keep_writing() -> None:
        while not stop.is_set():
            os.utime(file)
            await asyncio.sleep(0.05)

    writer = asyncio.create_task(keep_writing())
    try:
        async with memory_replica(settings, store):
            await store.submit(placed)
            stage, description = await finished(store, placed.uuid)
            rows = await descriptions(store, placed.uuid)
            detail = await store.order_detail(placed.uuid)
    finally:
        stop.set()
        await writer
    assert stage == STAGE_INGEST_FAILED
    assert description == f"Files still changing after waiting 1 s: {file}"
    assert sum(1 for s, _ in rows if s == STAGE_NEW_ORDER) >= 2
    assert detail is not None and detail.waiting_since is None and detail.attempts == 1


async def test_settle_off_starts_at_once(tmp_path: Path, root: Path) -> None:
    (file,) = make_tiffs(root / "run", 1)
    settings = unit_settings(tmp_path, root)
    assert settings.settle_seconds == 0
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order([file])
    async with memory_replica(settings, store):
        await store.submit(placed)
        assert await finished(store, placed.uuid) == (STAGE_IMPORTED, None)
        rows = await descriptions(store, placed.uuid)
    assert [s for s, _ in rows] == [
        STAGE_NEW_ORDER,
        "Import Started",
        STAGE_IMPORTED,
    ]


async def test_a_symlink_loop_in_a_folder_does_not_break_the_settle_check(
    tmp_path: Path, root: Path
) -> None:
    """Before: the loop's ELOOP escaped the walk and the order ended 'Internal error in the
    importer'. A link that cannot be followed is judged by its own times, as a dangling one."""
    folder = root / "looped"
    (file,) = make_tiffs(folder, 1)
    (folder / "a").symlink_to("b")
    (folder / "b").symlink_to("a")
    settings = unit_settings(tmp_path, root, settle_seconds=0.3, poll_interval=60.0)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order([folder])
    async with memory_replica(settings, store):
        await store.submit(placed)
        stage, description = await finished(store, placed.uuid)
        rows = await descriptions(store, placed.uuid)
    assert description != "Internal error in the importer; see its logs"
    assert any(s == STAGE_NEW_ORDER and d and d.startswith("Waiting for files") for s, d in rows)
    assert stage == STAGE_IMPORTED
    assert str(file) in objects_of(settings, placed.uuid)
