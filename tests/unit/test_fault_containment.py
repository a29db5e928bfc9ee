"""Faults in one order, one helper or the database: contained, logged, and never silent."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from biomero_importer.dispatcher.dispatcher import FENCED_NOTE, SHUTDOWN_NOTE
from biomero_importer.dispatcher.supervisor import Supervisor
from biomero_importer.model import (
    STAGE_IMPORTED,
    STAGE_IMPORTING,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
)
from biomero_importer.store import MemoryStore
from tests.reliability.harness import simulator_objects
from tests.support import make_tiffs, non_utf8_folder
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit

HELPERS = ["claim", "leases", "recovery", "finish-writer", "health", "loop-lag"]


async def test_a_non_utf8_name_fails_only_its_order(tmp_path: Path, root: Path) -> None:
    """Before: the description with the undecodable name killed the finish writer and every
    later order stayed 'Import Started'."""
    settings = unit_settings(tmp_path, root)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    async with memory_replica(settings, store):
        bad = order([non_utf8_folder(root)])
        await store.submit(bad)
        stage, description = await finished(store, bad.uuid)
        assert stage == STAGE_INGEST_FAILED
        assert description is not None
        assert description.startswith("Folder links outside the import roots")
        assert "r\\xe9sum\\xe9-link" in description
        good = order(make_tiffs(root / "plain", 1))
        await store.submit(good)
        assert (await finished(store, good.uuid))[0] == STAGE_IMPORTED


class Injected(RuntimeError):
    pass


def break_helper(service: Any, store: MemoryStore, name: str, times: int) -> None:
    """Make one helper raise ``times`` times (an unexpected bug in it), then work again."""
    left = [times]

    def failing(real: Any) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            if left[0] > 0:
                left[0] -= 1
                raise Injected(f"injected failure in {name}")
            return await real(*args, **kwargs)

        return call

    if name == "claim":
        store.claim = failing(store.claim)  # type: ignore[method-assign]
    elif name == "leases":
        store.renew_leases = failing(store.renew_leases)  # type: ignore[method-assign]
    elif name == "recovery":
        store.recover_expired = failing(store.recover_expired)  # type: ignore[method-assign]
    elif name == "finish-writer":
        store.serve = failing(store.serve)  # type: ignore[method-assign]
        service.dispatcher.helpers.pop("finish-writer", None)
    elif name == "health":
        store.ping = failing(store.ping)  # type: ignore[method-assign]
    elif name == "loop-lag":
        real_set = service.metrics.event_loop_lag.set

        def lag(value: float) -> None:
            if left[0] > 0:
                left[0] -= 1
                raise Injected("injected failure in loop-lag")
            real_set(value)

        service.metrics.event_loop_lag.set = lag


async def test_failing_helpers_are_logged_restarted_and_the_replica_recovers(
    tmp_path: Path, root: Path
) -> None:
    """Every helper fails twice, all at once (one replica for all: six replicas cost the unit
    tier six seconds): each is logged with its traceback, restarted, and orders go on."""
    settings = unit_settings(tmp_path, root, lease_seconds=0.6, omero_simulator_import_delay=0.5)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    supervisor = Supervisor(backoff_start=0.01, max_failures=5, window=30)
    with structlog.testing.capture_logs() as logs:
        async with memory_replica(settings, store, supervisor) as (service, _):
            for helper in HELPERS:
                break_helper(service, store, helper, times=2)
            # an order running meanwhile gives the lease helper something to renew
            during = order(make_tiffs(root / "during", 1))
            await store.submit(during)
            # every helper runs at least once a lease (recovery starts one lease after start)
            await asyncio.sleep(0.45)
            assert (await finished(store, during.uuid))[0] == STAGE_IMPORTED
            done = order(make_tiffs(root / "after", 1))
            await store.submit(done)
            assert (await finished(store, done.uuid))[0] == STAGE_IMPORTED
            assert {h: supervisor.helpers[h].restarts for h in HELPERS} == dict.fromkeys(HELPERS, 2)
            assert service.health.failing_helpers == []
    for helper in HELPERS:
        failures = [e for e in logs if e["event"] == "helper_failed" and e["helper"] == helper]
        assert len(failures) == 2, helper
        assert all(e.get("exc_info") for e in failures), "logged with its traceback"


async def test_a_helper_that_keeps_failing_turns_health_red_and_stops_claiming(
    tmp_path: Path, root: Path
) -> None:
    # no order runs here: the lease only sets when recovery starts
    settings = unit_settings(tmp_path, root, lease_seconds=0.25)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    supervisor = Supervisor(backoff_start=0.01, backoff_max=0.02, max_failures=3, window=30)
    async with memory_replica(settings, store, supervisor) as (service, _):
        break_helper(service, store, "recovery", times=10_000)
        # recovery starts a lease period (0.25 s) after start, then fails at every restart
        for _ in range(500):
            if service.health.failing_helpers:
                break
            await asyncio.sleep(0.01)
        assert service.health.failing_helpers == ["recovery"]
        assert not service.health.claiming
        waiting = order(make_tiffs(root / "waits", 1))
        await store.submit(waiting)
        await asyncio.sleep(0.3)
        state = await store.order_state(waiting.uuid)
        assert state is not None and state.stage == STAGE_NEW_ORDER


async def test_a_replica_that_cannot_renew_stops_its_orders_before_the_lease_ends(
    tmp_path: Path, root: Path
) -> None:
    """Before: renewal retried forever, so a replica cut off from its database kept importing
    orders that another replica would take over once their leases expired."""
    settings = unit_settings(
        tmp_path, root, lease_seconds=1.5, omero_simulator_import_delay=30.0, shutdown_timeout=0.2
    )
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    with structlog.testing.capture_logs() as logs:
        async with memory_replica(settings, store) as (service, _):
            slow = order(make_tiffs(root / "slow", 1))
            await store.submit(slow)
            while not service.dispatcher.running_count:
                await asyncio.sleep(0.01)
            lost_at = time.monotonic()
            store.available = False  # the database is gone: renewals fail
            while not any(e["event"] == "order_stopping" for e in logs):
                await asyncio.sleep(0.01)
            stopped_after = time.monotonic() - lost_at
            # the import itself (a simulated 30 s one) is aborted, not left running
            while not any(e["event"] == "order_stopped" for e in logs):
                await asyncio.sleep(0.01)
                assert time.monotonic() - lost_at < settings.lease_seconds, "still importing"
            store.available = True
            stage, description = await finished_or_pending(store, slow.uuid)
    assert stopped_after < settings.lease_seconds
    assert next(e["reason"] for e in logs if e["event"] == "order_stopping") == "fenced"
    assert (stage, description) == (STAGE_NEW_ORDER, FENCED_NOTE)


async def finished_or_pending(store: MemoryStore, uuid: str) -> tuple[str, str | None]:
    """The hand-back row, once written (the order may already be running again)."""
    for _ in range(500):
        handed_back = [row for row in store.snapshot(uuid) if row[0] == STAGE_NEW_ORDER]
        if len(handed_back) > 1:
            return handed_back[1]
        await asyncio.sleep(0.01)
    raise AssertionError("not handed back")


async def test_shutdown_is_bounded_while_the_database_is_down(tmp_path: Path, root: Path) -> None:
    """Before: closing the store waited for terminal writes that could never be made."""
    # 0.2 s of grace and of hand-back: the bound below is then 1.6 s, tighter than a store
    # close that waits out its own 1.5 s budget on top of them
    settings = unit_settings(
        tmp_path, root, shutdown_timeout=0.2, omero_simulator_import_delay=30.0
    )
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=60)
    replica = memory_replica(settings, store)
    service, task = await replica.__aenter__()
    service.dispatcher.handback_grace = 0.2
    slow = order(make_tiffs(root / "slow", 1))
    await store.submit(slow)
    while not service.dispatcher.running_count:
        await asyncio.sleep(0.01)
    store.available = False
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        await replica.__aexit__(None, None, None)
    assert time.monotonic() - started < settings.shutdown_timeout + 2 * 0.2 + 1
    assert task.done()
    assert any(e["event"] == "shutdown_handback_abandoned" for e in logs)
    store.available = True
    # nothing was written: the lease (60 s here) is what brings the order back
    state = await MemoryStore(shared=store).order_state(slow.uuid)
    assert state is not None and state.worker_id == settings.worker_id
    assert SHUTDOWN_NOTE not in [d for _, d in store.snapshot(slow.uuid)]


async def test_an_order_claimed_again_by_its_own_replica_runs_once_at_a_time(
    tmp_path: Path, root: Path
) -> None:
    """Seen in the chaos run: a run lost its order (its lease ran out while the database was
    away; another replica queued it again) and the same replica claimed it again before that
    run ended. Before: both runs imported and both endings were written. Now the old run is
    stopped and writes nothing, the new one starts once it has unwound, and the file is in
    OMERO once."""
    settings = unit_settings(tmp_path, root, lease_seconds=3.0, omero_simulator_import_delay=0.5)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    other = MemoryStore(worker_id="other", lease_seconds=settings.lease_seconds, shared=store)
    with structlog.testing.capture_logs() as logs:
        async with memory_replica(settings, store) as (service, _):
            new = order(make_tiffs(root / "twice", 1))
            await store.submit(new)
            while not any(e["event"] == "order_started" for e in logs):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # the first run is importing now
            store._db[new.uuid].lease_expires_at = store.clock() - 1
            assert dict(await other.recover_expired(max_attempts=3)) == {new.uuid: STAGE_NEW_ORDER}
            service.dispatcher.wake()  # claims it again before its lease loop looks
            assert (await finished(store, new.uuid))[0] == STAGE_IMPORTED
            # every run of the order has ended (the dispatcher's bookkeeping aside: the old
            # run's task is found by its name), so a second ending would be written by now
            runs = [t for t in asyncio.all_tasks() if t.get_name() == f"order-{new.uuid}"]
            await asyncio.wait_for(asyncio.gather(*runs, return_exceptions=True), 10)
            stages = [e.stage for e in await store.order_events(new.uuid)]
    assert stages == [
        STAGE_NEW_ORDER,
        STAGE_IMPORTING,
        STAGE_NEW_ORDER,
        STAGE_IMPORTING,
        STAGE_IMPORTED,
    ]
    objects = simulator_objects(settings.simulator_dir)
    assert [(uuid, count) for uuid, _, count in objects] == [(new.uuid, 1)]
    assert any(e["event"] == "order_claimed_again_while_running" for e in logs)
