"""Keeps the replica's long-lived helpers alive, and says so when one cannot be kept alive.

Every helper (claim loop, leases, recovery, finish writer, listener, health watcher, metrics
server, loop-lag probe) runs in one anyio task group owned by the dispatcher. A helper that
raises is logged once with its traceback and started again after a backoff; one that fails
``max_failures`` times within ``window`` seconds is reported failing: ``/healthz`` answers
503 naming it and the replica stops claiming until it has run ``window`` seconds clean.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import structlog

log = structlog.get_logger(__name__)


@dataclass
class HelperRecord:
    failures: list[float] = field(default_factory=list)
    restarts: int = 0


@dataclass
class Supervisor:
    max_failures: int = 5
    window: float = 60.0
    backoff_start: float = 0.1
    backoff_max: float = 10.0
    clock: Callable[[], float] = time.monotonic
    helpers: dict[str, HelperRecord] = field(default_factory=dict)

    def failing(self) -> list[str]:
        """Helpers that failed ``max_failures`` times within the last ``window`` seconds."""
        now = self.clock()
        names = []
        for name, record in self.helpers.items():
            recent = [t for t in record.failures if now - t < self.window]
            record.failures = recent
            if len(recent) >= self.max_failures:
                names.append(name)
        return sorted(names)

    async def keep_running(
        self,
        name: str,
        helper: Callable[[], Awaitable[None]],
        *,
        until: asyncio.Event | None = None,
    ) -> None:
        """Run ``helper`` until cancelled (or, when it returns, until ``until`` is set)."""
        record = self.helpers.setdefault(name, HelperRecord())
        delay = self.backoff_start
        while True:
            started = self.clock()
            try:
                await helper()
            except Exception:
                log.exception("helper_failed", helper=name, restart_in=delay)
            else:
                if until is not None and until.is_set():
                    return
                # Helpers loop forever: one that returns has stopped working all the same.
                log.error("helper_exited", helper=name, restart_in=delay)
            now = self.clock()
            if now - started > self.window:
                delay = self.backoff_start
            record.failures.append(now)
            record.restarts += 1
            await anyio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)
