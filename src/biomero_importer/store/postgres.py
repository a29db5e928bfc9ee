"""The order store on PostgreSQL (asyncpg): claims, stage writes, leases, recovery, reads.

Calls made for a running order retry on transient errors (PostgreSQL restarts, failovers,
deadlocks) with backoff, logging once per backoff step rather than once per failed query,
until the store closes. Lease renewal and health checks never retry: their callers must see an
outage at once. Every statement is in :mod:`biomero_importer.db.sql`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import asyncpg
import structlog

from biomero_importer.db import sql
from biomero_importer.model import (
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
    PreprocessingSpec,
    Progress,
    TransientKind,
)
from biomero_importer.store.base import (
    CancelResult,
    ChannelState,
    Delivery,
    DeliveryResult,
    ErrorKind,
    Finish,
    Lease,
    OrderBusy,
    OrderNotFound,
    OrderStore,
    Orphan,
    ReplicaChannels,
    StoreClosed,
    StoreUnavailable,
    classify,
    is_transient,
)
from biomero_importer.text import DESCRIPTION_LIMIT, safe_json, safe_text

log = structlog.get_logger(__name__)

T = TypeVar("T")

FINISH_BATCH = 500
# A batch of endings starts no sooner than this after the previous one: under load, endings
# that arrive one at a time share a statement, while an ending after a quiet spell is written
# at once. (pgqueuer 1.6 holds its acknowledgements up to 100 ms: JobStatusLogBuffer in
# pgqueuer/core/buffers.py.)
FINISH_PACE_SECONDS = 0.01
# orders one wake_waiting statement makes due
WAKE_BATCH = 1000
# Seconds one progress write may take: it is one attempt, made for people watching.
PROGRESS_TIMEOUT = 2.0
UNRECORDABLE = "The importer could not record this order's result; see its logs"


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """What a connection back from a store call needs before the next one: no statement.

    asyncpg's default reset costs a round trip per release (``pg_advisory_unlock_all(); CLOSE
    ALL; UNLISTEN *; RESET ALL``) for session state this service never leaves on a pooled
    connection: no advisory lock (the migration's is taken on a connection of its own), no
    cursor (every read is a fetch), no LISTEN (the wake-up channel has its own connection,
    outside the pool), no SET (the one setting, the requeue flag, is ``set_config(..., true)``:
    it ends with its transaction). Before calling this, the pool already rolls back a
    transaction left open and drops listener callbacks; the check below is for an asyncpg
    that does not, and costs no round trip otherwise."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class PostgresStore(OrderStore):
    def __init__(
        self,
        dsn: str,
        *,
        worker_id: str = "",
        lease_seconds: float = 60.0,
        pool_size: int = 4,
        retry: bool = True,
        connect_timeout: float = 10.0,
        max_running_per_user: int | None = None,
    ) -> None:
        self.dsn = dsn
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        #: claims never take a user past this many running orders (all replicas together)
        self.max_running_per_user = max_running_per_user
        self.pool_size = pool_size
        # one-off commands (the CLI) report an outage at once instead of waiting it out
        self.retry_transient = retry
        self.connect_timeout = connect_timeout
        self._pool: asyncpg.Pool | None = None
        self._closing = asyncio.Event()
        self._finish_queue: asyncio.Queue[tuple[Finish, asyncio.Future[bool]]] = asyncio.Queue()
        self.healthy = True
        self.healthy_since = time.monotonic()
        self._last_outage_log = 0.0
        self._serving = False
        # progress writes failing since the last one that worked: logged once per outage
        self._progress_failing = False
        self.progress_timeout = PROGRESS_TIMEOUT
        # outbox rows from before per-channel delivery were given their channels
        self._adopted = False

    async def open(self) -> None:
        self._pool = await self._retry("connect", self._create_pool)

    async def _create_pool(self) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            # min_size=0: during an outage the pool would otherwise log a traceback at every
            # attempt to restore its connection floor
            self.dsn,
            min_size=0,
            max_size=self.pool_size,
            command_timeout=60,
            timeout=self.connect_timeout,
            reset=_reset_connection,
        )
        assert pool is not None
        return pool

    def stop_retrying(self) -> None:
        self._closing.set()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop retrying first (so nothing waits out an outage), give queued terminal writes
        ``timeout`` seconds, then close; what was not written is left to lease recovery."""
        self._closing.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._finish_queue.join(), timeout=timeout)
        while not self._finish_queue.empty():
            item, future = self._finish_queue.get_nowait()
            log.warning("finish_not_written", order_uuid=item.uuid, stage=item.stage)
            if not future.done():
                future.set_result(False)
            self._finish_queue.task_done()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=timeout)
            except asyncio.TimeoutError:
                self._pool.terminate()

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "store is not open"
        return self._pool

    def _set_health(self, ok: bool) -> None:
        if ok and not self.healthy:
            self.healthy_since = time.monotonic()
            log.info("database_available")
        self.healthy = ok

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        delay = 0.1
        while True:
            if self._closing.is_set() and what != "finish":
                raise StoreClosed(what)
            try:
                result = await call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if not self.retry_transient:
                    raise StoreUnavailable(f"{what}: {type(exc).__name__}") from exc
                if self._closing.is_set():
                    raise StoreClosed(what) from exc
                self._set_health(False)
                # Every waiting call backs off on its own; the outage is logged once per step.
                now = time.monotonic()
                if now - self._last_outage_log >= delay:
                    self._last_outage_log = now
                    log.warning(
                        "database_unavailable",
                        during=what,
                        error=type(exc).__name__,
                        retry_in=delay,
                    )
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), timeout=delay)
                delay = min(delay * 2, 5.0)
                continue
            self._set_health(True)
            return result

    # --- claiming -------------------------------------------------------------------------
    async def claim(self, slots: int) -> list[ClaimedOrder]:
        async def attempt() -> list[ClaimedOrder]:
            # one statement: the claim and its 'Import Started' rows (importer_claim)
            rows = await self.pool.fetch(
                sql.CLAIM, slots, self.worker_id, self.lease_seconds, self.max_running_per_user
            )
            return [_claimed_order(row) for row in rows]

        return await self._retry("claim", attempt)

    # --- stage writes ---------------------------------------------------------------------
    async def append_stage(
        self, uuid: str, stage: str, description: str | None = None, *, run: int
    ) -> bool:
        text = None if description is None else safe_text(description, DESCRIPTION_LIMIT)

        async def attempt() -> bool:
            row_id = await self.pool.fetchval(
                sql.APPEND_STAGE, uuid, self.worker_id, stage, text, None, run
            )
            return row_id is not None

        return await self._retry("append_stage", attempt)

    async def record_objects(self, uuid: str, objects: list[dict[str, Any]], *, run: int) -> None:
        payload = safe_json(objects)

        async def attempt() -> None:
            await self.pool.execute(sql.RECORD_OBJECTS, uuid, self.worker_id, payload, run)

        await self._retry("record_objects", attempt)

    async def record_progress(self, uuid: str, progress: Progress, *, run: int) -> bool:
        if self._closing.is_set():
            return False
        payload = safe_json(progress.as_json())
        try:
            status = await asyncio.wait_for(
                self.pool.execute(sql.RECORD_PROGRESS, uuid, self.worker_id, payload, run),
                timeout=self.progress_timeout,
            )
        except Exception as exc:
            # Whatever went wrong, the order goes on: the next write tries again.
            if not self._progress_failing:
                self._progress_failing = True
                log.warning(
                    "progress_not_recorded",
                    order_uuid=uuid,
                    kind=classify(exc).value,
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    note="logged once until a progress write works again",
                )
            return False
        if self._progress_failing:
            self._progress_failing = False
            log.info("progress_recorded_again")
        return bool(status == "UPDATE 1")

    async def finish(self, item: Finish) -> bool:
        if not self._serving:
            # No batched writer (a one-off command, or after close): write it directly.
            return (item.uuid, item.run) in await self._finish_batch([item])
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await self._finish_queue.put((item, future))
        return await future

    async def serve(self) -> None:
        """The batched finish writer: one statement for every terminal row waiting."""
        self._serving = True
        loop = asyncio.get_running_loop()
        previous = float("-inf")  # the first ending is written at once
        try:
            while True:
                batch = [await self._finish_queue.get()]
                written: set[tuple[str, int]] = set()
                try:
                    pause = previous + FINISH_PACE_SECONDS - loop.time()
                    if pause > 0 and not self._closing.is_set():
                        await asyncio.sleep(pause)
                    while not self._finish_queue.empty() and len(batch) < FINISH_BATCH:
                        batch.append(self._finish_queue.get_nowait())
                    previous = loop.time()
                    written = await self._finish_batch([item for item, _ in batch])
                finally:
                    # Every future is answered, whatever happened: no caller waits forever.
                    for item, future in batch:
                        if not future.done():
                            future.set_result((item.uuid, item.run) in written)
                        self._finish_queue.task_done()
        finally:
            self._serving = False

    async def _finish_batch(self, items: list[Finish]) -> set[tuple[str, int]]:
        """The (uuid, run) of every item written."""
        try:
            return await self._retry("finish", lambda: self._write_finishes(items))
        except StoreClosed:
            return set()
        except Exception as exc:
            if len(items) == 1:
                return await self._finish_unrecordable(items[0], exc)
            # One bad row must not fail the others: write them one by one.
            log.warning("finish_batch_failed", error=type(exc).__name__, orders=len(items))
            written: set[tuple[str, int]] = set()
            for item in items:
                written |= await self._finish_batch([item])
            return written

    async def _finish_unrecordable(self, item: Finish, exc: Exception) -> set[tuple[str, int]]:
        """The order's own result cannot be stored: fail it with a generic description."""
        log.error(
            "finish_failed",
            order_uuid=item.uuid,
            kind=classify(exc).value,
            error=f"{type(exc).__name__}: {exc}"[:500],
            exc_info=classify(exc) is ErrorKind.OTHER,
        )
        fallback = Finish(item.uuid, STAGE_INGEST_FAILED, UNRECORDABLE, run=item.run)
        try:
            return await self._retry("finish", lambda: self._write_finishes([fallback]))
        except Exception:
            log.exception("finish_fallback_failed", order_uuid=item.uuid)
            return set()

    async def _write_finishes(self, items: list[Finish]) -> set[tuple[str, int]]:
        rows = await self.pool.fetch(
            sql.FINISH_MANY,
            [i.uuid for i in items],
            [i.stage for i in items],
            [
                None if i.description is None else safe_text(i.description, DESCRIPTION_LIMIT)
                for i in items
            ],
            [None if i.file_names is None else safe_json(i.file_names) for i in items],
            [None if i.objects is None else safe_json(i.objects) for i in items],
            self.worker_id,
            [i.delay for i in items],
            [i.transient_retry for i in items],
            [i.settling for i in items],
            [i.wait_cause for i in items],
            [i.run for i in items],
        )
        return {(row["uuid"], row["runs"]) for row in rows}

    # --- leases, recovery, cancel ---------------------------------------------------------
    async def renew_leases(self, uuids: list[str]) -> dict[str, Lease]:
        try:
            rows = await asyncio.wait_for(
                self.pool.fetch(sql.RENEW_LEASES, self.worker_id, uuids, self.lease_seconds),
                timeout=max(0.5, self.lease_seconds / 3),
            )
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._set_health(False)
            raise StoreUnavailable(f"renew_leases: {type(exc).__name__}") from exc
        self._set_health(True)
        # Rows locked by another transaction were skipped, not lost: they come back owned but
        # not renewed, and are judged again next time.
        return {row["uuid"]: Lease(row["renewed"], row["cancel_requested"]) for row in rows}

    async def wake_waiting(self, cause: TransientKind) -> int:
        async def attempt() -> int:
            woken = 0
            while True:
                status = await self.pool.execute(sql.WAKE_WAITING, cause, WAKE_BATCH)
                count = int(status.split()[-1])
                woken += count
                if count < WAKE_BATCH:
                    break
            if woken:
                await self.pool.execute(sql.WAKE_CLAIMERS)
            return woken

        return await self._retry("wake_waiting", attempt)

    async def recover_expired(self, max_attempts: int) -> list[tuple[str, str]]:
        async def attempt() -> list[tuple[str, str]]:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(sql.RECOVER_EXPIRED, max_attempts, 100, self.worker_id)
            return [(row["uuid"], row["stage"]) for row in rows]

        return await self._retry("recover_expired", attempt)

    async def cancel_pending(self, uuid: str | None = None) -> list[str]:
        async def attempt() -> list[str]:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(sql.CANCEL_PENDING, uuid, 100)
            return [row["uuid"] for row in rows]

        return await self._retry("cancel_pending", attempt)

    async def queue_stats(self) -> tuple[int, float] | None:
        return await self._backlog(sql.QUEUE_STATS)

    async def _backlog(self, query: str) -> tuple[int, float] | None:
        """(rows waiting, counted up to QUEUE_STATS_CAP; age of the oldest), or None when
        the database did not answer: gauges skip a beat rather than wait out an outage."""
        try:
            row = await asyncio.wait_for(self.pool.fetchrow(query, sql.QUEUE_STATS_CAP), timeout=5)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._set_health(False)
            return None
        assert row is not None
        return int(row["pending"]), float(row["oldest_age"])

    async def ping(self) -> bool:
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), timeout=5)
        except Exception as exc:
            if not is_transient(exc):
                raise
            self._set_health(False)
            return False
        self._set_health(True)
        return True

    # --- writers, the CLI and the demo ----------------------------------------------------
    async def submit(self, order: NewOrder) -> None:
        async def attempt() -> None:
            async with self.pool.acquire() as conn, conn.transaction():
                pre_id = None
                spec = order.preprocessing
                if spec is not None:
                    pre_id = await conn.fetchval(
                        sql.INSERT_PREPROCESSING,
                        spec.container,
                        spec.input_file,
                        spec.output_folder,
                        spec.alt_output_folder,
                        json.dumps(spec.extra_params) if spec.extra_params else None,
                    )
                await conn.execute(
                    sql.INSERT_ORDER,
                    order.group,
                    order.user,
                    order.destination_id,
                    order.destination_type,
                    order.uuid,
                    order.files,
                    pre_id,
                    order.import_options,
                )

        await self._retry("submit", attempt)

    async def list_orders(
        self,
        *,
        user: str | None = None,
        group: str | None = None,
        stage: str | None = None,
        max_age_seconds: float | None = None,
        limit: int = 50,
    ) -> list[OrderSummary]:
        max_age = None if max_age_seconds is None else timedelta(seconds=max_age_seconds)
        rows = await self._retry(
            "list_orders",
            lambda: self.pool.fetch(sql.ORDER_STATUS, user, group, stage, max_age, limit),
        )
        return [_summary(row) for row in rows]

    async def order_detail(self, uuid: str) -> OrderDetail | None:
        row = await self._retry("order_detail", lambda: self.pool.fetchrow(sql.ORDER_DETAIL, uuid))
        return None if row is None else _detail(row)

    async def order_events(self, uuid: str, after_id: int = 0) -> list[OrderEvent]:
        rows = await self._retry(
            "order_events", lambda: self.pool.fetch(sql.ORDER_EVENTS, uuid, after_id)
        )
        return [OrderEvent(r["id"], r["timestamp"], r["stage"], r["description"]) for r in rows]

    async def order_state(self, uuid: str) -> OrderState | None:
        row = await self._retry("order_state", lambda: self.pool.fetchrow(sql.ORDER_STATE, uuid))
        if row is None:
            return None
        return OrderState(row["stage"], row["latest_id"], row["worker_id"], row["cancel_requested"])

    async def retry(self, uuid: str, note: str) -> str:
        async def attempt() -> str:
            async with self.pool.acquire() as conn, conn.transaction():
                current = await conn.fetchrow(sql.LOCK_ORDER, uuid)
                if current is None:
                    raise OrderNotFound(uuid)
                waiting = current["waiting"] and current["worker_id"] is None
                if current["stage"] not in TERMINAL_STAGES and not waiting:
                    raise OrderBusy(uuid, current["stage"])
                if waiting:
                    await conn.execute(sql.RETRY_WAITING, uuid)
                else:
                    await conn.execute(sql.ALLOW_REQUEUE)
                new_id = await conn.fetchval(sql.RETRY_ORDER, uuid, note)
                state = await conn.fetchrow(sql.ORDER_STATE, uuid)
                if state["stage"] != STAGE_NEW_ORDER or state["latest_id"] != new_id:
                    raise OrderBusy(uuid, state["stage"])
                return str(current["stage"])

        return await self._retry("retry", attempt)

    async def request_cancel(self, uuid: str) -> CancelResult:
        async def attempt() -> CancelResult:
            async with self.pool.acquire() as conn, conn.transaction():
                requested = await conn.fetchrow(sql.REQUEST_CANCEL, uuid)
                if requested is None:
                    state = await conn.fetchrow(sql.ORDER_STATE, uuid)
                    if state is None:
                        raise OrderNotFound(uuid)
                    raise OrderBusy(uuid, state["stage"])
                # The dispatcher's sweep would end a pending order too; doing it here means
                # it is cancelled even when no importer is running.
                pending = requested["stage"] == STAGE_NEW_ORDER and requested["worker_id"] is None
                cancelled = pending and bool(await conn.fetch(sql.CANCEL_PENDING, uuid, 1))
                return CancelResult(requested["stage"], cancelled)

        return await self._retry("request_cancel", attempt)

    # --- notifications (the outbox) -------------------------------------------------------
    async def record_channels(
        self, channels: list[str], endpoints: dict[str, str]
    ) -> list[ReplicaChannels]:
        async def attempt() -> list[ReplicaChannels]:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    sql.RECORD_CHANNELS, self.worker_id, channels, json.dumps(endpoints)
                )
            if not self._adopted:
                # outcomes from before per-channel delivery, once per replica: after the
                # channels are recorded, so they owe what every later outcome owes
                await self.pool.execute(sql.ADOPT_LEGACY_OUTBOX)
                self._adopted = True
            return [_replica(row) for row in rows]

        return await self._retry("record_channels", attempt)

    async def channel_replicas(self) -> list[ReplicaChannels]:
        async def attempt() -> list[ReplicaChannels]:
            return [_replica(row) for row in await self.pool.fetch(sql.CHANNEL_REPLICAS)]

        return await self._retry("channel_replicas", attempt)

    async def claim_deliveries(
        self, channel: str, limit: int, lease_seconds: float
    ) -> list[Delivery]:
        async def attempt() -> list[Delivery]:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(
                    sql.CLAIM_DELIVERIES, channel, limit, lease_seconds, self.worker_id
                )
            return [Delivery(_notification(row), row["channel"], row["generation"]) for row in rows]

        return await self._retry("claim_deliveries", attempt)

    async def record_delivery(self, result: DeliveryResult) -> bool:
        error = None if result.error is None else safe_text(result.error, 500)
        settled = result.result != "retry"

        async def attempt() -> bool:
            async with self.pool.acquire() as conn, conn.transaction():
                if settled:
                    await conn.execute(sql.LOCK_OUTBOX_ROW, result.id)
                recorded = await conn.fetchval(
                    sql.RECORD_DELIVERY,
                    result.id,
                    result.channel,
                    result.token,
                    result.result,
                    result.retry_in,
                    error,
                )
                if recorded is None:
                    return False
                if settled:
                    what = (
                        result.channel
                        if result.result == "delivered"
                        else f"{result.channel}:failed"
                    )
                    note = None if error is None else f"{result.channel}: {error}"
                    await conn.execute(sql.SETTLE_OUTBOX, result.id, what, note)
                return True

        return await self._retry("record_delivery", attempt)

    async def orphaned_deliveries(self, older_than: float, limit: int) -> list[Orphan]:
        async def attempt() -> list[Orphan]:
            rows = await self.pool.fetch(sql.ORPHANED_DELIVERIES, older_than, limit)
            return [
                Orphan(r["outbox_id"], r["channel"], r["generation"], r["uuid"], r["event_id"])
                for r in rows
            ]

        return await self._retry("orphaned_deliveries", attempt)

    async def order_deliveries(self, uuid: str) -> list[ChannelState]:
        async def attempt() -> list[ChannelState]:
            rows = await self.pool.fetch(sql.ORDER_DELIVERIES, uuid)
            return [
                ChannelState(
                    channel=row["channel"],
                    event_id=row["event_id"],
                    stage=row["stage"],
                    queued_at=row["created_at"],
                    attempts=row["attempts"],
                    due_at=row["due_at"],
                    last_error=row["last_error"],
                    delivered_at=row["delivered_at"],
                    given_up_at=row["given_up_at"],
                )
                for row in rows
            ]

        return await self._retry("order_deliveries", attempt)

    async def prune_notifications(self, older_than: float, batch: int = 1000) -> int:
        async def attempt() -> int:
            status = await self.pool.execute(sql.PRUNE_NOTIFICATIONS, older_than, batch)
            return int(status.split()[-1])

        return await self._retry("prune_notifications", attempt)

    async def notification_stats(self) -> tuple[int, float] | None:
        return await self._backlog(sql.NOTIFICATION_STATS)


