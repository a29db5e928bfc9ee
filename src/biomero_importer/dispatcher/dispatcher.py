"""Claims orders the moment they arrive and runs each as an asyncio task.

Wake-ups come from NOTIFY (the listener) and from a fallback poll; claims are batched up to
the free capacity; each running order holds a lease that this replica renews, and any replica
takes back orders whose lease expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import structlog

from biomero_importer.dispatcher.causes import Cause, Causes
from biomero_importer.dispatcher.listener import Listener
from biomero_importer.dispatcher.supervisor import Supervisor
from biomero_importer.model import (
    CANCELLED,
    STAGE_IMPORTING,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    TRANSIENT_PHRASES,
    ClaimedOrder,
    Outcome,
)
from biomero_importer.observability.health import HealthState
from biomero_importer.observability.metrics import Metrics, WaitReason
from biomero_importer.observability.metrics import Outcome as OutcomeLabel
from biomero_importer.pipeline.runner import Pipeline
from biomero_importer.store import Finish, OrderStore, StoreClosed, StoreUnavailable
from biomero_importer.text import DESCRIPTION_LIMIT, duration, short

log = structlog.get_logger(__name__)

T = TypeVar("T")


class StopReason(enum.Enum):
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"
    # this replica could not renew the lease in time: stop before another replica may start
    FENCED = "fenced"


SHUTDOWN_NOTE = "The importer shut down while this order ran; it was queued again."
FENCED_NOTE = (
    "The importer lost contact with its database while this order ran; it was queued again."
)
# Renewal runs every third of a lease; after two rounds without one, the last third is left
# to stop the order (kill its containers and imports) before its lease can expire.
FENCE_FRACTION = 2 / 3
# Seconds to write hand-backs after the grace period, and again for tasks to end after the
# store stops retrying: SIGTERM ends within shutdown_timeout + 10 s in every case.
HANDBACK_GRACE = 3.0
# Automatic retries spread over ±this fraction of their backoff: orders that failed together
# (an OMERO restart) do not all come back in the same second.
JITTER = 0.2
# The wake-up for an order this replica made wait comes this much after its not_before, so
# the claim (on the database's clock, written a moment before) finds it due.
WAKE_MARGIN = 0.05
# While a backlog waits, a claim waits this long at most for an eighth of the slots to come
# free. Measured (issue 22, pg_stat_statements): a claim cost PostgreSQL about 2.8 ms plus
# 0.17 ms per order it took, and with simulator imports ending one at a time every freed slot
# woke a claim of its own (2.2 orders each). Never applied while the queue keeps up (the
# previous claim left slots free): an order that arrives to free slots starts at once.
CLAIM_GATHER_SECONDS = 0.01
CLAIM_GATHER_FRACTION = 1 / 8


@dataclass(frozen=True)
class RetryPolicy:
    """Automatic retries of transient failures: ``retries`` of them, the n-th (from 0) after
    ``backoff * 2**n`` seconds, at most ``backoff_max``, with jitter."""

    retries: int = 5
    backoff: float = 60.0
    backoff_max: float = 3600.0

    def delay(self, used: int, rng: random.Random) -> float:
        base = min(self.backoff * 2.0 ** min(used, 64), self.backoff_max)
        return base * rng.uniform(1 - JITTER, 1 + JITTER)

    def outcome(self, order: ClaimedOrder, failed: Outcome, rng: random.Random) -> Outcome:
        """A wait while retries remain; else the failure, saying the retries were used up."""
        assert failed.transient is not None
        if order.retries < self.retries:
            delay = self.delay(order.retries, rng)
            what = TRANSIENT_PHRASES[failed.transient]
            return Outcome(
                STAGE_NEW_ORDER,
                f"{what}; retrying in {duration(delay)},"
                f" attempt {order.retries + 1} of {self.retries}",
                failed.file_names,
                failed.objects,
                transient=failed.transient,
                wait_seconds=delay,
            )
        if self.retries == 0:
            return failed
        suffix = f" (gave up after {self.retries} automatic retries)"
        reason = short(failed.description or "", DESCRIPTION_LIMIT - len(suffix))
        return Outcome(STAGE_INGEST_FAILED, reason + suffix, failed.file_names, failed.objects)


def _outcome_after_stop(reason: StopReason | None) -> Outcome | None:
    """What a stopped run writes: nothing when it lost the order (or was not stopped by us)."""
    if reason is StopReason.CANCEL:
        return Outcome(STAGE_INGEST_FAILED, CANCELLED)
    if reason is StopReason.SHUTDOWN:
        return Outcome(STAGE_NEW_ORDER, SHUTDOWN_NOTE)
    if reason is StopReason.FENCED:
        return Outcome(STAGE_NEW_ORDER, FENCED_NOTE)
    return None


@dataclass
class _Running:
    task: asyncio.Task[None]
    renewed_at: float = field(default_factory=time.monotonic)
    stop_reason: StopReason | None = None
    started: bool = False


@dataclass
class Dispatcher:
    store: OrderStore
    pipeline: Pipeline
    listener: Listener | None
    max_workers: int
    poll_interval: float
    lease_seconds: float
    max_attempts: int
    shutdown_timeout: float
    metrics: Metrics = field(default_factory=Metrics)
    health: HealthState = field(default_factory=HealthState)
    supervisor: Supervisor = field(default_factory=Supervisor)
    handback_grace: float = HANDBACK_GRACE
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    rng: random.Random = field(default_factory=random.Random)
    #: the dependencies this replica probes while they are down (None: none are probed)
    causes: Causes | None = None
    #: extra helpers the service adds (health watcher, metrics server, loop-lag probe)
    helpers: dict[str, Callable[[], Awaitable[None]]] = field(default_factory=dict)
    _running: dict[str, _Running] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _woken_by_notify: bool = False
    # the previous claim filled every slot it asked for: more orders are likely waiting
    _backlog: bool = False
    # strong references: the event loop keeps only weak ones to tasks
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # wake-ups scheduled for orders this replica made wait (cancelled when it stops)
    _wakeups: set[asyncio.TimerHandle] = field(default_factory=set)

    # --- signals from the listener --------------------------------------------------------
    def notify_pending(self, _uuid: str) -> None:
        self._woken_by_notify = True
        self._wake.set()

    def notify_cancel(self, uuid: str) -> None:
        if uuid in self._running:
            self._stop(uuid, StopReason.CANCEL)
        else:
            self._background(self._cancel_pending(uuid), "cancel-pending")

    def wake(self) -> None:
        self._woken_by_notify = True
        self._wake.set()

    @property
    def running_count(self) -> int:
        return len(self._running)

    def request_stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def stop_now(self) -> None:
        """Second signal: skip the grace period and hand every running order back at once."""
        self.request_stop()
        for uuid in list(self._running):
            self._stop(uuid, StopReason.SHUTDOWN)

    # --- main loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until request_stop(); then hand back or finish what is running.

        Every helper runs supervised in one task group: it is restarted when it fails, and
        the group is cancelled (never left running) once running orders are drained.
        """
        helpers: dict[str, Callable[[], Awaitable[None]]] = {
            "leases": self._lease_loop,
            "recovery": self._recovery_loop,
            "finish-writer": self.store.serve,
            **(self.causes.helpers() if self.causes is not None else {}),
            **self.helpers,
        }
        if self.listener is not None:
            helpers["listener"] = self.listener.run
        log.info(
            "dispatcher_started", max_workers=self.max_workers, poll_interval=self.poll_interval
        )
        async with anyio.create_task_group() as group:
            for name, helper in helpers.items():
                group.start_soon(self.supervisor.keep_running, name, helper, name=name)
            try:
                await self.supervisor.keep_running("claim", self._claim_loop, until=self._stopping)
            finally:
                self.health.claiming = False
                for handle in self._wakeups:
                    handle.cancel()
                self._wakeups.clear()
                with anyio.CancelScope(shield=True):
                    await self._drain()
                group.cancel_scope.cancel()
        log.info("dispatcher_stopped")

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            notified = self._woken_by_notify
            self._woken_by_notify = False
            self._wake.clear()
            failing = self.supervisor.failing()
            self.health.failing_helpers = failing
            # A replica whose helpers keep failing cannot look after what it claims.
            self.health.claiming = not failing
            claimed = await self._claim_all() if not failing else 0
            if claimed and not notified:
                self.metrics.fallback_poll_orders.inc(claimed)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_interval)

    async def _claim_all(self) -> int:
        """Claim until the queue is empty or every slot is busy."""
        total = 0
        while not self._stopping.is_set():
            free = self.max_workers - len(self._running)
            if free <= 0:
                return total
            if self._backlog and free < self._gather:
                free = await self._gather_slots()
            try:
                orders = await self._unless_stopping(self.store.claim(free))
            except StoreClosed:
                return total
            if orders is None:
                return total
            now = time.time()
            for order in orders:
                # a deliberate wait is not latency: it counts from when the order was due
                due = max(order.queued_at, order.not_before or 0.0)
                self.metrics.pickup_latency.observe(max(0.0, now - due))
                self._start(order)
            total += len(orders)
            self._backlog = len(orders) == free
            if len(orders) < free:
                return total
        return total

    @property
    def _gather(self) -> int:
        return max(1, int(self.max_workers * CLAIM_GATHER_FRACTION))

    async def _gather_slots(self) -> int:
        """The free slots once a batch of them is free, or CLAIM_GATHER_SECONDS have passed.
        (Each ending order sets ``_wake``; a NOTIFY meanwhile is answered by the claim that
        follows, which sees every order committed before it.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLAIM_GATHER_SECONDS
        while (free := self.max_workers - len(self._running)) < self._gather:
            remaining = deadline - loop.time()
            if remaining <= 0 or self._stopping.is_set():
                break
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=remaining)
        return free

    async def _unless_stopping(self, call: Awaitable[T]) -> T | None:
        """``call``'s result, or None once a stop is requested: a claim that waits out a
        database outage must not hold up shutdown. (A claim cut off after it committed only
        costs its orders a lease period: recovery re-queues them.)"""
        work = asyncio.ensure_future(call)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if work.done():
            return work.result()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return None

    def _start(self, order: ClaimedOrder) -> None:
        previous = self._running.get(order.uuid)
        if previous is not None:
            # A run of ours lost this order (its lease ran out while the database was away,
            # another replica queued it again) and we claimed it again before that run ended.
            # The old run's writes are fenced by its run number; it is stopped here, and the
            # new run starts only once it has unwound: never two runs of one order at once.
            log.warning("order_claimed_again_while_running", order_uuid=order.uuid)
            self._stop_run(order.uuid, previous, StopReason.LEASE_LOST)
        task = asyncio.create_task(
            self._run_order(order, None if previous is None else previous.task),
            name=f"order-{order.uuid}",
        )
        # the dispatcher is each order's parent: _drain awaits them, and nothing ends silently
        task.add_done_callback(_log_failure)
        self._running[order.uuid] = _Running(task)
        self.metrics.running_orders.set(len(self._running))

    async def _run_order(self, order: ClaimedOrder, previous: asyncio.Task[None] | None) -> None:
        # A stop requested before this task first ran could not cancel it (a task cancelled
        # before it starts never runs its cleanup): it is honoured here instead. The entry is
        # this run's own from here on, even if the order is claimed again meanwhile.
        running = self._running.get(order.uuid)
        if running is None or running.task is not asyncio.current_task():
            return  # claimed again before this run began: the newer run has it
        running.started = True
        bound = structlog.contextvars.bound_contextvars(
            order_uuid=order.uuid,
            worker_id=self.store.worker_id,
            attempt=order.attempt,
            stage=STAGE_IMPORTING,
        )
        with bound:
            log.info("order_started")
            outcome: Outcome | None
            # The slot is freed on every way out, including a cancel after the lease was lost
            # (that one re-raises), or the replica would stop claiming once its slots leaked.
            try:
                try:
                    if previous is not None:
                        await asyncio.wait({previous})
                    if running.stop_reason is not None:
                        raise asyncio.CancelledError
                    held = await self.causes.holding(order) if self.causes else None
                    if held is not None:
                        outcome = self._held(held)
                    else:
                        outcome = await self.pipeline.run(order)
                except asyncio.CancelledError:
                    reason = running.stop_reason
                    # the pipeline has unwound: imports aborted, containers killed
                    log.info("order_stopped", reason=reason.value if reason else None)
                    outcome = _outcome_after_stop(reason)
                    if outcome is None:
                        raise
                except Exception:
                    log.exception("order_crashed")
                    outcome = Outcome(
                        STAGE_INGEST_FAILED, "Internal error in the importer; see its logs"
                    )
                try:
                    await self._finish(order, outcome)
                except StoreClosed:
                    log.warning("finish_left_to_recovery", stage=outcome.stage)
            finally:
                # only our own entry: the order may have been claimed again meanwhile
                if self._running.get(order.uuid) is running:
                    del self._running[order.uuid]
                self.metrics.running_orders.set(len(self._running))
                # A slot came free: look for more work without waiting for the poll.
                self._wake.set()

    def _held(self, cause: Cause) -> Outcome:
        """Not tried: what the order needs is down. It waits on it as if it had met it (an
        automatic retry used, the same backoff as its latest due time)."""
        log.info("order_held", cause=cause.kind, down_since=cause.down_since)
        self.metrics.orders_held.labels(cause=cause.kind).inc()
        reason = cause.failure or TRANSIENT_PHRASES[cause.kind]
        return Outcome(STAGE_INGEST_FAILED, reason, transient=cause.kind)

    async def _finish(self, order: ClaimedOrder, outcome: Outcome) -> None:
        if outcome.stage == STAGE_INGEST_FAILED and outcome.transient is not None:
            if self.causes is not None:
                self.causes.failed(outcome.transient, outcome.description)
            outcome = self.retry_policy.outcome(order, outcome, self.rng)
        waits = outcome.stage == STAGE_NEW_ORDER and outcome.wait_seconds is not None
        item = Finish(
            uuid=order.uuid,
            run=order.runs,
            stage=outcome.stage,
            description=outcome.description,
            file_names=outcome.file_names,
            objects=outcome.objects or None,
            delay=outcome.wait_seconds if waits else None,
            transient_retry=waits and outcome.transient is not None,
            settling=waits and outcome.settling,
            # tied to its cause: due as soon as a probe finds it back, ``delay`` at the latest
            wait_cause=outcome.transient if waits else None,
        )
        written = await self.store.finish(item)
        if not written:
            log.warning("order_not_owned_any_more", stage=outcome.stage)
            return
        if item.delay is not None:
            # a wait is either a settle wait or the retry of a transient failure
            reason: WaitReason = "settle" if outcome.transient is None else outcome.transient
            self.metrics.order_waited(reason)
            log.info("order_waits", reason=reason, seconds=round(item.delay, 1))
            self._wake_at(item.delay)
        self.metrics.order_finished(_outcome_label(outcome))
        log.info("order_finished", stage=outcome.stage, description=outcome.description)

    def _wake_at(self, delay: float) -> None:
        """Claim again when a waiting order is due: no polling for it (other replicas find it
        by their fallback poll)."""

        def wake() -> None:
            self._wakeups.discard(handle)
            self.wake()

        handle = asyncio.get_running_loop().call_later(max(0.0, delay) + WAKE_MARGIN, wake)
        self._wakeups.add(handle)

    def _stop(self, uuid: str, reason: StopReason) -> None:
        running = self._running.get(uuid)
        if running is not None:
            self._stop_run(uuid, running, reason)

    def _stop_run(self, uuid: str, running: _Running, reason: StopReason) -> None:
        if running.stop_reason is not None:
            return
        running.stop_reason = reason
        if running.started:
            running.task.cancel()
        log.info("order_stopping", order_uuid=uuid, reason=reason.value)

    async def _cancel_pending(self, uuid: str | None = None) -> None:
        for cancelled in await self.store.cancel_pending(uuid):
            log.info("order_cancelled_before_start", order_uuid=cancelled)
            self.metrics.order_finished("cancelled")

    def _background(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    # --- leases and recovery ----------------------------------------------------------------
    async def _lease_loop(self) -> None:
        interval = max(0.05, self.lease_seconds / 3)
        while True:
            await asyncio.sleep(interval)
            await self.renew_once()

    async def renew_once(self) -> None:
        """One renewal round; then stop every order whose lease this replica cannot vouch for."""
        uuids = list(self._running)
        if not uuids:
            return
        try:
            leases = await self.store.renew_leases(uuids)
        except StoreUnavailable as exc:
            log.warning("lease_renewal_failed", error=str(exc), orders=len(uuids))
            leases = None
        now = time.monotonic()
        for uuid in uuids:
            running = self._running.get(uuid)
            if running is None:
                continue
            if leases is not None:
                lease = leases.get(uuid)
                if lease is None:
                    self._stop(uuid, StopReason.LEASE_LOST)
                    continue
                if lease.renewed:
                    running.renewed_at = now
                if lease.cancel_requested:
                    self._stop(uuid, StopReason.CANCEL)
                    continue
            if now - running.renewed_at > self.lease_seconds * FENCE_FRACTION:
                log.warning(
                    "order_fenced", order_uuid=uuid, since=round(now - running.renewed_at, 1)
                )
                self._stop(uuid, StopReason.FENCED)

    async def _recovery_loop(self) -> None:
        interval = max(0.05, min(self.lease_seconds / 2, 10.0))
        while True:
            try:
                # After an outage, owners first get a lease period to renew: an expired lease
                # then means a stopped replica, not a database that was away.
                if time.monotonic() - self.store.healthy_since >= self.lease_seconds:
                    for uuid, stage in await self.store.recover_expired(self.max_attempts):
                        log.warning("lease_recovered", order_uuid=uuid, stage=stage)
                        self.metrics.lease_recovered(
                            "requeued" if stage == STAGE_NEW_ORDER else "failed"
                        )
                await self._cancel_pending()
            except StoreClosed:
                return
            await asyncio.sleep(interval)

    # --- shutdown ---------------------------------------------------------------------------
    async def _drain(self) -> None:
        """Bounded, database up or down: the grace period, then stop and hand back; what
        cannot be written in ``handback_grace`` is left to lease recovery."""
        if not self._running:
            return
        log.info("shutdown_waiting", running=len(self._running), timeout=self.shutdown_timeout)
        tasks = [r.task for r in self._running.values()]
        _, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
        if not pending:
            return
        for uuid in list(self._running):
            if self._running[uuid].task in pending:
                self._stop(uuid, StopReason.SHUTDOWN)
        _, stuck = await asyncio.wait(pending, timeout=self.handback_grace)
        if stuck:
            log.warning(
                "shutdown_handback_abandoned",
                orders=len(stuck),
                note="not written; lease recovery re-queues them",
            )
            self.store.stop_retrying()
            await asyncio.wait(stuck, timeout=self.handback_grace)


def _outcome_label(outcome: Outcome) -> OutcomeLabel:
    if outcome.stage == STAGE_NEW_ORDER:
        return "handed_back"
    if outcome.stage != STAGE_INGEST_FAILED:
        return "completed"
    return "cancelled" if outcome.description == CANCELLED else "failed"


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background_task_failed", task=task.get_name(), exc_info=task.exception())
