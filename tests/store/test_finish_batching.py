"""Endings that arrive one at a time under load share a transaction (issue 22).

Measured before (pg_stat_statements, ``benchmarks/dispatch.py --backend simulator``, a backlog
of 5,000 orders): simulator imports end one by one, and the batched finish writer, which wrote
whatever was waiting the moment it was free, wrote them in 2,553 statements of 2.0 orders each;
with the claims, 0.97 PostgreSQL transactions per order.
"""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib

import pytest

from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import STAGE_IMPORTED, NewOrder
from biomero_importer.store import Finish, PostgresStore
from biomero_importer.store.postgres import FINISH_PACE_SECONDS

ORDERS = 60
SPACING = 0.001  # one ending a millisecond: a replica draining a backlog


def _order() -> NewOrder:
    return NewOrder(
        uuid=str(uuidlib.uuid4()),
        group="Demo",
        user="alice",
        destination_type="Dataset",
        destination_id="1",
        files='["/data/a.tif"]',
    )


@pytest.mark.reliability
async def test_endings_one_at_a_time_are_written_in_batches(migrated_url: str) -> None:
    store = PostgresStore(asyncpg_dsn(migrated_url), worker_id="A", lease_seconds=60, pool_size=2)
    await store.open()
    writes: list[int] = []
    write = store._write_finishes

    async def counted(items: list[Finish]) -> set[tuple[str, int]]:
        writes.append(len(items))
        return await write(items)

    store._write_finishes = counted  # type: ignore[method-assign]
    server = asyncio.create_task(store.serve())
    try:
        for _ in range(ORDERS):
            await store.submit(_order())
        claimed = await store.claim(ORDERS)
        assert len(claimed) == ORDERS
        endings = []
        for order in claimed:
            finish = Finish(order.uuid, STAGE_IMPORTED, None, run=order.runs)
            endings.append(asyncio.create_task(store.finish(finish)))
            await asyncio.sleep(SPACING)
        assert all(await asyncio.gather(*endings))
        # and an ending after a quiet spell is written at once, not held for a batch
        await asyncio.sleep(2 * FINISH_PACE_SECONDS)
        await store.submit(_order())
        [last] = await store.claim(1)
        started = time.monotonic()
        assert await store.finish(Finish(last.uuid, STAGE_IMPORTED, None, run=last.runs))
        assert time.monotonic() - started < FINISH_PACE_SECONDS
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        await store.close()
    assert sum(writes) == ORDERS + 1
    # one write a millisecond when each ending was written the moment the writer was free
    assert len(writes) - 1 <= ORDERS / 3, writes
