"""The wake-up channel: one dedicated LISTEN connection, health-checked and reconnected.

NOTIFY is only a hint; the table is the truth. Whenever the connection is (re)established
the dispatcher is woken at once, because notifications sent meanwhile are lost.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog

from biomero_importer.db.sql import CANCEL_PREFIX
from biomero_importer.store import is_transient

log = structlog.get_logger(__name__)


class Listener:
    def __init__(
        self,
        dsn: str,
        channel: str,
        *,
        on_pending: Callable[[str], None],
        on_cancel: Callable[[str], None],
        on_reconnect: Callable[[], None],
        health_interval: float = 5.0,
    ) -> None:
        self.dsn = dsn
        self.channel = channel
        self.on_pending = on_pending
        self.on_cancel = on_cancel
        self.on_reconnect = on_reconnect
        self.health_interval = health_interval
        self.connected = False
        self.reconnects = 0
        self._probe = f"probe:{uuidlib.uuid4().hex}"
        self._probe_seen = asyncio.Event()
        self._lost = asyncio.Event()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload == self._probe:
            self._probe_seen.set()
        elif payload.startswith(CANCEL_PREFIX):
            self.on_cancel(payload[len(CANCEL_PREFIX) :])
        elif not payload.startswith("probe:"):
            self.on_pending(payload)

    def _on_terminate(self, _conn: Any) -> None:
        self._lost.set()

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with backoff whenever the connection dies."""
        delay = 0.1
        first = True
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                self._lost.clear()
                conn.add_termination_listener(self._on_terminate)
                await conn.add_listener(self.channel, self._on_notify)
                self.connected = True
                if not first:
                    self.reconnects += 1
                    log.info("listener_reconnected", channel=self.channel)
                first = False
                delay = 0.1
                self.on_reconnect()
                await self._watch(conn)
            except Exception as exc:
                # anything else is the supervisor's to log and restart
                if not is_transient(exc):
                    raise
                log.warning("listener_lost", error=type(exc).__name__, retry_in=delay)
            finally:
                self.connected = False
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is gone: terminated, or silent to its own probe."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), timeout=self.health_interval)
            except asyncio.TimeoutError:
                pass
            else:
                raise ConnectionResetError("listener connection terminated")
            self._probe_seen.clear()
            # A NOTIFY to ourselves proves the whole path (server, socket, LISTEN) still works.
            await asyncio.wait_for(
                conn.execute("SELECT pg_notify($1, $2)", self.channel, self._probe), timeout=5
            )
            await asyncio.wait_for(self._probe_seen.wait(), timeout=5)
