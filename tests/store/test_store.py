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
import structlog

from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.model import (
    CANCELLED,
    STAGE_IMPORTED,
    STAGE_IMPORTING,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    STAGE_PREPROCESSING,
    NewOrder,
    Progress,
)
from biomero_importer.store import (
    Delivery,
    DeliveryResult,
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
    assert not await harness.b.finish(Finish(order.uuid, STAGE_IMPORTED, None, run=1))
    assert await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None, ["a.tif"], run=1))
    state = await harness.a.order_state(order.uuid)
    assert state is not None and state.stage == STAGE_IMPORTED and state.worker_id is None


async def test_a_hand_back_costs_no_attempt(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    assert await harness.a.finish(Finish(order.uuid, STAGE_NEW_ORDER, "shut down", run=1))
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
    assert await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None, run=1))
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
    await harness.a.finish(Finish(order.uuid, STAGE_INGEST_FAILED, "bad", run=1))
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
            run=1,
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


# --- progress of running orders -------------------------------------------------------------


async def _progress(store: OrderStore, uuid: str) -> tuple[Progress | None, Progress | None]:
    """The order's progress as ``status`` and as ``show`` read it."""
    (summary,) = [o for o in await store.list_orders() if o.uuid == uuid]
    detail = await store.order_detail(uuid)
    assert detail is not None
    return summary.progress, detail.progress


async def test_progress_is_recorded_by_the_owner_only(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    step = Progress("import", 12, 50, "image12.tif", 1200, 5000)
    assert not await harness.a.record_progress(order.uuid, step, run=1)  # pending: nobody runs it
    await harness.a.claim(1)
    assert not await harness.b.record_progress(order.uuid, step, run=1)
    assert await _progress(harness.a, order.uuid) == (None, None)
    assert await harness.a.record_progress(order.uuid, step, run=1)
    status, show = await _progress(harness.b, order.uuid)
    assert status is not None and show == status
    assert (status.step, status.units_done, status.units_total) == ("import", 12, 50)
    assert (status.current_file, status.bytes_done, status.bytes_total) == (
        "image12.tif",
        1200,
        5000,
    )
    assert status.recorded_at is not None
    # a newer record replaces it, in the preprocessing stage as well
    assert await harness.a.append_stage(order.uuid, STAGE_PREPROCESSING, run=1)
    assert await harness.a.record_progress(order.uuid, Progress("preprocess"), run=1)
    status, _ = await _progress(harness.a, order.uuid)
    assert status == Progress("preprocess", recorded_at=status.recorded_at)


async def test_progress_is_cleared_when_the_order_finishes(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    assert await harness.a.record_progress(order.uuid, Progress("annotate", 3, 4), run=1)
    assert await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None, run=1))
    assert await _progress(harness.a, order.uuid) == (None, None)
    # a write that arrives after the end changes nothing
    assert not await harness.a.record_progress(order.uuid, Progress("annotate", 4, 4), run=1)
    assert await _progress(harness.a, order.uuid) == (None, None)


