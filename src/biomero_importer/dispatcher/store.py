"""The dispatcher's view of the database: claim, stage writes, leases, recovery, cancel.

Every call retries on connection loss (PostgreSQL restarts, terminated backends) with
backoff, logging once per backoff step rather than once per failed query.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import structlog

from biomero_importer.db import sql
from biomero_importer.model import ClaimedOrder, PreprocessingSpec

log = structlog.get_logger(__name__)

T = TypeVar("T")

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    # A pooled connection that received the server's shutdown FATAL while idle fails its next
    # query with "cannot switch to state 12; another operation (2) is in progress"; the pool
    # drops that connection, so the retry gets a fresh one.
    asyncpg.exceptions.InternalClientError,
    OSError,
    asyncio.TimeoutError,
)


class StoreClosed(Exception):
    """The store gave up retrying because the service is stopping."""


@dataclass(frozen=True)
class Finish:
    """A terminal stage (or a hand-back to 'Import Pending') for an owned order."""

    uuid: str
    stage: str
    description: str | None
    file_names: list[str] | None = None
    objects: list[dict[str, Any]] | None = None


class OrderStore:
    def __init__(self, dsn: str, *, worker_id: str, lease_seconds: float, pool_size: int) -> None:
        self.dsn = dsn
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._closing = asyncio.Event()
        self._finish_queue: asyncio.Queue[tuple[Finish, asyncio.Future[bool]]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.healthy = True
        # when the database last came back (or the store opened): leases are not judged
        # until owners have had a lease period to renew theirs
        self.healthy_since = time.monotonic()
        self._last_outage_log = 0.0

    async def open(self) -> None:
        self._pool = await self._retry("connect", self._create_pool)
        self._writer = asyncio.create_task(self._finish_writer(), name="finish-writer")

    async def _create_pool(self) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            # min_size=0: during an outage the pool would otherwise log a traceback at every
            # attempt to restore its connection floor
            self.dsn,
            min_size=0,
            max_size=self.pool_size,
            command_timeout=60,
        )
        assert pool is not None
        return pool

    async def close(self) -> None:
        """Flush queued stage writes, then close the pool."""
        if self._writer is not None:
            await self._finish_queue.join()
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        self._closing.set()
        if self._pool is not None:
            await self._pool.close()

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
            try:
                result = await call()
            except TRANSIENT_ERRORS as exc:
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
        """Claim up to ``slots`` pending orders and append their 'Import Started' rows."""

        async def attempt() -> list[ClaimedOrder]:
            async with self.pool.acquire() as conn, conn.transaction():
                claimed = await conn.fetch(sql.CLAIM, slots, self.worker_id, self.lease_seconds)
                if not claimed:
                    return []
                started = await conn.fetch(sql.INSERT_STARTED, [r["latest_id"] for r in claimed])
            by_uuid = {row["uuid"]: row for row in claimed}
            return [_claimed_order(row, by_uuid[row["uuid"]]) for row in started]

        return await self._retry("claim", attempt)

    # --- stage writes ---------------------------------------------------------------------
    async def append_stage(self, uuid: str, stage: str, description: str | None = None) -> bool:
        """Append a non-terminal stage row; False when this replica no longer owns the order."""

        async def attempt() -> bool:
            row_id = await self.pool.fetchval(
                sql.APPEND_STAGE, uuid, self.worker_id, stage, description, None
            )
            return row_id is not None

        return await self._retry("append_stage", attempt)

    async def record_objects(self, uuid: str, objects: list[dict[str, Any]]) -> None:
        payload = json.dumps(objects)

        async def attempt() -> None:
            await self.pool.execute(sql.RECORD_OBJECTS, uuid, self.worker_id, payload)

        await self._retry("record_objects", attempt)

    async def finish(self, item: Finish) -> bool:
        """Queue a terminal write; True once written, False if ownership was lost."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await self._finish_queue.put((item, future))
        return await future

    async def _finish_writer(self) -> None:
        """Write queued terminal rows in batches: one statement for everything that is waiting."""
        while True:
            batch = [await self._finish_queue.get()]
            while not self._finish_queue.empty() and len(batch) < 500:
                batch.append(self._finish_queue.get_nowait())
            try:
                written = await self._write_finishes([item for item, _ in batch])
            except StoreClosed:
                written = set()
            for item, future in batch:
                if not future.done():
                    future.set_result(item.uuid in written)
                self._finish_queue.task_done()

    async def _write_finishes(self, items: list[Finish]) -> set[str]:
        args = (
            [i.uuid for i in items],
            [i.stage for i in items],
            [i.description for i in items],
            [json.dumps(i.file_names) if i.file_names is not None else None for i in items],
            [json.dumps(i.objects) if i.objects is not None else None for i in items],
            self.worker_id,
        )

        async def attempt() -> set[str]:
            rows = await self.pool.fetch(sql.FINISH_MANY, *args)
            return {row["uuid"] for row in rows}

        return await self._retry("finish", attempt)

    # --- leases, recovery, cancel ---------------------------------------------------------
    async def renew_leases(self, uuids: list[str]) -> dict[str, bool]:
        """Extend our leases; returns {uuid: cancel_requested} for the orders we still own."""

        async def attempt() -> dict[str, bool]:
            rows = await self.pool.fetch(
                sql.RENEW_LEASES, self.worker_id, uuids, self.lease_seconds
            )
            return {row["uuid"]: row["cancel_requested"] for row in rows}

        return await self._retry("renew_leases", attempt)

    async def recover_expired(self, max_attempts: int) -> list[tuple[str, str]]:
        async def attempt() -> list[tuple[str, str]]:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(sql.RECOVER_EXPIRED, max_attempts, 100)
            return [(row["uuid"], row["stage"]) for row in rows]

        return await self._retry("recover_expired", attempt)

    async def cancel_pending(self, uuid: str | None = None) -> list[str]:
        async def attempt() -> list[str]:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(sql.CANCEL_PENDING, uuid)
            return [row["uuid"] for row in rows]

        return await self._retry("cancel_pending", attempt)

    async def queue_stats(self) -> tuple[int, float] | None:
        """Backlog size and age of the oldest pending order; None (no retry) when unreachable:
        the health check calls this and must report an outage, not wait it out."""
        try:
            row = await asyncio.wait_for(self.pool.fetchrow(sql.QUEUE_STATS), timeout=5)
        except TRANSIENT_ERRORS:
            self._set_health(False)
            return None
        assert row is not None
        return int(row["pending"]), float(row["oldest_age"])

    async def ping(self) -> bool:
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), timeout=5)
        except TRANSIENT_ERRORS:
            self._set_health(False)
            return False
        self._set_health(True)
        return True