_UNREADABLE = object()


def _json(text: str | None) -> Any:
    """Parsed JSON; None for NULL; _UNREADABLE for what Python cannot parse. It never raises:
    a claim is committed before its rows are parsed, and one order's column must not undo it."""
    if text is None:
        return None
    try:
        return json.loads(text)
    # RecursionError: PostgreSQL's json type takes nesting deeper than Python's parser follows
    except (json.JSONDecodeError, TypeError, RecursionError):
        return _UNREADABLE


def _preprocessing(row: asyncpg.Record) -> tuple[PreprocessingSpec | None, str | None]:
    if row["preprocessing_id"] is None:
        return None, None
    problem = None
    # JSON null (as some writers store "no parameters") counts as none
    extra = _json(row["extra_params"])
    if extra is not _UNREADABLE and not extra:
        extra = {}
    if not isinstance(extra, dict):
        problem = "Preprocessing extra_params must be a JSON object"
        extra = {}
    spec = PreprocessingSpec(
        id=row["preprocessing_id"],
        container=row["container"] or "",
        input_file=row["input_file"] or "",
        output_folder=row["output_folder"] or "",
        alt_output_folder=row["alt_output_folder"],
        extra_params=extra,
    )
    return spec, problem


def _claimed_order(row: asyncpg.Record) -> ClaimedOrder:
    preprocessing, problem = _preprocessing(row)
    recorded = _json(row["objects"])
    return ClaimedOrder(
        uuid=row["uuid"],
        group_name=row["group_name"],
        user_name=row["user_name"],
        destination_id=row["destination_id"],
        destination_type=row["destination_type"],
        files=row["files"],
        file_names=row["file_names"],
        preprocessing_id=row["preprocessing_id"],
        preprocessing=preprocessing,
        attempt=row["attempts"],
        runs=row["runs"],
        queued_at=row["queued_at"],
        recorded_objects=recorded if isinstance(recorded, list) else [],
        preprocessing_problem=problem,
        import_options=row["import_options"],
        retries=row["retries"],
        waiting_since=row["waiting_since"],
        not_before=row["not_before"],
    )


