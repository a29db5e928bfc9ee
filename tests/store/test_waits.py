"""Waiting orders (issue 20): tied to a cause, woken when it is back, retried and cancelled
now, never losing their place; and the wake-ups they cause. Both stores, as test_store."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from biomero_importer.db.sql import DEFAULT_CHANNEL
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import (
    CANCELLED,
    STAGE_IMPORTED,
    STAGE_IMPORTING,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    TransientKind,
)
from biomero_importer.store import Finish, MemoryStore, OrderBusy, PostgresStore

from .test_store import Harness, harness, new_order, stages

__all__ = ["harness"]

HOUR = 3600.0


async def _queue(h: Harness, user: str, n: int) -> list[str]:
    uuids = []
    for _ in range(n):
        order = new_order(user=user)
        await h.a.submit(order)
        if isinstance(h.a, MemoryStore):
            await h.pass_time(0.001)
        uuids.append(order.uuid)
    return uuids


async def _wait(h: Harness, uuid: str, cause: TransientKind | None, delay: float = HOUR) -> None:
    [claimed] = await h.a.claim(1)
    assert claimed.uuid == uuid
    wait = Finish(uuid, STAGE_NEW_ORDER, "waits", delay=delay, wait_cause=cause, run=claimed.runs)
    assert await h.a.finish(wait)


async def test_wake_waiting_makes_the_orders_of_that_cause_due_in_their_places(
    harness: Harness,
) -> None:
    (storage,) = await _queue(harness, "bob", 1)
    first, second, third = await _queue(harness, "alice", 3)
    await _wait(harness, storage, "storage")
    await _wait(harness, first, "omero")
    await _wait(harness, second, "omero")
    detail = await harness.a.order_detail(first)
    assert detail is not None and detail.waiting and detail.wait_cause == "omero"
    # only third is ready
    [ready] = await harness.b.claim(5)
    assert ready.uuid == third
    assert await harness.b.finish(Finish(third, STAGE_IMPORTED, None, run=ready.runs))
    assert await harness.a.wake_waiting("container_runtime") == 0
    assert await harness.a.wake_waiting("omero") == 2
    detail = await harness.a.order_detail(first)
    assert detail is not None and not detail.waiting and detail.wait_cause is None
    # one at a time: FIFO within alice, first before second; storage keeps waiting
    assert [c.uuid for c in await harness.b.claim(1)] == [first]
    assert [c.uuid for c in await harness.b.claim(5)] == [second]
    assert await harness.a.wake_waiting("omero") == 0
    assert await harness.a.wake_waiting("storage") == 1
    [claimed] = await harness.b.claim(5)
    assert claimed.uuid == storage and claimed.attempt == 1 and claimed.runs == 2


async def test_a_hand_back_keeps_the_orders_place(harness: Harness) -> None:
    """Before: every hand-back reset queued_at, and the order went behind its user's FIFO."""
    first, second = await _queue(harness, "alice", 2)
    [claimed] = await harness.a.claim(1)
    assert claimed.uuid == first
    before = await harness.a.order_detail(first)
    await harness.pass_time(0.05)
    assert await harness.a.finish(Finish(first, STAGE_NEW_ORDER, "shutdown", run=claimed.runs))
    [again] = await harness.b.claim(1)
    assert again.uuid == first
    after = await harness.a.order_detail(first)
    assert before is not None and after is not None and after.queued_at == before.queued_at
    # a due wait keeps it too
    settling = Finish(first, STAGE_NEW_ORDER, "settling", delay=0, run=again.runs)
    assert await harness.b.finish(settling)
    assert [c.uuid for c in await harness.a.claim(1)] == [first]
    assert [c.uuid for c in await harness.a.claim(1)] == [second]


async def test_a_waiting_order_is_retried_at_once_with_one_row_saying_so(
    harness: Harness,
) -> None:
    """Before: retry refused a waiting order (OrderBusy) and it slept out its backoff."""
    (order,) = await _queue(harness, "alice", 1)
    await _wait(harness, order, "omero")
    rows_before = len(await harness.a.order_events(order))
    assert await harness.a.retry(order, "retried by hand") == STAGE_NEW_ORDER
    events = await harness.a.order_events(order)
    assert len(events) == rows_before + 1
    assert (events[-1].stage, events[-1].description) == (STAGE_NEW_ORDER, "retried by hand")
    [claimed] = await harness.b.claim(1)
    assert claimed.uuid == order and claimed.attempt == 1
    # a ready or running order is not a retry's business
    with pytest.raises(OrderBusy):
        await harness.a.retry(order, "again")


async def test_the_sql_retry_of_a_waiting_order_makes_it_due(harness: Harness) -> None:
    """Before: the documented SQL retry only rewrote the history; the order stayed deferred."""
    first, second = await _queue(harness, "alice", 2)
    await _wait(harness, first, "storage")
    await harness.sql_retry(first)
    events = await harness.a.order_events(first)
    assert [e.stage for e in events] == [STAGE_NEW_ORDER] * len(events)
    assert [e.description for e in events].count("Retried: no longer waiting, due now") == 1
    # it kept its place: before second
    assert [c.uuid for c in await harness.b.claim(1)] == [first]
    assert [c.uuid for c in await harness.b.claim(1)] == [second]


