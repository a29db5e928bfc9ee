"""Re-runs against an OMERO simulator that behaves as OMERO does (issue 12).

Each test switches on the simulator rule it is about (``omero_simulator_*`` settings or the
gateway's test hooks) and runs the order through the re-run paths that meet it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import structlog

from biomero_importer.dispatcher.dispatcher import SHUTDOWN_NOTE
from biomero_importer.model import STAGE_IMPORTED, STAGE_INGEST_FAILED, STAGE_NEW_ORDER
from biomero_importer.omero.simulator import SimulatorGateway
from biomero_importer.store import MemoryStore
from tests.omero.test_zarr import make_series_v2
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit


def sim(settings: Any, query: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(settings.simulator_dir / "omero.sqlite")
    try:
        return db.execute(query, args).fetchall()
    finally:
        db.close()


def images_of(settings: Any, uuid: str) -> list[str]:
    rows = sim(settings, "SELECT client_path FROM objects WHERE order_uuid = ? ORDER BY id", uuid)
    return [row[0] for row in rows]


def new_store(settings: Any, shared: MemoryStore | None = None) -> MemoryStore:
    """A replica's store; ``shared``: the same orders, as another replica (or a restart) sees
    them (a closed store refuses every call, as a closed pool does)."""
    return MemoryStore(
        worker_id=settings.worker_id, lease_seconds=settings.lease_seconds, shared=shared
    )


async def wait_until(check: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not met in {timeout:g} s")
        await asyncio.sleep(0.01)


async def stage_of(store: MemoryStore, uuid: str) -> tuple[str, str | None]:
    detail = await store.order_detail(uuid)
    assert detail is not None
    return detail.summary.stage, detail.summary.description


async def ledger(store: MemoryStore, uuid: str) -> list[dict[str, Any]]:
    detail = await store.order_detail(uuid)
    assert detail is not None
    return detail.objects


# --- orphan filesets, partial imports and client-path exclusion -----------------------------


@pytest.mark.parametrize("failure", ["orphan_fileset", "partial"])
async def test_retry_after_a_server_side_failure_imports_every_file(
    tmp_path: Path, root: Path, failure: str
) -> None:
    """Before: the retry passed --exclude=clientpath; OMERO skips bad.tif because the failed
    first attempt left its fileset, and the order ended 'Import Completed' without it."""
    good, bad = make_tiffs(root / "run", 2)
    bad = bad.rename(bad.with_name("bad.tif"))
    failing = unit_settings(
        tmp_path, root, omero_simulator_fail_pattern="bad", omero_simulator_failure=failure
    )
    store = new_store(failing)
    placed = order([good, bad])
    async with memory_replica(failing, store):
        await store.submit(placed)
        stage, description = await finished(store, placed.uuid)
    assert stage == STAGE_INGEST_FAILED and "bad.tif" in (description or "")
    # the file is fixed; the admin retries
    fixed = unit_settings(tmp_path, root)
    store = new_store(fixed, store)
    async with memory_replica(fixed, store):
        await store.retry(placed.uuid, "retry")
        stage, description = await finished(store, placed.uuid)
    store = new_store(fixed, store)
    assert (stage, description) == (STAGE_IMPORTED, None)
    assert sorted(images_of(fixed, placed.uuid)) == sorted([str(good), str(bad)])
    assert Counter(r["client_path"] for r in await ledger(store, placed.uuid)) == {
        str(good): 1,
        str(bad): 1,
    }


async def test_a_unit_that_produced_nothing_fails_the_order_naming_it(
    tmp_path: Path, root: Path
) -> None:
    """The invariant: no 'Import Completed' unless every unit has an object. A unit whose
    import reports nothing (OMERO's exclusion exits 0 with no ids) fails the order."""
    (kept,) = make_tiffs(root / "one", 1)
    settings = unit_settings(tmp_path, root)
    store = new_store(settings)
    other = order([kept])
    mine = order([kept])
    async with memory_replica(settings, store) as (service, _):
        await store.submit(other)
        assert (await finished(store, other.uuid))[0] == STAGE_IMPORTED
        gateway = service.gateway
        assert isinstance(gateway, SimulatorGateway)
        # a backend that excludes everything already seen (as --exclude=clientpath would)
        session_type = type(gateway.open_session("researcher", "Demo", order_uuid="probe"))
        original = session_type.import_path

        def excluding(self: Any, path: Path, target: Any, **kw: Any) -> Any:
            return original(self, path, target, order_uuid=kw["order_uuid"], exclude_existing=True)

        session_type.import_path = excluding  # type: ignore[method-assign]
        try:
            await store.submit(mine)
            stage, description = await finished(store, mine.uuid)
        finally:
            session_type.import_path = original  # type: ignore[method-assign]
    assert stage == STAGE_INGEST_FAILED
    assert description is not None and "image0.tif" in description


# --- OME-Zarr registration --------------------------------------------------------------------


async def test_shutdown_during_a_multi_image_registration_then_restart_no_duplicates(
    tmp_path: Path, root: Path
) -> None:
    series = make_series_v2(root / "series.zarr", 6)
    settings = unit_settings(
        tmp_path, root, use_register_zarr=True, omero_simulator_import_delay=0.4
    )
    store = new_store(settings)
    placed = order([series])
    async with memory_replica(settings, store) as (service, _):
        await store.submit(placed)
        await wait_until(lambda: len(images_of(settings, placed.uuid)) >= 2)
        service.dispatcher.stop_now()  # SIGTERM twice: hand back at once
    store = new_store(settings, store)
    assert (await stage_of(store, placed.uuid)) == (STAGE_NEW_ORDER, SHUTDOWN_NOTE)
    partial = images_of(settings, placed.uuid)
    assert 2 <= len(partial) < 6
    # every registered object was recorded as it was created, before the shutdown
    assert len(await ledger(store, placed.uuid)) == len(partial)
    fast = unit_settings(tmp_path, root, use_register_zarr=True)
    async with memory_replica(fast, store):
        stage, _ = await finished(store, placed.uuid)
    store = new_store(settings, store)
    assert stage == STAGE_IMPORTED
    paths = images_of(settings, placed.uuid)
    assert sorted(paths) == sorted(str(series / str(i)) for i in range(6))
    recorded = [(r["type"], r["id"]) for r in await ledger(store, placed.uuid)]
    assert len(recorded) == len(set(recorded)) == 6


async def test_connection_lost_mid_registration_never_replays_and_retry_completes(
    tmp_path: Path, root: Path
) -> None:
    series = make_series_v2(root / "series.zarr", 5)
    # automatic retries off: the admin's retry is what resumes it here
    settings = unit_settings(
        tmp_path,
        root,
        use_register_zarr=True,
        omero_simulator_connection_lost_after=2,
        transient_retries=0,
    )
    store = new_store(settings)
    placed = order([series])
    async with memory_replica(settings, store):
        await store.submit(placed)
        stage, description = await finished(store, placed.uuid)
        assert stage == STAGE_INGEST_FAILED and "OMERO unavailable" in (description or "")
        assert len(images_of(settings, placed.uuid)) == 2
        await store.retry(placed.uuid, "retry")
        stage, _ = await finished(store, placed.uuid)
    store = new_store(settings, store)
    assert stage == STAGE_IMPORTED
    assert sorted(images_of(settings, placed.uuid)) == sorted(
        str(series / str(i)) for i in range(5)
    )
    assert len(await ledger(store, placed.uuid)) == 5


async def test_connection_lost_mid_registration_is_retried_automatically_without_replays(
    tmp_path: Path, root: Path
) -> None:
    """Issue 15: the lost connection is a transient failure; the order waits, runs again by
    itself and registers only what the first run did not (the ledger and the order's comment
    annotation), so every image exists exactly once and no admin is needed."""
    series = make_series_v2(root / "series.zarr", 5)
    settings = unit_settings(
        tmp_path,
        root,
        use_register_zarr=True,
        omero_simulator_connection_lost_after=2,
        transient_backoff=0.05,
    )
    store = new_store(settings)
    placed = order([series])
    async with memory_replica(settings, store):
        await store.submit(placed)
        stage, _ = await finished(store, placed.uuid)
        events = await store.order_events(placed.uuid)
        recorded = await ledger(store, placed.uuid)
    assert stage == STAGE_IMPORTED
    waits = [e.description or "" for e in events if e.stage == STAGE_NEW_ORDER]
    assert len(waits) == 2 and waits[1].startswith("OMERO unavailable; retrying in ")
    assert sorted(images_of(settings, placed.uuid)) == sorted(
        str(series / str(i)) for i in range(5)
    )
    assert len({(r["type"], r["id"]) for r in recorded}) == len(recorded) == 5


# --- annotations --------------------------------------------------------------------------------


async def test_shutdown_during_annotate_of_2000_images_then_one_map_annotation_each(
    tmp_path: Path, root: Path
) -> None:
    (root / "many").mkdir()
    files = [root / "many" / f"image{n:04d}.tif" for n in range(2000)]
    for file in files:
        file.write_bytes(b"II*\x00")  # the simulator reads no pixels
    settings = unit_settings(tmp_path, root)
    store = new_store(settings)
    placed = order([root / "many"])
    annotated = "SELECT count(DISTINCT map_id) FROM annotations"
    async with memory_replica(settings, store) as (service, _):
        await store.submit(placed)
        await wait_until(lambda: sim(settings, annotated)[0][0] >= 300, timeout=60)
        service.dispatcher.stop_now()
    store = new_store(settings, store)
    assert (await stage_of(store, placed.uuid))[0] == STAGE_NEW_ORDER
    assert sim(settings, annotated)[0][0] < 2000
    async with memory_replica(settings, store):
        stage, _ = await finished(store, placed.uuid, timeout=60)
    assert stage == STAGE_IMPORTED
    per_image = sim(
        settings,
        "SELECT o.id, count(DISTINCT a.map_id) FROM objects o LEFT JOIN annotations a"
        " ON a.object_id = o.id AND a.ns = ? GROUP BY o.id",
        settings.annotation_namespace,
    )
    assert len(per_image) == len(files) == 2000
    assert {count for _, count in per_image} == {1}


# --- sessions -----------------------------------------------------------------------------------


async def test_a_60_s_ttl_is_raised_once_and_a_90_s_import_completes(
    tmp_path: Path, root: Path
) -> None:
    """The original's shipped settings.yml: ttl_for_user_conn 60000. OMERO's TTL is a hard
    lifetime; the simulated import takes 90 s of server time (no wall-clock wait)."""
    files = make_tiffs(root / "slow", 3)
    settings = unit_settings(
        tmp_path,
        root,
        ttl_for_user_conn=60_000,
        import_timeout=120.0,
        omero_simulator_import_seconds=90.0,
    )
    store = new_store(settings)
    placed = order(files)
    with structlog.testing.capture_logs() as logs:
        async with memory_replica(settings, store):
            await store.submit(placed)
            stage, description = await finished(store, placed.uuid)
    assert (stage, description) == (STAGE_IMPORTED, None)
    raised = [e for e in logs if e["event"] == "omero_session_ttl_raised"]
    assert len(raised) == 1 and raised[0]["log_level"] == "warning"
    assert raised[0]["configured_ms"] == 60_000 and raised[0]["ttl_ms"] == 720_000
    assert len(images_of(settings, placed.uuid)) == 3


async def test_an_order_longer_than_the_session_ttl_gets_a_fresh_session(
    tmp_path: Path, root: Path
) -> None:
    """10 files of 90 s each in sessions that live 700 s: the pipeline opens a new session
    when the one it has cannot outlive another import."""
    files = make_tiffs(root / "long", 10)
    settings = unit_settings(
        tmp_path,
        root,
        ttl_for_user_conn=60_000,
        import_timeout=100.0,
        omero_simulator_import_seconds=90.0,
    )
    store = new_store(settings)
    placed = order(files)
    async with memory_replica(settings, store) as (service, _):
        await store.submit(placed)
        stage, description = await finished(store, placed.uuid)
        gateway = service.gateway
        assert isinstance(gateway, SimulatorGateway)
        assert gateway.open_sessions == set()
    assert (stage, description) == (STAGE_IMPORTED, None)
    assert len(images_of(settings, placed.uuid)) == 10


async def test_a_cancel_during_session_opening_leaves_no_open_session(
    tmp_path: Path, root: Path
) -> None:
    files = make_tiffs(root / "c", 1)
    # the lease loop notices the cancel within a third of a lease (0.2 s): well inside the
    # 0.6 s the session takes to open
    settings = unit_settings(tmp_path, root, lease_seconds=0.6)
    store = new_store(settings)
    placed = order(files)
    async with memory_replica(settings, store) as (service, _):
        gateway = service.gateway
        assert isinstance(gateway, SimulatorGateway)
        gateway.open_delay = 0.6
        opening = gateway.open_session

        started = asyncio.Event()
        opened = asyncio.Event()
        loop = asyncio.get_running_loop()

        def watched(*args: Any, **kw: Any) -> Any:
            loop.call_soon_threadsafe(started.set)
            try:
                return opening(*args, **kw)
            finally:
                loop.call_soon_threadsafe(opened.set)

        gateway.open_session = watched  # type: ignore[method-assign]
        await store.submit(placed)
        await asyncio.wait_for(started.wait(), 10)
        await store.request_cancel(placed.uuid)
        stage, description = await finished(store, placed.uuid)
        assert (stage, description) == (STAGE_INGEST_FAILED, "Cancelled")
        assert not opened.is_set(), "the cancel landed after the session had opened"
        # the session that finishes opening after the cancel is closed as soon as it exists
        await asyncio.wait_for(opened.wait(), 10)
        await wait_until(
            lambda: gateway.open_sessions == set(), timeout=1.0, what="no open session"
        )
    assert images_of(settings, placed.uuid) == []


async def test_a_cancel_keeps_the_ledger_of_what_was_imported_and_a_retry_completes_it(
    tmp_path: Path, root: Path
) -> None:
    """Before: the cancel outcome dropped the in-memory ledger (saved at most once a second),
    so the retry had only OMERO to ask."""
    files = make_tiffs(root / "five", 5)
    # 0.4 s a file leaves the cancel a second to land before the last file: at 0.15 s a loaded
    # machine sometimes imported all five first, and the test then saw no cancel mid-way
    settings = unit_settings(tmp_path, root, omero_simulator_import_delay=0.4)
    store = new_store(settings)
    placed = order(files)
    async with memory_replica(settings, store) as (service, _):
        await store.submit(placed)
        await wait_until(lambda: len(images_of(settings, placed.uuid)) >= 2)
        await store.request_cancel(placed.uuid)
        assert (await finished(store, placed.uuid)) == (STAGE_INGEST_FAILED, "Cancelled")
        imported = images_of(settings, placed.uuid)
        assert 2 <= len(imported) < 5
        assert sorted(r["client_path"] for r in await ledger(store, placed.uuid)) == sorted(
            imported
        )
        gateway = service.gateway
        assert isinstance(gateway, SimulatorGateway)
        await wait_until(lambda: not gateway.open_sessions, 5)
    # the retry needs no slow imports: a replica without the delay (the same orders) runs it
    fast = unit_settings(tmp_path, root)
    store = new_store(fast, store)
    async with memory_replica(fast, store):
        await store.retry(placed.uuid, "retry")
        assert (await finished(store, placed.uuid))[0] == STAGE_IMPORTED
    assert sorted(images_of(settings, placed.uuid)) == sorted(str(f) for f in files)


async def test_a_cancel_in_the_middle_of_a_registration_stops_between_steps(
    tmp_path: Path, root: Path
) -> None:
    series = make_series_v2(root / "series.zarr", 6)
    settings = unit_settings(
        tmp_path, root, use_register_zarr=True, omero_simulator_import_delay=0.15
    )
    store = new_store(settings)
    placed = order([series])
    async with memory_replica(settings, store) as (service, _):
        await store.submit(placed)
        await wait_until(lambda: len(images_of(settings, placed.uuid)) >= 2)
        await store.request_cancel(placed.uuid)
        assert (await finished(store, placed.uuid))[1] == "Cancelled"
        stopped = images_of(settings, placed.uuid)
        # Every OMERO call of the run has ended once its threads are idle: a registration
        # that went on after the cancel would hold one until its last image (0.15 s a step),
        # and this waits for it, where a fixed sleep only watched 0.5 s of it.
        await asyncio.to_thread(service.executor.shutdown)
        assert images_of(settings, placed.uuid) == stopped and len(stopped) < 6
        assert len(await ledger(store, placed.uuid)) == len(stopped)
    # the retry needs no slow steps: a replica without the delay (the same orders) runs it
    fast = unit_settings(tmp_path, root, use_register_zarr=True)
    store = new_store(fast, store)
    async with memory_replica(fast, store):
        await store.retry(placed.uuid, "retry")
        assert (await finished(store, placed.uuid))[0] == STAGE_IMPORTED
    assert sorted(images_of(settings, placed.uuid)) == sorted(
        str(series / str(i)) for i in range(6)
    )
