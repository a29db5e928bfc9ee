"""The order store in memory: the PostgreSQL store's semantics without a server.

Used by the unit tier (``pytest -m unit``) with a controllable clock. It mirrors the queue
trigger (duplicate submissions, retries, the SQL retry UPDATE), claims, leases, recovery and
cancel, and it refuses what PostgreSQL refuses in text (invalid UTF-8, NUL), so a value that
would break the real store breaks this one too. ``available = False`` simulates an outage.
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
    OrderDetail,
    OrderEvent,
    OrderState,
    OrderSummary,
)
from biomero_importer.store.base import (
    CancelResult,
    Finish,
    Lease,
    OrderBusy,
    OrderNotFound,
    OrderStore,
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
    not_before: float | None = None
    waiting_since: float | None = None
    retries: int = 0

    @property
    def stage(self) -> str:
        return self.rows[-1].stage


def _check(value: str | None) -> None:
    """What PostgreSQL refuses in a text column."""
    if value is None:
        return
    value.encode("utf-8")  # UnicodeEncodeError for lone surrogates (undecodable file names)
    if "\x00" in value:
        raise ValueError("invalid byte sequence for encoding UTF8: 0x00")


def _fair_pick(orders: list[_Order], slots: int, cap: int | None, now: float) -> list[_Order]:
    """The claim's policy (``db/sql.py`` ``CLAIM``): by the load an order would give its user,
    then its group, then oldest first; never a user past ``cap`` running orders, never an
    order whose ``not_before`` is still ahead."""
    user_running: Counter[str] = Counter()
    group_running: Counter[str] = Counter()
    for order in orders:
        if order.worker_id is not None:
            user_running[order.new.user] += 1
            group_running[order.new.group] += 1
    pending = sorted(
        (
            o
            for o in orders
            if o.stage == STAGE_NEW_ORDER
            and o.worker_id is None
            and not o.cancel_requested
            and (o.not_before is None or o.not_before <= now)
        ),
        key=lambda o: o.queued_at,
    )
    user_load: dict[str, int] = {}
    by_user: Counter[str] = Counter()
    candidates: list[_Order] = []
    for order in pending:
        user = order.new.user
        allowed = slots if cap is None else min(slots, cap - user_running[user])
        if by_user[user] >= allowed:
            continue
        user_load[order.new.uuid] = user_running[user] + by_user[user]
        by_user[user] += 1
        candidates.append(order)
    group_load: dict[str, int] = {}
    by_group: Counter[str] = Counter()
    for order in sorted(candidates, key=lambda o: (user_load[o.new.uuid], o.queued_at)):
        group = order.new.group
        group_load[order.new.uuid] = group_running[group] + by_group[group]
        by_group[group] += 1
    candidates.sort(key=lambda o: (user_load[o.new.uuid], group_load[o.new.uuid], o.queued_at))
    return candidates[:slots]


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
        if stage in TERMINAL_STAGES and order.rows and order.stage not in TERMINAL_STAGES:
            # the stage trigger (importer_order_stage_changed): an order that ends forgets its
            # wait and retry state, so a later retry starts afresh
            order.not_before = order.waiting_since = None
            order.retries = 0
        self._ids[0] += 1
        row = _Row(
            self._ids[0],
            stage,
            description,
            order.rows[-1].file_names if order.rows else None,
            datetime.fromtimestamp(self.clock(), timezone.utc),
        )
        order.rows.append(row)
        order.updated_at = self.clock()
        return row

    # --- the dispatcher ------------------------------------------------------------------
    async def claim(self, slots: int) -> list[ClaimedOrder]:
        await self._gate("claim", retry=True)
        ready = _fair_pick(list(self._db.values()), slots, self.max_running_per_user, self.clock())
        claimed = []
        for order in ready:
            order.worker_id = order.last_worker_id = self.worker_id
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

    def _owned(self, uuid: str) -> _Order | None:
        order = self._db.get(uuid)
        return order if order is not None and order.worker_id == self.worker_id else None

    async def append_stage(self, uuid: str, stage: str, description: str | None = None) -> bool:
        await self._gate("append_stage", retry=True)
        order = self._owned(uuid)
        if order is None:
            return False
        text = None if description is None else safe_text(description, DESCRIPTION_LIMIT)
        self._append(order, stage, text)
        return True

    async def record_objects(self, uuid: str, objects: list[dict[str, Any]]) -> None:
        await self._gate("record_objects", retry=True)
        order = self._owned(uuid)
        if order is not None:
            order.objects = json.loads(safe_json(objects))

    async def finish(self, item: Finish) -> bool:
        await self._gate("finish", retry=not self._closing)
        order = self._owned(item.uuid)
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
            order.attempts -= 1
            order.queued_at = self.clock()
        order.not_before = None if item.delay is None else self.clock() + item.delay
        if item.transient_retry:
            order.retries += 1
        if item.settling and order.waiting_since is None:
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
        for order in list(self._db.values())[:100]:
            expired = (
                order.worker_id not in (None, self.worker_id)
                and (order.lease_expires_at or 0) < now
            )
            orphan = order.worker_id is None and order.stage in RUNNING_STAGES
            if not (expired or orphan):
                continue
            order.worker_id = None
            order.lease_expires_at = None
            n = order.attempts
            if n < max_attempts and not order.cancel_requested:
                stage = STAGE_NEW_ORDER
                note = (
                    f"The importer stopped while this order ran (attempt {n} of"
                    f" {max_attempts}); it was queued again."
                )
                order.queued_at = now
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
        done = []
        for order in self._db.values():
            if uuid is not None and order.new.uuid != uuid:
                continue
            if (
                order.stage == STAGE_NEW_ORDER
                and order.worker_id is None
                and order.cancel_requested
            ):
                self._append(order, STAGE_INGEST_FAILED, CANCELLED)
                done.append(order.new.uuid)
        return done[:100]

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
            entry = _Order(order, queued_at=self.clock())
            self._db[order.uuid] = entry
            self._append(entry, STAGE_NEW_ORDER, None)
            return
        if current.stage in RUNNING_STAGES and current.worker_id is not None:
            self._append(current, current.stage, DUPLICATE_RUNNING)
        elif current.stage in TERMINAL_STAGES:
            self._append(current, current.stage, DUPLICATE_FINISHED)
        else:
            current.new = order
            self._append(current, STAGE_NEW_ORDER, None)

    def manual_retry(self, uuid: str) -> None:
        """The documented SQL retry UPDATE (every row of the uuid set to 'Import Pending')."""
        order = self._db[uuid]
        if order.worker_id is not None and order.stage in RUNNING_STAGES:
            self._append(order, order.stage, RETRY_REFUSED)
            return
        if order.stage in TERMINAL_STAGES:
            order.attempts = 0
        order.cancel_requested = False
        order.queued_at = self.clock()
        for row in order.rows:
            row.stage = STAGE_NEW_ORDER

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
        if previous not in TERMINAL_STAGES:
            raise OrderBusy(uuid, previous)
        order.attempts = 0
        order.cancel_requested = False
        order.queued_at = self.clock()
        self._append(order, STAGE_NEW_ORDER, note)
        return previous

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

    def snapshot(self, uuid: str) -> list[tuple[str, str | None]]:
        """(stage, description) of every row of an order, for tests."""
        return [(r.stage, r.description) for r in self._db[uuid].rows]


__all__ = ["MemoryStore"]
