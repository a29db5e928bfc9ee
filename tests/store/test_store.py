"""The order store's behaviour, run against both implementations: PostgreSQL and memory.

The in-memory store is what the unit tier builds on; these tests keep it honest.
"""

from __future__ import annotations

import asyncio
import json
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import (
    CANCELLED,
    STAGE_IMPORTED,
    STAGE_IMPORTING,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    NewOrder,
)
from biomero_importer.store import (
    Finish,
    MemoryStore,
    OrderBusy,
    OrderNotFound,
    OrderStore,
    PostgresStore,
)

LEASE = 0.3


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """Two replicas' stores on one database, and how time passes for them."""

    a: OrderStore
    b: OrderStore
    pass_time: Callable[[float], object]
    sql_retry: Callable[[str], object]

    def cap_users(self, cap: int | None) -> None:
        """Set max_running_per_user on both replicas, as the setting does."""
        for store in (self.a, self.b):
            assert isinstance(store, (MemoryStore, PostgresStore))
            store.max_running_per_user = cap


def new_order(files: str = '["/data/a.tif"]', **kw: str) -> NewOrder:
    return NewOrder(
        uuid=kw.get("uuid", str(uuidlib.uuid4())),
        group=kw.get("group", "Demo"),
        user=kw.get("user", "alice"),
        destination_type="Dataset",
        destination_id="1",
        files=files,
    )


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.unit), "postgres"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = FakeClock()
        a = MemoryStore(worker_id="A", lease_seconds=LEASE, clock=clock)
        b = MemoryStore(worker_id="B", lease_seconds=LEASE, clock=clock, shared=a)

        async def advance(seconds: float) -> None:
            clock.now += seconds

        async def memory_retry(uuid: str) -> None:
            a.manual_retry(uuid)

        yield Harness(a, b, advance, memory_retry)
        return
    url = asyncpg_dsn(request.getfixturevalue("migrated_url"))
    pa = PostgresStore(url, worker_id="A", lease_seconds=LEASE, pool_size=2)
    pb = PostgresStore(url, worker_id="B", lease_seconds=LEASE, pool_size=2)
    await pa.open()
    await pb.open()

    async def sql_retry(uuid: str) -> None:
        conn = await asyncpg.connect(url)
        try:  # the documented manual retry
            await conn.execute("UPDATE imports SET stage = 'Import Pending' WHERE uuid = $1", uuid)
        finally:
            await conn.close()

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    try:
        yield Harness(pa, pb, sleep, sql_retry)
    finally:
        await pa.close()
        await pb.close()


async def stages(store: OrderStore, uuid: str) -> list[str]:
    return [e.stage for e in await store.order_events(uuid)]


async def test_an_order_is_claimed_exactly_once(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    claimed = await harness.a.claim(5)
    assert [c.uuid for c in claimed] == [order.uuid]
    assert claimed[0].attempt == 1
    assert await harness.b.claim(5) == []
    assert await stages(harness.a, order.uuid) == [STAGE_NEW_ORDER, STAGE_IMPORTING]


async def test_finish_is_guarded_by_ownership(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    assert not await harness.b.finish(Finish(order.uuid, STAGE_IMPORTED, None))
    assert await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None, ["a.tif"]))
    state = await harness.a.order_state(order.uuid)
    assert state is not None and state.stage == STAGE_IMPORTED and state.worker_id is None


async def test_a_hand_back_costs_no_attempt(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    assert await harness.a.finish(Finish(order.uuid, STAGE_NEW_ORDER, "shut down"))
    again = await harness.b.claim(1)
    assert [c.attempt for c in again] == [1]
    assert [c.runs for c in again] == [2]


async def test_a_duplicate_submission_of_a_running_order_does_not_run_again(
    harness: Harness,
) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    await harness.a.submit(order)
    assert await harness.b.claim(5) == []
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None and detail.summary.stage == STAGE_IMPORTING
    assert "Duplicate submission ignored" in (detail.summary.description or "")


async def test_the_sql_retry_of_a_running_order_is_refused_and_the_run_goes_on(
    harness: Harness,
) -> None:
    """Before: the queue row became 'Import Pending' with the worker still attached; no one
    claimed it and the run's end silently dropped the retry."""
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    await harness.sql_retry(order.uuid)
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None
    assert detail.summary.stage == STAGE_IMPORTING
    assert detail.summary.worker_id == "A"
    assert (detail.summary.description or "").startswith("Retry refused: this order is running")
    assert await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None))
    # once finished, the same retry works
    await harness.sql_retry(order.uuid)
    assert [c.uuid for c in await harness.b.claim(1)] == [order.uuid]