async def test_progress_is_cleared_when_the_order_is_handed_back(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    assert await harness.a.record_progress(order.uuid, Progress("import", 1, 2, "a.tif"), run=1)
    assert await harness.a.finish(Finish(order.uuid, STAGE_NEW_ORDER, "shut down", run=1))
    assert await _progress(harness.a, order.uuid) == (None, None)
    # the next run starts without the last run's progress
    assert [c.uuid for c in await harness.b.claim(1)] == [order.uuid]
    assert await _progress(harness.b, order.uuid) == (None, None)


async def test_progress_of_a_recovered_order_is_cleared(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    assert await harness.a.record_progress(order.uuid, Progress("import", 1, 2), run=1)
    await harness.pass_time(LEASE * 2)
    assert dict(await harness.b.recover_expired(max_attempts=2)) == {order.uuid: STAGE_NEW_ORDER}
    assert await _progress(harness.a, order.uuid) == (None, None)


async def test_progress_text_is_made_safe(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    bad_name = b"caf\xe9\x00.tif".decode("utf-8", "surrogateescape")
    assert await harness.a.record_progress(order.uuid, Progress("import", 0, 1, bad_name), run=1)
    status, _ = await _progress(harness.a, order.uuid)
    assert status is not None and status.current_file == "caf\\xe9\\0.tif"


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
    assert await harness.a.finish(Finish(alice[0], STAGE_IMPORTED, None, run=1))
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


# --- the notification outbox ---------------------------------------------------------------


async def outcome_ids(store: OrderStore, uuid: str) -> list[int]:
    """History ids of the order's terminal rows, in order."""
    return [
        e.id
        for e in await store.order_events(uuid)
        if e.stage in (STAGE_IMPORTED, STAGE_INGEST_FAILED)
    ]


async def claim_all(store: OrderStore, channel: str = "webhook") -> list[Delivery]:
    return await store.claim_deliveries(channel, 10, 60)


async def test_every_outcome_queues_one_notification_whoever_ends_the_order(
    harness: Harness,
) -> None:
    """The finish writer, lease recovery and cancel all end orders: each outcome is queued
    once, with its own terminal row as key; hand-backs and duplicate submissions queue none."""
    await harness.a.record_channels(["webhook"], {})
    done, recovered, cancelled, handed = new_order(), new_order(), new_order(), new_order()
    for order in (done, recovered, cancelled, handed):
        await harness.a.submit(order)
    await harness.a.request_cancel(cancelled.uuid)
    await harness.a.claim(3)
    assert await harness.a.finish(Finish(handed.uuid, STAGE_NEW_ORDER, "shutting down", run=1))
    assert await harness.a.finish(Finish(done.uuid, STAGE_IMPORTED, "Imported", run=1))
    await harness.a.submit(done)  # a duplicate of a finished order
    await harness.pass_time(LEASE * 2)
    assert dict(await harness.b.recover_expired(max_attempts=1)) == {
        recovered.uuid: STAGE_INGEST_FAILED
    }
    claimed = await claim_all(harness.b)
    got = {(d.note.uuid, d.note.event_id, d.note.stage) for d in claimed}
    expected = {
        (done.uuid, (await outcome_ids(harness.a, done.uuid))[0], STAGE_IMPORTED),
        (recovered.uuid, (await outcome_ids(harness.a, recovered.uuid))[0], STAGE_INGEST_FAILED),
        (cancelled.uuid, (await outcome_ids(harness.a, cancelled.uuid))[0], STAGE_INGEST_FAILED),
    }
    assert got == expected
    assert len(claimed) == 3


async def test_a_retried_order_queues_a_notification_per_outcome(harness: Harness) -> None:
    await harness.a.record_channels(["webhook"], {})
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    await harness.a.finish(Finish(order.uuid, STAGE_INGEST_FAILED, "File missing", run=1))
    await harness.a.retry(order.uuid, "retried by admin")
    await harness.b.claim(1)
    await harness.b.finish(Finish(order.uuid, STAGE_IMPORTED, "Imported", run=2))
    outcomes = await outcome_ids(harness.a, order.uuid)
    await harness.sql_retry(order.uuid)  # rewrites every row's stage to 'Import Pending'
    claimed = sorted(await claim_all(harness.a), key=lambda d: d.note.event_id)
    # each outcome as it was, although its history row now reads 'Import Pending'
    assert [(d.note.event_id, d.note.stage, d.note.description) for d in claimed] == [
        (outcomes[0], STAGE_INGEST_FAILED, "File missing"),
        (outcomes[1], STAGE_IMPORTED, "Imported"),
    ]


async def test_a_notification_carries_what_its_messages_need(harness: Harness) -> None:
    await harness.a.record_channels(["email"], {})
    order = NewOrder(
        uuid=str(uuidlib.uuid4()),
        group="Lab",
        user="bob",
        destination_type="Screen",
        destination_id="77",
        files='["/data/p.zarr"]',
    )
    await harness.a.submit(order)
    await harness.pass_time(0.01)
    await harness.a.claim(1)
    objects = [{"type": "Plate", "id": 5, "name": "p.zarr"}]
    await harness.pass_time(0.01)
    await harness.a.finish(
        Finish(order.uuid, STAGE_IMPORTED, "Imported 1 plate", None, objects, run=1)
    )
    [delivery] = await claim_all(harness.a, "email")
    note = delivery.note
    assert delivery.channel == "email" and delivery.token == 1
    assert (note.uuid, note.stage, note.user, note.group) == (
        order.uuid,
        STAGE_IMPORTED,
        "bob",
        "Lab",
    )
    assert (note.destination_type, note.destination_id) == ("Screen", "77")
    assert note.description == "Imported 1 plate"
    assert [o["id"] for o in note.objects] == [5]
    assert note.attempts == 1
    events = await harness.a.order_events(order.uuid)
    assert note.queued_at == events[0].timestamp
    assert note.started_at == events[1].timestamp
    assert note.finished_at == events[-1].timestamp
    assert note.queued_at is not None and note.started_at is not None
    assert note.finished_at is not None
    assert note.queued_at < note.started_at < note.finished_at


async def test_each_channel_is_claimed_and_leased_on_its_own(harness: Harness) -> None:
    await harness.a.record_channels(["email", "webhook"], {})
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None, run=1))
    [hook] = await harness.a.claim_deliveries("webhook", 10, LEASE)
    # the email is not held by the webhook's claim
    [mail] = await harness.b.claim_deliveries("email", 10, LEASE)
    assert (hook.note.id, mail.note.id) == (hook.note.id, hook.note.id)
    # another replica never sends it while the lease runs
    assert await harness.b.claim_deliveries("webhook", 10, LEASE) == []
    await harness.pass_time(LEASE * 2)
    [again] = await harness.b.claim_deliveries("webhook", 10, LEASE)
    assert again.note.id == hook.note.id and again.note.attempts == 2
    assert again.token == hook.token + 1


async def test_a_late_writer_changes_nothing_under_an_old_token(harness: Harness) -> None:
    """A replica whose lease ran out while it sent records under the token of its claim: the
    newer claimant's lease and result stand."""
    await harness.a.record_channels(["webhook"], {})
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None, run=1))
    [first] = await harness.a.claim_deliveries("webhook", 10, LEASE)
    await harness.pass_time(LEASE * 2)
    [second] = await harness.b.claim_deliveries("webhook", 10, 60)
    late = DeliveryResult(first.note.id, "webhook", first.token, "retry", retry_in=0)
    assert not await harness.a.record_delivery(late)
    # B's lease stands: nobody can claim it now
    assert await harness.a.claim_deliveries("webhook", 10, 60) == []
    assert await harness.b.record_delivery(
        DeliveryResult(second.note.id, "webhook", second.token, "delivered")
    )
    assert not await harness.a.record_delivery(
        DeliveryResult(first.note.id, "webhook", first.token, "given_up", error="late")
    )
    [state] = await harness.a.order_deliveries(order.uuid)
    assert state.delivered_at is not None and state.given_up_at is None
    assert state.last_error is None and state.attempts == 2


