"""Waits end when their cause ends (issue 20 item 4), in the unit tier: the real dispatcher,
pipeline, probes and simulator around the in-memory store."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from biomero_importer.model import STAGE_IMPORTED, STAGE_IMPORTING, STAGE_NEW_ORDER
from biomero_importer.omero.simulator import OFFLINE_FILE
from biomero_importer.service import Service
from biomero_importer.store import MemoryStore
from tests.omero.test_zarr import make_series_v2
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def sample(service: Service, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(f"biomero_importer_{name}", labels)
    return value or 0.0


async def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_an_outage_costs_failed_attempts_per_slot_not_per_order_and_ends_at_once(
    tmp_path: Path, root: Path
) -> None:
    """30 orders meet OMERO down with a 10 min backoff each. Only the orders already running
    when it went down are tried; the rest are held without a try. When OMERO answers, every
    one is due at once: all complete within seconds, not after their 10 minutes."""
    files = make_tiffs(root / "run", 30)
    settings = unit_settings(
        tmp_path,
        root,
        max_workers=2,
        poll_interval=60.0,
        transient_backoff=600.0,
        transient_backoff_max=600.0,
        dependency_probe_backoff=0.05,
        dependency_probe_backoff_max=0.1,
    )
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    offline = settings.simulator_dir / OFFLINE_FILE
    orders = [order([f], user=f"user{n}") for n, f in enumerate(files)]
    async with memory_replica(settings, store) as (service, _):
        offline.touch()
        for placed in orders:
            await store.submit(placed)

        async def all_waiting() -> bool:
            for placed in orders:
                detail = await store.order_detail(placed.uuid)
                if detail is None or detail.summary.stage != STAGE_NEW_ORDER:
                    return False
                if detail.not_before is None:
                    return False
            return True

        await wait_for(all_waiting)
        waiting = await store.order_detail(orders[-1].uuid)
        # a held order's wait reads as any retry's: its cause, its latest retry, its count
        assert waiting is not None and (waiting.summary.description or "").startswith(
            "OMERO unavailable; retrying in "
        )
        waits = sample(service, "order_waits_total", reason="omero")
        held = sample(service, "orders_held_total", cause="omero")
        failed_attempts = waits - held
        assert waits == 30
        assert failed_attempts <= 2 * settings.max_workers, (waits, held)
        assert service.health.dependencies_down["omero"]["reason"]
        await asyncio.sleep(0.2)  # still down: the probe backs off, nothing else is tried
        assert sample(service, "orders_held_total", cause="omero") == held
        offline.unlink()
        back = time.monotonic()
        results = [await finished(store, placed.uuid, timeout=20) for placed in orders]
        took = time.monotonic() - back
        probes_down = sample(service, "dependency_probes_total", cause="omero", result="down")
    assert results == [(STAGE_IMPORTED, None)] * 30
    assert took < 10.0
    assert 3 <= probes_down <= 40
    assert service.health.dependencies_down == {}


async def test_a_failure_the_probe_cannot_see_waits_its_own_backoff(
    tmp_path: Path, root: Path
) -> None:
    """The connection is lost once in the middle of an import while OMERO itself is fine: the
    probe answers, nobody is woken, and the order comes back after its own backoff."""
    series = make_series_v2(root / "series.zarr", 3)
    settings = unit_settings(
        tmp_path,
        root,
        poll_interval=60.0,
        use_register_zarr=True,
        transient_backoff=0.5,
        omero_simulator_connection_lost_after=1,
        dependency_probe_backoff=0.05,
    )
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    placed = order([series])
    async with memory_replica(settings, store) as (service, _):
        await store.submit(placed)
        assert await finished(store, placed.uuid) == (STAGE_IMPORTED, None)
        events = await store.order_events(placed.uuid)
        probes_up = sample(service, "dependency_probes_total", cause="omero", result="up")
    starts = [e.timestamp for e in events if e.stage == STAGE_IMPORTING]
    assert len(starts) == 2 and starts[0] is not None and starts[1] is not None
    assert (starts[1] - starts[0]).total_seconds() >= 0.38  # its backoff (0.5 s, -20 % jitter)
    assert probes_up == 1
