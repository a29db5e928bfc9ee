"""Claims orders the moment they arrive and runs each as an asyncio task.

Wake-ups come from NOTIFY (the listener) and from a fallback poll; claims are batched up to
the free capacity; each running order holds a lease that this replica renews, and any replica
takes back orders whose lease expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import structlog

from biomero_importer.dispatcher.listener import Listener
from biomero_importer.dispatcher.store import Finish, OrderStore, StoreClosed
from biomero_importer.model import (
    CANCELLED,
    STAGE_IMPORTING,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    ClaimedOrder,
    Outcome,
)
from biomero_importer.observability.health import HealthState
from biomero_importer.observability.metrics import Metrics
from biomero_importer.observability.metrics import Outcome as OutcomeLabel
from biomero_importer.pipeline.runner import Pipeline

log = structlog.get_logger(__name__)


class StopReason(enum.Enum):
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"


@dataclass
class _Running:
    task: asyncio.Task[None]
    stop_reason: StopReason | None = None


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
    _running: dict[str, _Running] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _woken_by_notify: bool = False
    # strong references: the event loop keeps only weak ones to tasks
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

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
        """Serve until request_stop(); then hand back or finish what is running."""
        helpers = [
            asyncio.create_task(self._lease_loop(), name="leases"),
            asyncio.create_task(self._recovery_loop(), name="recovery"),
        ]
        if self.listener is not None:
            helpers.append(asyncio.create_task(self.listener.run(), name="listener"))
        self.health.claiming = True
        log.info(
            "dispatcher_started", max_workers=self.max_workers, poll_interval=self.poll_interval
        )
        try:
            await self._claim_loop()
        finally:
            self.health.claiming = False
            await self._drain()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            log.info("dispatcher_stopped")

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            notified = self._woken_by_notify
            self._woken_by_notify = False
            self._wake.clear()
            claimed = await self._claim_all()
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
            try:
                orders = await self.store.claim(free)
            except StoreClosed:
                return total
            now = time.time()
            for order in orders:
                self.metrics.pickup_latency.observe(max(0.0, now - order.queued_at))
                self._start(order)
            total += len(orders)
            if len(orders) < free:
                return total
        return total

    def _start(self, order: ClaimedOrder) -> None:
        task = asyncio.create_task(self._run_order(order), name=f"order-{order.uuid}")
        self._running[order.uuid] = _Running(task)
        self.metrics.running_orders.set(len(self._running))

    async def _run_order(self, order: ClaimedOrder) -> None:
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
                    outcome = await self.pipeline.run(order)
                except asyncio.CancelledError:
                    outcome = self._outcome_after_stop(order.uuid)
                    if outcome is None:
                        raise
                except Exception:
                    log.exception("order_crashed")
                    outcome = Outcome(
                        STAGE_INGEST_FAILED, "Internal error in the importer; see its logs"
                    )
                await self._finish(order, outcome)
            finally:
                # only our own entry: the order may have been claimed again meanwhile
                running = self._running.get(order.uuid)
                if running is not None and running.task is asyncio.current_task():
                    del self._running[order.uuid]
                self.metrics.running_orders.set(len(self._running))
                # A slot came free: look for more work without waiting for the poll.
                self._wake.set()

    def _outcome_after_stop(self, uuid: str) -> Outcome | None:
        running = self._running.get(uuid)
        reason = running.stop_reason if running else None
        if reason is StopReason.CANCEL:
            return Outcome(STAGE_INGEST_FAILED, CANCELLED)
        if reason is StopReason.SHUTDOWN:
            return Outcome(
                STAGE_NEW_ORDER,
                "The importer shut down while this order ran; it was queued again.",
            )
        return None

    async def _finish(self, order: ClaimedOrder, outcome: Outcome) -> None:
        item = Finish(
            uuid=order.uuid,
            stage=outcome.stage,
            description=outcome.description,
            file_names=outcome.file_names,
            objects=outcome.objects or None,
        )
        written = await self.store.finish(item)
        if written:
            self.metrics.order_finished(_outcome_label(outcome))
            log.info("order_finished", stage=outcome.stage, description=outcome.description)
        else:
            log.warning("order_not_owned_any_more", stage=outcome.stage)

    def _stop(self, uuid: str, reason: StopReason) -> None:
        running = self._running.get(uuid)
        if running is None or running.stop_reason is not None:
            return
        running.stop_reason = reason
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
            uuids = list(self._running)
            if not uuids:
                continue
            try:
                owned = await self.store.renew_leases(uuids)
            except StoreClosed:
                return
            for uuid in uuids:
                if uuid not in owned:
                    self._stop(uuid, StopReason.LEASE_LOST)
                elif owned[uuid]:
                    self._stop(uuid, StopReason.CANCEL)

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
        if not self._running:
            return
        log.info("shutdown_waiting", running=len(self._running), timeout=self.shutdown_timeout)
        tasks = [r.task for r in self._running.values()]
        _, pending = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
        for uuid in list(self._running):
            if self._running[uuid].task in pending:
                self._stop(uuid, StopReason.SHUTDOWN)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def _outcome_label(outcome: Outcome) -> OutcomeLabel:
    if outcome.stage == STAGE_NEW_ORDER:
        return "handed_back"
    if outcome.stage != STAGE_INGEST_FAILED:
        return "completed"
    return "cancelled" if outcome.description == CANCELLED else "failed"


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background_task_failed", error=repr(task.exception()))