async def test_an_outcome_is_done_once_every_owed_channel_settled(harness: Harness) -> None:
    await harness.a.record_channels(["email", "webhook"], {})
    await harness.b.record_channels(["webhook"], {})  # B has fewer: still both are owed
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None, run=1))
    [hook] = await harness.b.claim_deliveries("webhook", 10, 60)
    assert await harness.b.record_delivery(
        DeliveryResult(hook.note.id, "webhook", hook.token, "delivered")
    )
    assert await harness.a.notification_stats() == (1, pytest.approx(0, abs=5))
    [mail] = await harness.a.claim_deliveries("email", 10, 60)
    assert await harness.a.record_delivery(
        DeliveryResult(mail.note.id, "email", mail.token, "retry", retry_in=LEASE, error="421")
    )
    assert await harness.a.claim_deliveries("email", 10, 60) == []  # not due yet
    await harness.pass_time(LEASE * 2)
    [mail] = await harness.a.claim_deliveries("email", 10, 60)
    assert await harness.a.record_delivery(
        DeliveryResult(mail.note.id, "email", mail.token, "given_up", error="SMTP 550")
    )
    stats = await harness.a.notification_stats()
    assert stats is not None and stats[0] == 0
    states = {s.channel: s for s in await harness.b.order_deliveries(order.uuid)}
    assert set(states) == {"email", "webhook"}
    assert states["email"].given_up_at is not None and states["email"].attempts == 2
    assert states["email"].last_error == "SMTP 550"
    assert states["webhook"].delivered_at is not None