async def test_expired_leases_are_recovered_by_any_replica(harness: Harness) -> None:
    first, last = new_order(), new_order()
    await harness.a.submit(first)
    await harness.a.claim(1)
    await harness.pass_time(LEASE * 2)
    recovered = dict(await harness.b.recover_expired(max_attempts=2))
    assert recovered == {first.uuid: STAGE_NEW_ORDER}
    # the old owner no longer owns it, so its lease is gone too
    assert await harness.a.renew_leases([first.uuid]) == {}
    await harness.b.claim(1)
    await harness.b.submit(last)
    await harness.pass_time(LEASE * 2)
    recovered = dict(await harness.a.recover_expired(max_attempts=2))
    assert recovered == {first.uuid: STAGE_INGEST_FAILED}
    detail = await harness.a.order_detail(first.uuid)
    assert detail is not None
    assert f"biomero-importer retry {first.uuid}" in (detail.summary.description or "")


async def test_a_replica_never_recovers_an_order_it_runs(harness: Harness) -> None:
    """Before: a replica whose renewals were slow took back its own running order and failed
    it ("the importer stopped while this order ran"); fencing is what handles that case."""
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    await harness.pass_time(LEASE * 2)
    assert await harness.a.recover_expired(max_attempts=1) == []
    assert dict(await harness.b.recover_expired(max_attempts=1)) == {
        order.uuid: STAGE_INGEST_FAILED
    }


