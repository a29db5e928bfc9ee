"""Endings that arrive one at a time under load share a transaction (issue 22).

Measured before (pg_stat_statements, ``benchmarks/dispatch.py --backend simulator``, a backlog
of 5,000 orders): simulator imports end one by one, and the batched finish writer, which wrote
whatever was waiting the moment it was free, wrote them in 2,553 statements of 2.0 orders each;
with the claims, 0.97 PostgreSQL transactions per order.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import STAGE_IMPORTED
from biomero_importer.store import Finish, PostgresStore, postgres
from biomero_importer.store.postgres import FINISH_PACE_SECONDS
from tests.store.test_store import new_order

ORDERS = 60
SPACING = 0.001  # one ending a millisecond: a replica draining a backlog


async def _serving(migrated_url: str) -> tuple[PostgresStore, list[int], asyncio.Task[None]]:
    """A store with its finish writer running, recording the size of each write."""
    store = PostgresStore(asyncpg_dsn(migrated_url), worker_id="A", lease_seconds=60, pool_size=2)
    await store.open()
    writes: list[int] = []
    write = store._write_finishes

    async def counted(items: list[Finish]) -> set[tuple[str, int]]:
        writes.append(len(items))
        return await write(items)

    store._write_finishes = counted  # type: ignore[method-assign]
    return store, writes, asyncio.create_task(store.serve())


async def _stop(store: PostgresStore, server: asyncio.Task[None]) -> None:
    server.cancel()
    await asyncio.gather(server, return_exceptions=True)
    await store.close()


@pytest.mark.reliability
async def test_endings_one_at_a_time_are_written_in_batches(migrated_url: str) -> None:
    store, writes, server = await _serving(migrated_url)
    try:
        for _ in range(ORDERS):
            await store.submit(new_order())
        claimed = await store.claim(ORDERS)
        assert len(claimed) == ORDERS
        endings = []
        started = time.monotonic()
        for order in claimed:
            finish = Finish(order.uuid, STAGE_IMPORTED, None, run=order.runs)
            endings.append(asyncio.create_task(store.finish(finish)))
            await asyncio.sleep(SPACING)
        assert all(await asyncio.gather(*endings))
        elapsed = time.monotonic() - started
    finally:
        await _stop(store, server)
    assert sum(writes) == ORDERS
    # one write per pace at most (before: one whenever the writer was free, 39-47 writes
    # for the 60 endings in 0.09 s, where this allows 10)
    assert len(writes) <= elapsed / FINISH_PACE_SECONDS + 1, (len(writes), elapsed)


@pytest.mark.reliability
async def test_an_ending_after_a_quiet_spell_is_written_at_once(
    migrated_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a long pace, so that an ending held for it would show whatever the machine's load
    monkeypatch.setattr(postgres, "FINISH_PACE_SECONDS", 0.5)
    store, writes, server = await _serving(migrated_url)
    try:
        for _ in range(2):
            await store.submit(new_order())
        first, second = await store.claim(2)
        assert await store.finish(Finish(first.uuid, STAGE_IMPORTED, None, run=first.runs))
        await asyncio.sleep(0.6)
        started = time.monotonic()
        assert await store.finish(Finish(second.uuid, STAGE_IMPORTED, None, run=second.runs))
        assert time.monotonic() - started < 0.25
    finally:
        await _stop(store, server)
    assert writes == [1, 1]