async def test_an_outcome_owing_no_channel_is_done_at_once(harness: Harness) -> None:
    await harness.a.record_channels([], {})
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None, run=1))
    assert await harness.a.order_deliveries(order.uuid) == []
    stats = await harness.a.notification_stats()
    assert stats is not None and stats[0] == 0


async def test_replicas_see_each_others_channels(harness: Harness) -> None:
    assert await harness.a.record_channels(["email", "webhook"], {"email": "smtp://m:25"}) == []
    [other] = await harness.b.record_channels(["webhook"], {"webhook": "https://h:443"})
    assert (other.worker_id, other.channels) == ("A", ("email", "webhook"))
    assert other.endpoints == {"email": "smtp://m:25"}
    assert [r.worker_id for r in await harness.a.channel_replicas()] == ["A", "B"]


async def test_done_notifications_are_pruned_after_the_retention_in_batches(
    harness: Harness,
) -> None:
    await harness.a.record_channels(["webhook"], {})
    orders = [new_order() for _ in range(3)]
    for order in orders:
        await harness.a.submit(order)
    await harness.a.claim(3)
    for order in orders:
        await harness.a.finish(Finish(order.uuid, STAGE_IMPORTED, None, run=1))
    claimed = sorted(await claim_all(harness.a), key=lambda d: d.note.id)
    # two delivered, one still owed
    for d in claimed[:2]:
        assert await harness.a.record_delivery(
            DeliveryResult(d.note.id, "webhook", d.token, "delivered")
        )
    last = claimed[2]
    await harness.a.record_delivery(
        DeliveryResult(last.note.id, "webhook", last.token, "retry", retry_in=60)
    )
    assert await harness.a.prune_notifications(older_than=60) == 0  # too recent
    await harness.pass_time(LEASE)
    assert await harness.a.prune_notifications(older_than=LEASE / 2, batch=1) == 1
    assert await harness.b.prune_notifications(older_than=LEASE / 2, batch=10) == 1
    assert await harness.b.prune_notifications(older_than=0, batch=10) == 0
    stats = await harness.a.notification_stats()
    assert stats is not None and stats[0] == 1  # the owed one stays


@pytest.mark.parametrize(
    "stored",
    [
        '{"step": "teleport", "units_done": 1}',
        "[1, 2, 3]",
        '"import"',
        '{"step": "import", "units_done": "many", "units_total": -3, "current_file": 7}',
    ],
)
async def test_a_progress_value_written_by_hand_never_breaks_the_reads(
    migrated_url: str, stored: str
) -> None:
    """Any SQL client may write the column; status and show read what makes sense of it."""
    url = asyncpg_dsn(migrated_url)
    store = PostgresStore(url, worker_id="A", lease_seconds=LEASE, pool_size=2)
    await store.open()
    try:
        order = new_order()
        await store.submit(order)
        await store.claim(1)
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(
                "UPDATE importer_orders SET progress = $2::json, progress_at = now()"
                " WHERE uuid = $1",
                order.uuid,
                stored,
            )
        finally:
            await conn.close()
        status, show = await _progress(store, order.uuid)
        assert status == show
        if status is not None:  # a known step with unusable numbers: the numbers read as 0
            assert (status.units_done, status.units_total, status.current_file) == (0, 0, None)
    finally:
        await store.close()