async def test_the_sql_retry_of_a_pending_order_changes_nothing(harness: Harness) -> None:
    """Twin difference: MemoryStore.manual_retry reset queued_at and cleared the cancel
    request of a pending order; PostgreSQL's trigger does neither."""
    first, _later = await _queue(harness, "alice", 2)
    before = await harness.a.order_detail(first)
    await harness.pass_time(0.05)
    await harness.sql_retry(first)
    after = await harness.a.order_detail(first)
    assert before is not None and after is not None
    assert after.queued_at == before.queued_at and after.latest_id == before.latest_id
    assert [c.uuid for c in await harness.a.claim(1)] == [first]


async def test_a_waiting_order_is_cancelled_now(harness: Harness) -> None:
    (order,) = await _queue(harness, "alice", 1)
    await _wait(harness, order, "omero")
    result = await harness.a.request_cancel(order)
    assert result.cancelled and result.stage == STAGE_NEW_ORDER
    detail = await harness.a.order_detail(order)
    assert detail is not None
    assert (detail.summary.stage, detail.summary.description) == (STAGE_INGEST_FAILED, CANCELLED)
    assert not detail.waiting and detail.wait_cause is None
    assert await harness.a.wake_waiting("omero") == 0


async def test_a_recovered_order_keeps_its_place(harness: Harness) -> None:
    """Twin difference: MemoryStore.recover_expired reset queued_at."""
    first, _later = await _queue(harness, "alice", 2)
    await harness.a.claim(1)
    await harness.pass_time(0.7)
    assert dict(await harness.b.recover_expired(max_attempts=3)) == {first: STAGE_NEW_ORDER}
    assert [c.uuid for c in await harness.b.claim(1)] == [first]
    assert await stages(harness.b, first) == [
        STAGE_NEW_ORDER,
        STAGE_IMPORTING,
        STAGE_NEW_ORDER,
        STAGE_IMPORTING,
    ]


async def _request_cancels_by_sql(h: Harness, uuids: list[str]) -> None:
    """Cancel requests a SQL client writes itself, which only the sweep ends."""
    if isinstance(h.a, MemoryStore):
        for uuid in uuids:
            h.a._db[uuid].cancel_requested = True
        return
    assert isinstance(h.a, PostgresStore)
    await h.a.pool.execute(
        "UPDATE importer_orders SET cancel_requested = true WHERE uuid = ANY($1::text[])", uuids
    )


async def test_the_cancel_sweep_reports_exactly_what_it_cancelled(harness: Harness) -> None:
    """Twin difference: MemoryStore.cancel_pending cancelled every match but reported 100."""
    uuids = await _queue(harness, "alice", 130)
    await _request_cancels_by_sql(harness, uuids)
    first = await harness.a.cancel_pending()
    assert sorted(first) == sorted(uuids[:100])  # the oldest first
    pending = await harness.a.list_orders(stage=STAGE_NEW_ORDER, limit=200)
    assert {o.uuid for o in pending} == set(uuids[100:])
    assert sorted(await harness.a.cancel_pending()) == sorted(uuids[100:])


# --- wake-ups: PostgreSQL only (the memory store has no NOTIFY) -----------------------------


class Listener:
    def __init__(self) -> None:
        self.payloads: list[str] = []

    def __call__(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.append(payload)

    async def settle(self) -> list[str]:
        await asyncio.sleep(0.2)
        payloads, self.payloads = self.payloads, []
        return payloads


@pytest.mark.reliability
async def test_a_wait_wakes_nobody_and_whoever_makes_it_due_does(migrated_url: str) -> None:
    url = asyncpg_dsn(migrated_url)
    store = PostgresStore(url, worker_id="A", lease_seconds=30, pool_size=2)
    await store.open()
    listen = await asyncpg.connect(url)
    heard = Listener()
    await listen.add_listener(DEFAULT_CHANNEL, heard)
    try:
        waiting = [new_order() for _ in range(3)]
        for order in waiting:
            await store.submit(order)
        assert len(await heard.settle()) == 3  # a new order wakes the claimers
        claimed = await store.claim(3)
        assert await heard.settle() == []
        for c in claimed:
            assert await store.finish(
                Finish(
                    c.uuid,
                    STAGE_NEW_ORDER,
                    "OMERO down",
                    delay=HOUR,
                    wait_cause="omero",
                    run=c.runs,
                )
            )
        assert await heard.settle() == []  # before: one NOTIFY per wait, to every replica
        assert await store.wake_waiting("omero") == 3
        assert await heard.settle() == ["due"]  # one wake-up for all of them
        claimed = await store.claim(3)
        assert len(claimed) == 3
        # a due wait is promoted by the claim, which wakes the others
        for c in claimed:
            assert await store.finish(
                Finish(c.uuid, STAGE_NEW_ORDER, "settle", delay=0, run=c.runs)
            )
        assert await heard.settle() == []
        [running] = await store.claim(1)
        assert await heard.settle() == ["due"]
        # a hand-back that is no wait (shutdown) is ready at once: it wakes them
        assert await store.finish(
            Finish(running.uuid, STAGE_NEW_ORDER, "shutdown", run=running.runs)
        )
        assert await heard.settle() == [running.uuid]
    finally:
        await listen.close()
        await store.close()
