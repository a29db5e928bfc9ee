"""Claims under a backlog take freed slots in batches, not one claim per freed slot (issue 22).

Measured before (pg_stat_statements, ``benchmarks/dispatch.py --backend simulator``, 64 slots,
a backlog of 5,000 orders): 2,234 claims of 2.2 orders each, 3.2 ms of PostgreSQL's time per
claim whatever its size. Simulator imports end one at a time, and every freed slot woke a
claim of its own. (With the null port, whose orders end in bursts, claims took 17 each.)
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

import pytest

from biomero_importer.dispatcher import dispatcher
from biomero_importer.model import ClaimedOrder
from biomero_importer.store import Finish, MemoryStore
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit

SLOTS = 32
ORDERS = 200
ROUND_TRIP = 0.002  # a claim's time on PostgreSQL, as measured above


class PacedStore(MemoryStore):
    """The memory store with a claim's round trip, and orders that end one at a time (their
    finishes spread over 0-100 ms, as orders of real, uneven work do); records each claim."""

    def __init__(self, *, worker_id: str, lease_seconds: float) -> None:
        super().__init__(worker_id=worker_id, lease_seconds=lease_seconds)
        self.claims: list[tuple[int, int]] = []
        self.claimed_at: list[float] = []
        self.finish_spread = 0.1
        self._rng = random.Random(22)

    async def claim(self, slots: int) -> list[ClaimedOrder]:
        await asyncio.sleep(ROUND_TRIP)
        orders = await super().claim(slots)
        self.claims.append((slots, len(orders)))
        self.claimed_at.extend(time.monotonic() for _ in orders)
        return orders

    async def finish(self, item: Finish) -> bool:
        await asyncio.sleep(self._rng.uniform(0, self.finish_spread))
        return await super().finish(item)


async def test_a_backlog_is_claimed_in_batches(tmp_path: Path, root: Path) -> None:
    (image,) = make_tiffs(root / "run", 1)
    settings = unit_settings(tmp_path, root, omero_backend="null", max_workers=SLOTS)
    store = PacedStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    async with memory_replica(settings, store):
        orders = [order([image]) for _ in range(ORDERS)]
        for new in orders:
            await store.submit(new)
        for new in orders:
            assert (await finished(store, new.uuid, timeout=30))[0] == "Import Completed"
    sizes = [got for _, got in store.claims if got]
    # every order claimed once, and no claim took more than it had slots for
    assert sum(sizes) == ORDERS
    assert all(got <= asked <= SLOTS for asked, got in store.claims)
    # after the first claim (every slot) and before the last (what is left), several slots
    # a claim (2.1 on average here when every freed slot woke a claim of its own)
    assert statistics.fmean(sizes[1:-1]) >= 3, sizes


async def test_a_new_order_with_slots_free_is_claimed_at_once(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batching never holds back an order that arrives while slots are free, even right
    after a backlog."""
    # a long window, so that a claim held for it would show whatever the machine's load
    monkeypatch.setattr(dispatcher, "CLAIM_GATHER_SECONDS", 1.0)
    (image,) = make_tiffs(root / "run", 1)
    settings = unit_settings(tmp_path, root, omero_backend="null", max_workers=SLOTS)
    store = PacedStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    store.finish_spread = 0.0
    async with memory_replica(settings, store) as (service, _):
        backlog = [order([image]) for _ in range(3 * SLOTS)]
        for new in backlog:
            await store.submit(new)
        for new in backlog:
            await finished(store, new.uuid)
        for _ in range(20):
            new = order([image])
            submitted = time.monotonic()
            await store.submit(new)
            service.dispatcher.wake()
            await finished(store, new.uuid)
            # the claim's own round trip and a few loop turns, not the window
            assert store.claimed_at[-1] - submitted < 0.5
            await asyncio.sleep(0.01)