async def test_a_progress_write_the_database_cannot_take_gives_up_at_once(
    migrated_url: str,
) -> None:
    """One attempt with a bound, never a wait: here a SQL client holds the order's row lock
    in an open transaction. Logged once until a write works again, not once per write."""
    url = asyncpg_dsn(migrated_url)
    store = PostgresStore(url, worker_id="A", lease_seconds=60, pool_size=2)
    store.progress_timeout = 0.3
    await store.open()
    holder = await asyncpg.connect(url)
    try:
        order = new_order()
        await store.submit(order)
        await store.claim(1)
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM importer_orders WHERE uuid = $1 FOR UPDATE", order.uuid)
        with structlog.testing.capture_logs() as logs:
            for done in range(3):
                assert not await store.record_progress(
                    order.uuid, Progress("import", done, 3), run=1
                )
            await lock.rollback()
            assert await store.record_progress(order.uuid, Progress("import", 3, 3), run=1)
        assert [e["event"] for e in logs] == ["progress_not_recorded", "progress_recorded_again"]
        assert logs[0]["error"].startswith("TimeoutError")
        status, _ = await _progress(store, order.uuid)
        assert status is not None and status.units_done == 3
    finally:
        await holder.close()
        await store.close()


# --- waits: not_before, retries, settle ----------------------------------------------------
WAIT = 0.6


async def test_a_waiting_order_is_not_claimed_before_its_time(harness: Harness) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    waiting = Finish(
        order.uuid, STAGE_NEW_ORDER, "Waiting for files", delay=WAIT, settling=True, run=1
    )
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


async def test_transient_retries_count_and_settle_waits_are_timed_from_their_first(
    harness: Harness,
) -> None:
    """``settle_max_wait`` bounds one stretch of settle waits: repeated waits keep the time of
    the first; a run that got past them (and was handed back for another reason) ends it."""
    order = new_order()
    await harness.a.submit(order)
    for _ in range(2):
        [claimed] = await harness.a.claim(1)
        settling = Finish(
            order.uuid, STAGE_NEW_ORDER, "settling", delay=0, settling=True, run=claimed.runs
        )
        assert await harness.a.finish(settling)
        await harness.pass_time(0.05)
    first = await harness.a.order_detail(order.uuid)
    assert first is not None and first.waiting_since is not None
    for n in (1, 2):
        [claimed] = await harness.a.claim(1)
        assert claimed.retries == n - 1
        retry = Finish(
            order.uuid,
            STAGE_NEW_ORDER,
            "OMERO down",
            delay=0,
            transient_retry=True,
            run=claimed.runs,
        )
        assert await harness.a.finish(retry)
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None
    assert (detail.retries, detail.attempts) == (2, 0)
    assert detail.waiting_since is None
    # a later settle wait starts a stretch of its own
    await harness.pass_time(0.05)
    [claimed] = await harness.a.claim(1)
    settling = Finish(
        order.uuid, STAGE_NEW_ORDER, "settling", delay=0, settling=True, run=claimed.runs
    )
    assert await harness.a.finish(settling)
    again = await harness.a.order_detail(order.uuid)
    assert again is not None and again.waiting_since is not None
    assert again.waiting_since > first.waiting_since
    # a hand-back that is no wait (shutdown) leaves no time to wait for
    [claimed] = await harness.a.claim(1)
    assert claimed.retries == 2
    shutdown = Finish(order.uuid, STAGE_NEW_ORDER, "shutdown", run=claimed.runs)
    assert await harness.a.finish(shutdown)
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None and detail.not_before is None and detail.retries == 2


@pytest.mark.parametrize("terminal", [STAGE_IMPORTED, STAGE_INGEST_FAILED])
async def test_an_order_that_ends_forgets_its_waits(harness: Harness, terminal: str) -> None:
    order = new_order()
    await harness.a.submit(order)
    await harness.a.claim(1)
    retry = Finish(
        order.uuid, STAGE_NEW_ORDER, "x", delay=0, transient_retry=True, settling=True, run=1
    )
    await harness.a.finish(retry)
    await harness.a.claim(1)
    assert await harness.a.finish(Finish(order.uuid, terminal, "done", run=2))
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None
    assert (detail.not_before, detail.waiting_since, detail.retries) == (None, None, 0)
    # a manual retry then starts afresh
    await harness.a.retry(order.uuid, "again")
    [claimed] = await harness.a.claim(1)
    assert (claimed.retries, claimed.waiting_since, claimed.attempt) == (0, None, 1)