def _claimed_order(started: asyncpg.Record, claim: asyncpg.Record) -> ClaimedOrder:
    preprocessing = None
    problem = None
    if started["preprocessing_id"] is not None:
        # JSON null (as some writers store "no parameters") counts as none
        extra = json.loads(started["extra_params"] or "null") or {}
        if not isinstance(extra, dict):
            problem = "Preprocessing extra_params must be a JSON object"
            extra = {}
        preprocessing = PreprocessingSpec(
            id=started["preprocessing_id"],
            container=started["container"] or "",
            input_file=started["input_file"] or "",
            output_folder=started["output_folder"] or "",
            alt_output_folder=started["alt_output_folder"],
            extra_params=extra,
        )
    recorded = json.loads(claim["objects"]) if claim["objects"] else []
    return ClaimedOrder(
        uuid=started["uuid"],
        group_name=started["group_name"],
        user_name=started["user_name"],
        destination_id=started["destination_id"],
        destination_type=started["destination_type"],
        files=started["files"],
        file_names=started["file_names"],
        preprocessing_id=started["preprocessing_id"],
        preprocessing=preprocessing,
        attempt=claim["attempts"],
        runs=claim["runs"],
        queued_at=claim["queued_at"],
        recorded_objects=recorded if isinstance(recorded, list) else [],
        preprocessing_problem=problem,
        import_options=started["import_options"],
    )