async def test_renewal_reports_owned_orders_and_cancel_requests(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    leases = await harness.a.renew_leases([order.uuid, "not-an-order"])
    assert set(leases) == {order.uuid}
    assert leases[order.uuid].renewed and not leases[order.uuid].cancel_requested
    result = await harness.b.request_cancel(order.uuid)
    assert not result.cancelled and result.stage == STAGE_IMPORTING
    assert (await harness.a.renew_leases([order.uuid]))[order.uuid].cancel_requested


async def test_a_pending_order_is_cancelled_at_once(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    result = await harness.a.request_cancel(order.uuid)
    assert result.cancelled
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None
    assert (detail.summary.stage, detail.summary.description) == (STAGE_INGEST_FAILED, CANCELLED)
    with pytest.raises(OrderBusy):
        await harness.a.request_cancel(order.uuid)
    with pytest.raises(OrderNotFound):
        await harness.a.request_cancel(str(uuidlib.uuid4()))


async def test_retry_requeues_only_finished_orders(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    with pytest.raises(OrderBusy):
        await harness.a.retry(order.uuid, "again")
    await harness.a.finish(Finish(order.uuid, STAGE_INGEST_FAILED, "bad"))
    assert await harness.a.retry(order.uuid, "again") == STAGE_INGEST_FAILED
    claimed = await harness.b.claim(1)
    assert [(c.uuid, c.attempt) for c in claimed] == [(order.uuid, 1)]
    with pytest.raises(OrderNotFound):
        await harness.a.retry(str(uuidlib.uuid4()), "again")


async def test_text_postgresql_refuses_is_made_safe_before_it_is_written(
    harness: Harness,
) -> None:
    """A file name that is not UTF-8 arrives as surrogate escapes; a NUL can come from any
    writer. Both used to reach the database unchanged and fail the whole write."""
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    bad_name = b"caf\xe9\x00.tif".decode("utf-8", "surrogateescape")
    written = await harness.a.finish(
        Finish(
            order.uuid,
            STAGE_INGEST_FAILED,
            f"Folder links outside the import roots: /data/{bad_name}",
            [bad_name],
            [{"type": "Image", "id": 1, "name": bad_name}],
        )
    )
    assert written
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None
    assert detail.summary.description == (
        "Folder links outside the import roots: /data/caf\\xe9\\0.tif"
    )
    assert json.loads(detail.file_names or "[]") == ["caf\\xe9\\0.tif"]
    assert detail.objects[0]["name"] == "caf\\xe9\\0.tif"


async def test_listing_filters_and_orders_newest_first(harness: Harness) -> None:
    mine, theirs = new_order(user="alice"), new_order(user="bob")
    await harness.a.submit(mine)
    await harness.pass_time(0.01)
    await harness.a.submit(theirs)
    assert [o.uuid for o in await harness.a.list_orders()] == [theirs.uuid, mine.uuid]
    assert [o.uuid for o in await harness.a.list_orders(user="alice")] == [mine.uuid]
    assert await harness.a.list_orders(stage=STAGE_IMPORTED) == []
    stats = await harness.a.queue_stats()
    assert stats is not None and stats[0] == 2


# --- fair scheduling ------------------------------------------------------------------------


async def _queue(harness: Harness, user: str, count: int, group: str = "Demo") -> list[str]:
    orders = [new_order(user=user, group=group) for _ in range(count)]
    for order in orders:
        await harness.a.submit(order)
        if isinstance(harness.a, MemoryStore):
            # distinct queue times on the fixed test clock, as PostgreSQL's now() gives them
            await harness.pass_time(0.001)
    return [order.uuid for order in orders]


async def test_one_users_backlog_does_not_hold_back_another_user(harness: Harness) -> None:
    """Issue 15 acceptance: A queues 200, then B queues 1; B starts before A's 10th next."""
    a_orders = await _queue(harness, "alice", 200)
    (b_order,) = await _queue(harness, "bob", 1)
    started: list[str] = []
    while b_order not in started:
        claimed = await harness.a.claim(1)
        assert claimed, "the queue ran dry before bob's order started"
        started += [c.uuid for c in claimed]
    alice_before_bob = started.index(b_order)
    assert alice_before_bob < 10, alice_before_bob
    # within one user the queue stays first in, first out
    assert started[:alice_before_bob] == a_orders[:alice_before_bob]
    # (the orders of one claim start together: their order in the answer means nothing)
    rest = {c.uuid for c in await harness.b.claim(5)}
    assert rest == set(a_orders[alice_before_bob : alice_before_bob + 5])


async def test_the_user_with_fewest_running_orders_goes_first(harness: Harness) -> None:
    await _queue(harness, "alice", 2)
    await _queue(harness, "bob", 1)
    assert len(await harness.a.claim(3)) == 3  # alice runs 2, bob 1
    alice, bob, carol = (
        await _queue(harness, "alice", 2),
        await _queue(harness, "bob", 2),
        await _queue(harness, "carol", 2),
    )
    # one slot at a time: carol (0 running), bob (1), then alice and bob (2 each: older first)
    order = [(await harness.b.claim(1))[0].uuid for _ in range(4)]
    assert order == [carol[0], bob[0], carol[1], alice[0]]
    # several slots at once make the same choices as one at a time
    assert {c.uuid for c in await harness.a.claim(2)} == {bob[1], alice[1]}


async def test_then_the_group_with_fewest_running_orders(harness: Harness) -> None:
    await _queue(harness, "dave", 1, group="Lab-1")
    assert len(await harness.a.claim(1)) == 1  # Lab-1 runs one order (dave's)
    (alice,) = await _queue(harness, "alice", 1, group="Lab-1")
    (bob,) = await _queue(harness, "bob", 1, group="Lab-2")
    # alice and bob run nothing; bob's group runs less than alice's, though alice is older
    assert [c.uuid for c in await harness.b.claim(1)] == [bob]
    assert [c.uuid for c in await harness.b.claim(1)] == [alice]


async def test_max_running_per_user_holds_across_replicas(harness: Harness) -> None:
    harness.cap_users(2)
    alice = await _queue(harness, "alice", 5)
    assert [c.uuid for c in await harness.a.claim(5)] == alice[:2]
    assert await harness.b.claim(5) == []
    (bob,) = await _queue(harness, "bob", 1)
    assert [c.uuid for c in await harness.b.claim(5)] == [bob]
    # one of alice's ends: exactly one more of hers may start, on either replica
    assert await harness.a.finish(Finish(alice[0], STAGE_IMPORTED, None))
    assert [c.uuid for c in await harness.b.claim(5)] == [alice[2]]
    assert await harness.a.claim(5) == []
    harness.cap_users(None)
    assert {c.uuid for c in await harness.a.claim(5)} == set(alice[3:])


async def test_max_running_per_user_holds_when_replicas_claim_at_once(harness: Harness) -> None:
    """Six claims at once, round after round: never more than the cap between them."""
    harness.cap_users(2)
    await _queue(harness, "alice", 40)
    for _ in range(5):
        claims = await asyncio.gather(*(store.claim(10) for store in (harness.a, harness.b) * 3))
        assert sum(len(claimed) for claimed in claims) <= 2
    assert len(await harness.a.list_orders(stage=STAGE_IMPORTING, limit=100)) == 2


# --- waits: not_before, retries, settle ----------------------------------------------------
WAIT = 0.6


async def test_a_waiting_order_is_not_claimed_before_its_time(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    waiting = Finish(order.uuid, STAGE_NEW_ORDER, "Waiting for files", delay=WAIT, settling=True)
    assert await harness.a.finish(waiting)
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None and detail.not_before is not None
    assert detail.waiting_since is not None and detail.retries == 0
    # neither replica takes it early, and a later order is not held up behind it
    other = new_order(user="bob")
    await harness.a.submit(other)
    assert [c.uuid for c in await harness.b.claim(5)] == [other.uuid]
    assert await harness.a.claim(5) == []
    await harness.pass_time(WAIT + 0.2)
    [again] = await harness.b.claim(5)
    assert again.uuid == order.uuid
    # the wait used no attempt; the first settle wait is remembered
    assert (again.attempt, again.runs, again.retries) == (1, 2, 0)
    assert again.waiting_since is not None and again.not_before is not None


async def test_transient_retries_count_and_keep_the_first_settle_time(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    await harness.a.finish(Finish(order.uuid, STAGE_NEW_ORDER, "settling", delay=0, settling=True))
    first = await harness.a.order_detail(order.uuid)
    assert first is not None and first.waiting_since is not None
    for n in (1, 2):
        [claimed] = await harness.a.claim(1)
        assert claimed.retries == n - 1
        retry = Finish(order.uuid, STAGE_NEW_ORDER, "OMERO down", delay=0, transient_retry=True)
        assert await harness.a.finish(retry)
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None
    assert (detail.retries, detail.attempts) == (2, 0)
    assert detail.waiting_since == first.waiting_since
    # a hand-back that is no wait (shutdown) leaves no time to wait for
    [claimed] = await harness.a.claim(1)
    assert claimed.retries == 2
    assert await harness.a.finish(Finish(order.uuid, STAGE_NEW_ORDER, "shutdown"))
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None and detail.not_before is None and detail.retries == 2


@pytest.mark.parametrize("terminal", [STAGE_IMPORTED, STAGE_INGEST_FAILED])
async def test_an_order_that_ends_forgets_its_waits(harness: Harness, terminal: str) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    retry = Finish(order.uuid, STAGE_NEW_ORDER, "x", delay=0, transient_retry=True, settling=True)
    await harness.a.finish(retry)
    await harness.a.claim(1)
    assert await harness.a.finish(Finish(order.uuid, terminal, "done"))
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None
    assert (detail.not_before, detail.waiting_since, detail.retries) == (None, None, 0)
    # a manual retry then starts afresh
    await harness.a.retry(order.uuid, "again")
    [claimed] = await harness.a.claim(1)
    assert (claimed.retries, claimed.waiting_since, claimed.attempt) == (0, None, 1)