async def test_a_run_the_same_replica_lost_writes_nothing_after_its_reclaim(
    harness: Harness,
) -> None:
    """Seen in the chaos run: a replica's run lost its lease (the database was away), another
    replica re-queued the order, the same replica claimed it again, and both runs' endings
    were written in one finish batch: two 'Import Completed' rows in one attempt. A write is
    fenced by the claim (worker and run), not by the worker alone."""
    order = new_order()
    await harness.a.submit(order)
    [old] = await harness.a.claim(1)
    await harness.pass_time(LEASE * 2)
    assert dict(await harness.b.recover_expired(max_attempts=3)) == {order.uuid: STAGE_NEW_ORDER}
    [new] = await harness.a.claim(1)
    assert new.runs == old.runs + 1
    stale = Finish(order.uuid, STAGE_IMPORTED, "old run", run=old.runs)
    assert not await harness.a.append_stage(order.uuid, STAGE_PREPROCESSING, run=old.runs)
    await harness.a.record_objects(order.uuid, [{"type": "Image", "id": 1}], run=old.runs)
    progress = Progress("import", units_done=1, units_total=2)
    assert not await harness.a.record_progress(order.uuid, progress, run=old.runs)
    current = Finish(order.uuid, STAGE_IMPORTED, "new run", run=new.runs)
    # both endings in flight at once: the batched writer takes them in one statement
    writer = asyncio.create_task(harness.a.serve())
    try:
        await asyncio.sleep(0)
        results = await asyncio.gather(harness.a.finish(stale), harness.a.finish(current))
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    assert results == [False, True]
    events = await harness.a.order_events(order.uuid)
    assert [e.stage for e in events].count(STAGE_IMPORTED) == 1
    assert events[-1].description == "new run"
    detail = await harness.a.order_detail(order.uuid)
    assert detail is not None and detail.objects == []


# --- an ending racing a client's write to the same running order ------------------------------
@pytest.mark.parametrize(
    "client_write",
    [
        # the documented SQL retry, on the latest row: refused, the running state restored
        "UPDATE imports SET stage = 'Import Pending'"
        " WHERE id = (SELECT max(id) FROM imports WHERE uuid = $1)",
        # a second submission of the running order: ignored, the running state restored
        "INSERT INTO imports (group_name, user_name, destination_id, destination_type, stage,"
        " uuid, files) VALUES ('Demo', 'alice', '1', 'Dataset', 'Import Pending', $1,"
        " '[\"/data/a.tif\"]')",
    ],
    ids=["sql-retry", "duplicate-submission"],
)
async def test_an_ending_that_waited_for_a_clients_write_is_still_recorded(
    migrated_url: str, client_write: str
) -> None:
    """Found by the hostile-order fuzz run: the run's ending started while a client's write
    to the same order held its row lock, and that write appended a row restoring the running
    state. The ending then updated the queue row to 'Import Failed' but copied its history
    row from the restored one, which its snapshot (taken before it waited) could not see, so
    no row was written: the order's latest row said 'Import Started' for ever."""
    url = asyncpg_dsn(migrated_url)
    store = PostgresStore(url, worker_id="A", lease_seconds=60, pool_size=2)
    await store.open()
    client = await asyncpg.connect(url)
    try:
        order = new_order()
        await store.submit(order)
        [claimed] = await store.claim(1)
        writing = client.transaction()
        await writing.start()
        await client.execute(client_write, order.uuid)
        ending = asyncio.create_task(
            store.finish(Finish(order.uuid, STAGE_INGEST_FAILED, CANCELLED, run=claimed.runs))
        )
        # the ending's statement has begun (its snapshot is taken) and waits for the lock
        for _ in range(200):
            waiting = await store.pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%importer_finish(%'"
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting, "the ending never waited for the client's row lock"
        await writing.commit()
        assert await ending
        events = await store.order_events(order.uuid)
        assert events[-1].stage == STAGE_INGEST_FAILED, [(e.stage, e.description) for e in events]
        assert events[-1].description == CANCELLED
        state = await store.order_state(order.uuid)
        assert state is not None and state.stage == STAGE_INGEST_FAILED
    finally:
        await client.close()
        await store.close()
