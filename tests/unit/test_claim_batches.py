"""While orders wait for a slot, a claim takes a batch of them, not one per order that ends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from biomero_importer.model import STAGE_IMPORTED, ClaimedOrder
from biomero_importer.store import MemoryStore
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit


async def test_a_backlog_is_claimed_in_batches_and_a_lone_order_at_once(
    tmp_path: Path, root: Path
) -> None:
    settings = unit_settings(tmp_path, root, max_workers=16)
    store = MemoryStore(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    taken: list[int] = []
    real_claim = store.claim

    async def counted(slots: int) -> list[ClaimedOrder]:
        claimed = await real_claim(slots)
        if claimed:
            taken.append(len(claimed))
        return claimed

    store.claim = counted  # type: ignore[method-assign]
    files = make_tiffs(root / "backlog", 64)
    async with memory_replica(settings, store):
        orders = [order([f]) for f in files]
        for new in orders:
            await store.submit(new)
        for new in orders:
            assert (await finished(store, new.uuid))[0] == STAGE_IMPORTED
        backlog_claims = len(taken)
        # with nothing waiting, a new order is claimed by itself, without waiting for others
        await asyncio.sleep(0.1)
        lone = order(make_tiffs(root / "lone", 1))
        await store.submit(lone)
        assert (await finished(store, lone.uuid))[0] == STAGE_IMPORTED
    assert sum(taken) == 65
    assert taken[backlog_claims:] == [1]
    # after the first claim (all 16 slots), each waited for an eighth of the slots to come
    # free: 26 claims for the 64 orders here; before, one for about every order that ended (39)
    assert backlog_claims <= 64 / 2, taken