def _summary(row: asyncpg.Record) -> OrderSummary:
    return OrderSummary(
        uuid=row["uuid"],
        stage=row["stage"],
        updated_at=row["updated_at"],
        worker_id=row["worker_id"],
        user_name=row["user_name"],
        group_name=row["group_name"],
        destination_type=row["destination_type"],
        destination_id=row["destination_id"],
        files=row["files"],
        description=row["description"],
        # any SQL client can write the column: what is not a progress record reads as none
        progress=Progress.from_json(_json(row["progress"]), row["progress_at"]),
    )


def _detail(row: asyncpg.Record) -> OrderDetail:
    preprocessing, _ = _preprocessing(row)
    objects = _json(row["objects"])
    extra = _json(row["extra_params"])
    return OrderDetail(
        summary=_summary(row),
        latest_id=row["latest_id"],
        queued_at=row["queued_at"],
        last_worker_id=row["last_worker_id"],
        lease_expires_at=row["lease_expires_at"],
        attempts=row["attempts"],
        runs=row["runs"],
        cancel_requested=row["cancel_requested"],
        objects=[o for o in objects if isinstance(o, dict)] if isinstance(objects, list) else [],
        file_names=row["file_names"],
        preprocessing=preprocessing,
        raw_extra_params=None if extra is _UNREADABLE else extra,
        import_options=row["import_options"],
        not_before=row["not_before"],
        waiting_since=row["waiting_since"],
        retries=row["retries"],
        waiting=row["waiting"],
        wait_cause=row["wait_cause"],
    )


def _replica(row: asyncpg.Record) -> ReplicaChannels:
    endpoints = _json(row["endpoints"])
    return ReplicaChannels(
        row["worker_id"],
        tuple(row["channels"]),
        {str(k): str(v) for k, v in endpoints.items()} if isinstance(endpoints, dict) else {},
    )


def _notification(row: asyncpg.Record) -> Notification:
    objects = _json(row["objects"])
    return Notification(
        id=row["id"],
        uuid=row["uuid"],
        event_id=row["event_id"],
        stage=row["stage"],
        attempts=row["attempts"],
        age_seconds=row["age"],
        user=row["user_name"],
        group=row["group_name"],
        destination_type=row["destination_type"],
        destination_id=row["destination_id"],
        description=row["description"],
        objects=[o for o in objects if isinstance(o, dict)] if isinstance(objects, list) else [],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )
