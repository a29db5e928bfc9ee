"""The order store in memory: the PostgreSQL store's semantics without a server.

Used by the unit tier (``pytest -m unit``) with a controllable clock. It mirrors the queue
trigger (duplicate submissions, retries, the SQL retry UPDATE), the stage trigger's outbox
rows (one per outcome that owes a channel), claims, leases, recovery and cancel, and it
refuses what PostgreSQL refuses in text (invalid UTF-8, NUL), so a value that would break the
real store breaks this one too. ``available = False`` simulates an outage.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from biomero_importer.model import (
    CANCELLED,
    RUNNING_STAGES,
    STAGE_IMPORTING,
    STAGE_INGEST_FAILED,
    STAGE_NEW_ORDER,
    TERMINAL_STAGES,
    ClaimedOrder,
    NewOrder,
    Notification,
    OrderDetail,
    OrderEvent,
    OrderState,
    OrderSummary,
    Progress,
    TransientKind,
)
from biomero_importer.store.base import (
    CancelResult,
    ChannelState,
    Delivery,
    DeliveryResult,
    Finish,
    Lease,
    OrderBusy,
    OrderNotFound,
    OrderStore,
    Orphan,
    ReplicaChannels,
    StoreClosed,
    StoreUnavailable,
)
from biomero_importer.text import DESCRIPTION_LIMIT, safe_json, safe_text

DUPLICATE_FINISHED = (
    "Duplicate submission ignored: this order already finished; re-run it with"
    " biomero-importer retry"
)
DUPLICATE_RUNNING = "Duplicate submission ignored: this order is already running"
RETRY_REFUSED = "Retry refused: this order is running; cancel it first or wait until it ends"
RETRIED_WAITING = "Retried: no longer waiting, due now"
# the batches of the PostgreSQL statements (importer_claim, RECOVER_EXPIRED, CANCEL_PENDING)
PROMOTE_BATCH = 100
RECOVER_BATCH = 100
CANCEL_BATCH = 100


@dataclass
class _Row:
    id: int
    stage: str
    description: str | None
    file_names: str | None
    timestamp: datetime


@dataclass
class _Order:
    new: NewOrder
    rows: list[_Row] = field(default_factory=list)
    queued_at: float = 0.0
    updated_at: float = 0.0
    worker_id: str | None = None
    last_worker_id: str | None = None
    lease_expires_at: float | None = None
    attempts: int = 0
    runs: int = 0
    cancel_requested: bool = False
    objects: list[dict[str, Any]] | None = None
    # importer_orders.progress as stored (JSON text) and progress_at
    progress: str | None = None
    progress_at: float | None = None
    not_before: float | None = None
    waiting_since: float | None = None
    retries: int = 0
    # importer_orders.queue_seq: breaks ties of queued_at; both survive hand-backs
    seq: int = 0
    waiting: bool = False
    wait_cause: str | None = None

    @property
    def stage(self) -> str:
        return self.rows[-1].stage

    @property
    def ready(self) -> bool:
        """What a claim may take (``importer_orders_ix_ready``)."""
        return (
            self.stage == STAGE_NEW_ORDER
            and self.worker_id is None
            and not self.cancel_requested
            and not self.waiting
        )

    @property
    def place(self) -> tuple[float, int]:
        return (self.queued_at, self.seq)


@dataclass
class _OutboxEntry:
    """One ``importer_outbox`` row."""

    id: int
    uuid: str
    event_id: int
    stage: str
    created_at: float
    next_attempt_at: float
    attempts: int = 0
    delivered: list[str] = field(default_factory=list)
    done_at: float | None = None
    last_error: str | None = None
    #: the channels it owes (``importer_outbox_delivery``), decided when it was queued
    deliveries: dict[str, _Delivery] = field(default_factory=dict)


@dataclass
class _Delivery:
    """One ``importer_outbox_delivery`` row."""

    channel: str
    due_at: float
    attempts: int = 0
    generation: int = 0
    last_error: str | None = None
    delivered_at: float | None = None
    given_up_at: float | None = None

    @property
    def settled(self) -> bool:
        return self.delivered_at is not None or self.given_up_at is not None


# how long before the latest replica's a replica's recorded channels still count (the
# owed-channels trigger's hour)
CHANNEL_MEMORY = 3600.0


def _check(value: str | None) -> None:
    """What PostgreSQL refuses in a text column."""
    if value is None:
        return
    value.encode("utf-8")  # UnicodeEncodeError for lone surrogates (undecodable file names)
    if "\x00" in value:
        raise ValueError("invalid byte sequence for encoding UTF8: 0x00")


def _stage_changed(order: _Order, previous: str | None) -> bool:
    """What the stage trigger (``importer_order_stage_changed``) does to the queue row: an
    order out of the running stages has no progress; an order that ends forgets its wait and
    retry state (a later retry starts afresh). True when this change is an outcome to notify
    (a duplicate submission of a finished order rewrites the same stage: not one)."""
    if order.stage not in RUNNING_STAGES:
        order.progress = order.progress_at = None
    if order.stage in TERMINAL_STAGES:
        order.waiting, order.wait_cause = False, None
    if order.stage not in TERMINAL_STAGES or previous is None or previous in TERMINAL_STAGES:
        return False
    order.not_before = order.waiting_since = None
    order.retries = 0
    return True


def _next_pick(orders: list[_Order], cap: int | None) -> _Order | None:
    """One step of the claim (``importer_claim``): the head (oldest ready order) of the user
    with the fewest running orders, then of the head's group with the fewest, then the
    oldest head; never a user at ``cap`` running orders."""
    user_running: Counter[str] = Counter()
    group_running: Counter[str] = Counter()
    heads: dict[str, _Order] = {}
    for order in orders:
        if order.worker_id is not None:
            user_running[order.new.user] += 1
            group_running[order.new.group] += 1
        elif order.ready:
            head = heads.get(order.new.user)
            if head is None or order.place < head.place:
                heads[order.new.user] = order
    candidates = [head for user, head in heads.items() if cap is None or user_running[user] < cap]
    return min(
        candidates,
        key=lambda o: (user_running[o.new.user], group_running[o.new.group], o.place),
        default=None,
    )


def _when(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc)


class MemoryStore(OrderStore):
    def __init__(
        self,
        *,
        worker_id: str = "memory",
        lease_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        shared: MemoryStore | None = None,
        max_running_per_user: int | None = None,
    ) -> None:
        """``shared``: another replica's store whose orders this one sees (one database)."""
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        #: claims never take a user past this many running orders (all replicas together)
        self.max_running_per_user = max_running_per_user
        self.clock = clock
        self._db: dict[str, _Order] = shared._db if shared is not None else {}
        self._ids: list[int] = shared._ids if shared is not None else [0]
        self._seqs: list[int] = shared._seqs if shared is not None else [0]
        self._outbox: dict[int, _OutboxEntry] = shared._outbox if shared is not None else {}
        self._replicas: dict[str, tuple[list[str], dict[str, str], float]] = (
            shared._replicas if shared is not None else {}
        )
        self._closing = False
        self.available = True
        self.healthy = True
        self.healthy_since = time.monotonic()

    async def open(self) -> None:
        await self._gate("connect", retry=True)

    def stop_retrying(self) -> None:
        self._closing = True

    async def close(self, timeout: float = 5.0) -> None:
        self._closing = True

    async def _gate(self, what: str, *, retry: bool) -> None:
        """Every call passes here: during an outage it waits (or fails at once)."""
        while not self.available:
            if self._closing:
                raise StoreClosed(what)
            self.healthy = False
            if not retry:
                raise StoreUnavailable(what)
            await asyncio.sleep(0.01)
        if not self.healthy:
            self.healthy_since = time.monotonic()
        self.healthy = True
        if self._closing and what not in ("finish",):
            raise StoreClosed(what)

    def _append(self, order: _Order, stage: str, description: str | None) -> _Row:
        _check(description)
        _check(order.rows[-1].file_names if order.rows else None)
        self._ids[0] += 1
        previous = order.rows[-1].stage if order.rows else None
        row = _Row(
            self._ids[0],
            stage,
            description,
            order.rows[-1].file_names if order.rows else None,
            datetime.fromtimestamp(self.clock(), timezone.utc),
        )
        order.rows.append(row)
        order.updated_at = self.clock()
        owed = self._owed() if _stage_changed(order, previous) else []
        if owed:
            # one outbox row per outcome that owes a channel, in the outcome's transaction
            entry_id = max(self._outbox, default=0) + 1
            now = self.clock()
            entry = _OutboxEntry(entry_id, order.new.uuid, row.id, stage, now, now)
            entry.deliveries = {c: _Delivery(c, now) for c in owed}
            self._outbox[entry_id] = entry
        return row

    def _ignore_duplicate(self, order: _Order, note: str) -> None:
        """The trigger's answer to a second submission of a running or finished order: the
        writer's row stays in the history, a copy of the order's state follows it; the queue
        row (stage, outbox) does not change."""
        stage, file_names = order.stage, order.rows[-1].file_names
        when = datetime.fromtimestamp(self.clock(), timezone.utc)
        for row_stage, description, names in (
            (STAGE_NEW_ORDER, None, None),
            (stage, note, file_names),
        ):
            self._ids[0] += 1
            order.rows.append(_Row(self._ids[0], row_stage, description, names, when))
        order.updated_at = self.clock()

    def _next_seq(self) -> int:
        self._seqs[0] += 1
        return self._seqs[0]

    # --- the dispatcher ------------------------------------------------------------------
    async def claim(self, slots: int) -> list[ClaimedOrder]:
        await self._gate("claim", retry=True)
        now = self.clock()
        # due waits become ready first, a bounded batch oldest due first, as in PostgreSQL
        due = sorted(
            (
                o
                for o in self._db.values()
                if o.stage == STAGE_NEW_ORDER
                and o.worker_id is None
                and o.waiting
                and o.not_before is not None
                and o.not_before <= now
            ),
            key=lambda o: (o.not_before or 0.0, o.seq),
        )[:PROMOTE_BATCH]
        for waited in due:
            waited.waiting, waited.wait_cause = False, None
        claimed: list[ClaimedOrder] = []
        while len(claimed) < slots:
            order = _next_pick(list(self._db.values()), self.max_running_per_user)
            if order is None:
                break
            order.worker_id = order.last_worker_id = self.worker_id
            order.waiting, order.wait_cause = False, None
            order.lease_expires_at = self.clock() + self.lease_seconds
            order.attempts += 1
            order.runs += 1
            self._append(order, STAGE_IMPORTING, None)
            new = order.new
            claimed.append(
                ClaimedOrder(
                    uuid=new.uuid,
                    group_name=new.group,
                    user_name=new.user,
                    destination_id=new.destination_id,
                    destination_type=new.destination_type,
                    files=new.files,
                    file_names=order.rows[-1].file_names,
                    preprocessing_id=None if new.preprocessing is None else new.preprocessing.id,
                    preprocessing=new.preprocessing,
                    attempt=order.attempts,
                    runs=order.runs,
                    queued_at=order.queued_at,
                    recorded_objects=copy.deepcopy(order.objects or []),
                    import_options=new.import_options,
                    retries=order.retries,
                    waiting_since=order.waiting_since,
                    not_before=order.not_before,
                )
            )
        return claimed

    def _owned(self, uuid: str, run: int | None = None) -> _Order | None:
        """The order if this replica owns it (and ``run`` is its current claim, when given)."""
        order = self._db.get(uuid)
        if order is None or order.worker_id != self.worker_id:
            return None
        return order if run is None or order.runs == run else None

    async def append_stage(
        self, uuid: str, stage: str, description: str | None = None, *, run: int
    ) -> bool:
        await self._gate("append_stage", retry=True)
        order = self._owned(uuid, run)
        if order is None:
            return False
        text = None if description is None else safe_text(description, DESCRIPTION_LIMIT)
        self._append(order, stage, text)
        return True

    async def record_objects(self, uuid: str, objects: list[dict[str, Any]], *, run: int) -> None:
        await self._gate("record_objects", retry=True)
        order = self._owned(uuid, run)
        if order is not None:
            order.objects = json.loads(safe_json(objects))

    async def record_progress(self, uuid: str, progress: Progress, *, run: int) -> bool:
        # one attempt: an outage answers False at once, as PostgresStore's timeout would
        if not self.available or self._closing:
            return False
        order = self._owned(uuid, run)
        if order is None or order.stage not in RUNNING_STAGES:
            return False
        text = safe_json(progress.as_json())
        _check(text)
        order.progress, order.progress_at = text, self.clock()
        return True

    async def finish(self, item: Finish) -> bool:
        await self._gate("finish", retry=not self._closing)
        order = self._owned(item.uuid, item.run)
        if order is None:
            return False
        description = (
            None if item.description is None else safe_text(item.description, DESCRIPTION_LIMIT)
        )
        file_names = None if item.file_names is None else safe_json(item.file_names)
        _check(file_names)
        order.worker_id = None
        order.lease_expires_at = None
        if item.objects is not None:
            order.objects = json.loads(safe_json(item.objects))
        if item.stage == STAGE_NEW_ORDER:
            # a hand-back keeps the order's place (queued_at, seq)
            order.attempts -= 1
        order.not_before = None if item.delay is None else self.clock() + item.delay
        order.waiting = item.delay is not None
        order.wait_cause = item.wait_cause if order.waiting else None
        if item.transient_retry:
            order.retries += 1
        if not item.settling:
            order.waiting_since = None
        elif order.waiting_since is None:
            order.waiting_since = self.clock()
        row = self._append(order, item.stage, description)
        if file_names is not None:
            row.file_names = file_names
        return True

    async def renew_leases(self, uuids: list[str]) -> dict[str, Lease]:
        await self._gate("renew_leases", retry=False)
        leases = {}
        for uuid in uuids:
            order = self._owned(uuid)
            if order is not None:
                order.lease_expires_at = self.clock() + self.lease_seconds
                leases[uuid] = Lease(True, order.cancel_requested)
        return leases

    async def recover_expired(self, max_attempts: int) -> list[tuple[str, str]]:
        await self._gate("recover_expired", retry=True)
        now = self.clock()
        recovered = []
        # the 100 longest untouched, as RECOVER_EXPIRED takes them
        expired = sorted(
            (
                order
                for order in self._db.values()
                if (
                    order.worker_id not in (None, self.worker_id)
                    and (order.lease_expires_at or 0) < now
                )
                or (order.worker_id is None and order.stage in RUNNING_STAGES)
            ),
            key=lambda o: (o.updated_at, o.seq),
        )[:RECOVER_BATCH]
        for order in expired:
            order.worker_id = None
            order.lease_expires_at = None
            n = order.attempts
            if n < max_attempts and not order.cancel_requested:
                stage = STAGE_NEW_ORDER
                note = (
                    f"The importer stopped while this order ran (attempt {n} of"
                    f" {max_attempts}); it was queued again."
                )
            else:
                stage = STAGE_INGEST_FAILED
                note = (
                    f"The importer stopped while this order ran (attempt {n} of"
                    f" {max_attempts}). Retry it with: biomero-importer retry {order.new.uuid}"
                )
            self._append(order, stage, note)
            recovered.append((order.new.uuid, stage))
        return recovered

    async def cancel_pending(self, uuid: str | None = None) -> list[str]:
        await self._gate("cancel_pending", retry=True)
        # a batch, oldest queued first, as CANCEL_PENDING takes it: the rest next sweep
        batch = sorted(
            (
                order
                for order in self._db.values()
                if (uuid is None or order.new.uuid == uuid)
                and order.stage == STAGE_NEW_ORDER
                and order.worker_id is None
                and order.cancel_requested
            ),
            key=lambda o: o.seq,
        )[:CANCEL_BATCH]
        for order in batch:
            self._append(order, STAGE_INGEST_FAILED, CANCELLED)
        return [order.new.uuid for order in batch]

    async def wake_waiting(self, cause: TransientKind) -> int:
        await self._gate("wake_waiting", retry=True)
        now = self.clock()
        woken = 0
        for order in self._db.values():
            if (
                order.stage == STAGE_NEW_ORDER
                and order.worker_id is None
                and order.waiting
                and order.wait_cause == cause
            ):
                order.waiting, order.wait_cause = False, None
                order.not_before = min(order.not_before or now, now)
                woken += 1
        return woken

    async def queue_stats(self) -> tuple[int, float] | None:
        if not self.available:
            self.healthy = False
            return None
        pending = [
            o.queued_at
            for o in self._db.values()
            if o.stage == STAGE_NEW_ORDER and o.worker_id is None
        ]
        oldest = self.clock() - min(pending) if pending else 0.0
        return len(pending), oldest

    async def ping(self) -> bool:
        self.healthy = self.available
        return self.available

    # --- writers, the CLI, the demo ------------------------------------------------------
    async def submit(self, order: NewOrder) -> None:
        """The insert trigger's logic for one new 'Import Pending' row."""
        await self._gate("submit", retry=True)
        for value in (order.group, order.user, order.files, order.destination_id):
            _check(value)
        current = self._db.get(order.uuid)
        if current is None:
            entry = _Order(order, queued_at=self.clock(), seq=self._next_seq())
            self._db[order.uuid] = entry
            self._append(entry, STAGE_NEW_ORDER, None)
            return
        if current.stage in RUNNING_STAGES and current.worker_id is not None:
            self._ignore_duplicate(current, DUPLICATE_RUNNING)
        elif current.stage in TERMINAL_STAGES:
            self._ignore_duplicate(current, DUPLICATE_FINISHED)
        else:
            current.new = order
            self._append(current, STAGE_NEW_ORDER, None)

    def manual_retry(self, uuid: str) -> None:
        """The documented SQL retry UPDATE (every row of the uuid set to 'Import Pending')."""
        order = self._db[uuid]
        if order.worker_id is not None and order.stage in RUNNING_STAGES:
            # the UPDATE itself stands (an AFTER trigger): the rows read 'Import Pending',
            # and the refusal restores the running stage after them
            stage = order.stage
            for row in order.rows:
                row.stage = STAGE_NEW_ORDER
            self._append(order, stage, RETRY_REFUSED)
            return
        previous = order.stage
        was_waiting = order.waiting
        if all(row.stage == STAGE_NEW_ORDER for row in order.rows):
            return  # every row already reads 'Import Pending': the trigger never fires
        for row in order.rows:
            row.stage = STAGE_NEW_ORDER
        if previous != STAGE_NEW_ORDER:
            # a finished order (or one left running) goes to the back with fresh attempts
            if previous in TERMINAL_STAGES:
                order.attempts = 0
            order.cancel_requested = False
            order.queued_at = self.clock()
            order.seq = self._next_seq()
            order.updated_at = self.clock()
            _stage_changed(order, previous)
        elif was_waiting:
            self._make_due(order)
            self._append(order, STAGE_NEW_ORDER, RETRIED_WAITING)

    async def list_orders(
        self,
        *,
        user: str | None = None,
        group: str | None = None,
        stage: str | None = None,
        max_age_seconds: float | None = None,
        limit: int = 50,
    ) -> list[OrderSummary]:
        await self._gate("list_orders", retry=False)
        now = self.clock()
        found = [
            o
            for o in self._db.values()
            if (user is None or o.new.user == user)
            and (group is None or o.new.group == group)
            and (stage is None or o.stage == stage)
            and (max_age_seconds is None or o.updated_at >= now - max_age_seconds)
        ]
        found.sort(key=lambda o: o.updated_at, reverse=True)
        return [self._summary(o) for o in found[:limit]]

    def _summary(self, order: _Order) -> OrderSummary:
        new = order.new
        progress = None
        if order.progress is not None and order.progress_at is not None:
            progress = Progress.from_json(
                json.loads(order.progress),
                datetime.fromtimestamp(order.progress_at, timezone.utc),
            )
        return OrderSummary(
            uuid=new.uuid,
            stage=order.stage,
            updated_at=datetime.fromtimestamp(order.updated_at, timezone.utc),
            worker_id=order.worker_id,
            user_name=new.user,
            group_name=new.group,
            destination_type=new.destination_type,
            destination_id=new.destination_id,
            files=new.files,
            description=order.rows[-1].description,
            progress=progress,
        )

    async def order_detail(self, uuid: str) -> OrderDetail | None:
        await self._gate("order_detail", retry=False)
        order = self._db.get(uuid)
        if order is None:
            return None
        lease = order.lease_expires_at
        spec = order.new.preprocessing
        return OrderDetail(
            summary=self._summary(order),
            latest_id=order.rows[-1].id,
            queued_at=datetime.fromtimestamp(order.queued_at, timezone.utc),
            last_worker_id=order.last_worker_id,
            lease_expires_at=None if lease is None else datetime.fromtimestamp(lease, timezone.utc),
            attempts=order.attempts,
            runs=order.runs,
            cancel_requested=order.cancel_requested,
            objects=copy.deepcopy(order.objects or []),
            file_names=order.rows[-1].file_names,
            preprocessing=spec,
            raw_extra_params=None if spec is None else (spec.extra_params or None),
            import_options=order.new.import_options,
            not_before=_when(order.not_before),
            waiting_since=_when(order.waiting_since),
            retries=order.retries,
            waiting=order.waiting,
            wait_cause=order.wait_cause,
        )

    async def order_events(self, uuid: str, after_id: int = 0) -> list[OrderEvent]:
        await self._gate("order_events", retry=False)
        order = self._db.get(uuid)
        rows = order.rows if order is not None else []
        return [
            OrderEvent(r.id, r.timestamp, r.stage, r.description) for r in rows if r.id > after_id
        ]

    async def order_state(self, uuid: str) -> OrderState | None:
        await self._gate("order_state", retry=False)
        order = self._db.get(uuid)
        if order is None:
            return None
        return OrderState(order.stage, order.rows[-1].id, order.worker_id, order.cancel_requested)

    async def retry(self, uuid: str, note: str) -> str:
        await self._gate("retry", retry=False)
        order = self._db.get(uuid)
        if order is None:
            raise OrderNotFound(uuid)
        previous = order.stage
        if order.waiting and order.worker_id is None:
            self._make_due(order)
            self._append(order, STAGE_NEW_ORDER, note)
            return previous
        if previous not in TERMINAL_STAGES:
            raise OrderBusy(uuid, previous)
        order.attempts = 0
        order.cancel_requested = False
        order.queued_at = self.clock()
        order.seq = self._next_seq()
        self._append(order, STAGE_NEW_ORDER, note)
        return previous

    def _make_due(self, order: _Order) -> None:
        """A waiting order is due now; it keeps its place."""
        now = self.clock()
        order.waiting, order.wait_cause = False, None
        order.not_before = min(order.not_before or now, now)

    async def request_cancel(self, uuid: str) -> CancelResult:
        await self._gate("request_cancel", retry=False)
        order = self._db.get(uuid)
        if order is None:
            raise OrderNotFound(uuid)
        if order.stage in TERMINAL_STAGES:
            raise OrderBusy(uuid, order.stage)
        order.cancel_requested = True
        stage = order.stage
        if stage == STAGE_NEW_ORDER and order.worker_id is None:
            self._append(order, STAGE_INGEST_FAILED, CANCELLED)
            return CancelResult(stage, True)
        return CancelResult(stage, False)

    # --- notifications (the outbox) -------------------------------------------------------
    def _owed(self) -> list[str]:
        """``importer_owed_channels()``: what an outcome queued now owes."""
        latest = max((seen for _, _, seen in self._replicas.values()), default=0.0)
        return sorted(
            {
                c
                for chans, _, seen in self._replicas.values()
                if seen > latest - CHANNEL_MEMORY
                for c in chans
            }
        )

    def _others(self, exclude: str | None) -> list[ReplicaChannels]:
        now = self.clock()
        return [
            ReplicaChannels(worker, tuple(chans), dict(endpoints))
            for worker, (chans, endpoints, seen) in sorted(self._replicas.items())
            if seen > now - CHANNEL_MEMORY and worker != exclude
        ]

    async def record_channels(
        self, channels: list[str], endpoints: dict[str, str]
    ) -> list[ReplicaChannels]:
        await self._gate("record_channels", retry=True)
        self._replicas[self.worker_id] = (list(channels), dict(endpoints), self.clock())
        owed = self._owed()
        for entry in self._outbox.values():
            if entry.done_at is None and not entry.deliveries:
                left = [
                    c
                    for c in owed
                    if c not in entry.delivered and f"{c}:failed" not in entry.delivered
                ]
                entry.deliveries = {c: _Delivery(c, self.clock()) for c in left}
                if not left:
                    entry.done_at = self.clock()
        return self._others(self.worker_id)

    async def channel_replicas(self) -> list[ReplicaChannels]:
        await self._gate("channel_replicas", retry=True)
        return self._others(None)

    async def claim_deliveries(
        self, channel: str, limit: int, lease_seconds: float
    ) -> list[Delivery]:
        await self._gate("claim_deliveries", retry=True)
        now = self.clock()
        due = sorted(
            (
                (d.due_at, e.id, e, d)
                for e in self._outbox.values()
                if (d := e.deliveries.get(channel)) is not None
                and not d.settled
                and d.due_at <= now
            ),
            key=lambda t: (t[0], t[1]),
        )[:limit]
        claimed = []
        for _, _, entry, delivery in sorted(due, key=lambda t: t[1]):
            delivery.due_at = now + lease_seconds
            delivery.attempts += 1
            delivery.generation += 1
            claimed.append(
                Delivery(self._notification(entry, delivery, now), channel, delivery.generation)
            )
        return claimed

    def _notification(self, entry: _OutboxEntry, delivery: _Delivery, now: float) -> Notification:
        order = self._db.get(entry.uuid)
        rows = [r for r in order.rows if r.id <= entry.event_id] if order is not None else []
        event = next((r for r in rows if r.id == entry.event_id), None)
        started = [r.timestamp for r in rows if r.stage == STAGE_IMPORTING]
        new = order.new if order is not None and event is not None else None
        return Notification(
            id=entry.id,
            uuid=entry.uuid,
            event_id=entry.event_id,
            stage=entry.stage,
            attempts=delivery.attempts,
            age_seconds=now - entry.created_at,
            user=None if new is None else new.user,
            group=None if new is None else new.group,
            destination_type=None if new is None else new.destination_type,
            destination_id=None if new is None else new.destination_id,
            description=None if event is None else event.description,
            objects=copy.deepcopy(order.objects or []) if order is not None else [],
            queued_at=min((r.timestamp for r in rows), default=None),
            started_at=min(started, default=None),
            finished_at=None if event is None else event.timestamp,
        )

    async def record_delivery(self, result: DeliveryResult) -> bool:
        await self._gate("record_delivery", retry=True)
        now = self.clock()
        entry = self._outbox.get(result.id)
        delivery = None if entry is None else entry.deliveries.get(result.channel)
        if entry is None or delivery is None:
            return False
        if delivery.generation != result.token or delivery.settled:
            return False
        error = None if result.error is None else safe_text(result.error, 500)
        if error is not None:
            delivery.last_error = error
        if result.result == "retry":
            delivery.due_at = now + result.retry_in
            return True
        if result.result == "delivered":
            delivery.delivered_at = now
            what = result.channel
        else:
            delivery.given_up_at = now
            what = f"{result.channel}:failed"
        entry.delivered = sorted({*entry.delivered, what})
        if error is not None:
            entry.last_error = f"{result.channel}: {error}"
        if entry.done_at is None and all(d.settled for d in entry.deliveries.values()):
            entry.done_at = now
        return True

    async def orphaned_deliveries(self, older_than: float, limit: int) -> list[Orphan]:
        await self._gate("orphaned_deliveries", retry=True)
        now = self.clock()
        had = {
            c
            for chans, _, seen in self._replicas.values()
            if seen > now - CHANNEL_MEMORY
            for c in chans
        }
        found = sorted(
            (d.due_at, e.id, d.channel, d.generation, e.uuid, e.event_id)
            for e in self._outbox.values()
            if e.created_at < now - older_than
            for d in e.deliveries.values()
            if not d.settled and d.channel not in had
        )[:limit]
        return [Orphan(i, c, g, u, ev) for _, i, c, g, u, ev in found]

    async def order_deliveries(self, uuid: str) -> list[ChannelState]:
        await self._gate("order_deliveries", retry=True)
        entries = [e for e in self._outbox.values() if e.uuid == uuid]
        if not entries:
            return []
        latest = max(entries, key=lambda e: e.event_id)

        def when(value: float | None) -> datetime | None:
            return None if value is None else datetime.fromtimestamp(value, timezone.utc)

        return [
            ChannelState(
                channel=d.channel,
                event_id=latest.event_id,
                stage=latest.stage,
                queued_at=datetime.fromtimestamp(latest.created_at, timezone.utc),
                attempts=d.attempts,
                due_at=when(d.due_at),
                last_error=d.last_error,
                delivered_at=when(d.delivered_at),
                given_up_at=when(d.given_up_at),
            )
            for _, d in sorted(latest.deliveries.items())
        ]

    async def prune_notifications(self, older_than: float, batch: int = 1000) -> int:
        await self._gate("prune_notifications", retry=True)
        limit = self.clock() - older_than
        old = sorted(
            (e for e in self._outbox.values() if e.done_at is not None and e.done_at < limit),
            key=lambda e: e.done_at or 0.0,
        )[:batch]
        for entry in old:
            del self._outbox[entry.id]
        return len(old)

    async def notification_stats(self) -> tuple[int, float] | None:
        if not self.available:
            self.healthy = False
            return None
        waiting = [e.created_at for e in self._outbox.values() if e.done_at is None]
        oldest = self.clock() - min(waiting) if waiting else 0.0
        return len(waiting), oldest

    def outbox(self) -> list[tuple[str, int, str, list[str], bool]]:
        """(uuid, event id, stage, delivered, done) of every outbox row, for tests."""
        return [
            (e.uuid, e.event_id, e.stage, list(e.delivered), e.done_at is not None)
            for e in self._outbox.values()
        ]

    def snapshot(self, uuid: str) -> list[tuple[str, str | None]]:
        """(stage, description) of every row of an order, for tests."""
        return [(r.stage, r.description) for r in self._db[uuid].rows]


__all__ = ["MemoryStore"]
