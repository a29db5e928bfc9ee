"""Waits that end when their cause ends: OMERO, shared storage, the container runtime.

An order that fails for a reason that passes waits on that cause (``Finish.wait_cause``). The
replica then probes the cause itself (one probe per cause and replica, backing off) instead of
claiming orders to find out whether it is back: while the probe says it is down, an order
that needs it is handed back to wait without being tried. When the probe answers again, every
order waiting on the cause becomes due at once (``OrderStore.wake_waiting``) and the claims,
paced by the free slots, take them in their fair order. Each order's own backoff stays as its
fallback due time, and covers failures no probe can see.

A failure only makes the cause *suspect*: the first probe runs at once, and a cause that
answers it was never down (the failure was the order's own, say one connection lost), so
nobody is woken and that order's backoff runs its course. Only a probe that fails makes the
cause *down*. Nothing probes while every cause is up.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import structlog

from biomero_importer.model import ClaimedOrder, TransientKind
from biomero_importer.observability.health import HealthState
from biomero_importer.observability.metrics import Metrics

log = structlog.get_logger(__name__)

#: A probe of one cause: None when it answers, else why not (short, for logs and /healthz).
Probe = Callable[[], Awaitable[str | None]]

# An order claimed while its cause is down waits at most this long for a probe already under
# way (or one it starts because the last is older than the backoff) before it is handed back.
PROBE_WAIT = 2.0
# Probes of replicas that saw the same outage spread over ±this fraction of their backoff.
JITTER = 0.2


class Status(enum.Enum):
    UP = "up"
    #: an order failed on it; the first probe (at once) decides
    SUSPECT = "suspect"
    #: a probe failed: orders that need it are not tried
    DOWN = "down"


@dataclass
class Cause:
    kind: TransientKind
    probe: Probe
    status: Status = Status.UP
    #: why the last probe failed
    reason: str | None = None
    #: the failure of the order that made it suspect: what held orders say when they give up
    failure: str | None = None
    #: epoch seconds it went down
    down_since: float | None = None
    #: monotonic time the last probe ended
    probed_at: float = float("-inf")
    probing: asyncio.Task[str | None] | None = None
    needed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Causes:
    """The replica's view of its dependencies, and the probe loop for each."""

    probes: Mapping[TransientKind, Probe]
    #: makes the orders waiting on a cause due now; returns how many
    wake_waiting: Callable[[TransientKind], Awaitable[int]]
    #: tells the claim loop to look for work (the orders just made due)
    on_wake: Callable[[], None]
    metrics: Metrics
    health: HealthState
    backoff: float = 5.0
    backoff_max: float = 60.0
    rng: random.Random = field(default_factory=random.Random)
    causes: dict[TransientKind, Cause] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, probe in self.probes.items():
            self.causes[kind] = Cause(kind, probe)
            self.metrics.dependency_down.labels(cause=kind).set(0)

    # --- what the dispatcher tells and asks -------------------------------------------------
    def failed(self, kind: TransientKind, reason: str | None) -> None:
        """An order met ``kind`` failing: probe it (unless it is being probed already)."""
        cause = self.causes.get(kind)
        if cause is None or cause.status is not Status.UP:
            return
        cause.status = Status.SUSPECT
        cause.failure = reason
        cause.needed.set()

    def needs(self, order: ClaimedOrder) -> tuple[TransientKind, ...]:
        """What running ``order`` would touch: storage and OMERO always, the container runtime
        only for an order with preprocessing (known from its row, before anything runs)."""
        if order.preprocessing_id is None and order.preprocessing is None:
            return ("storage", "omero")
        return ("storage", "container_runtime", "omero")

    async def holding(self, order: ClaimedOrder) -> Cause | None:
        """The down cause ``order`` needs, or None when it may run.

        A cause last probed more than ``backoff`` ago is probed again first (at most once
        per ``backoff``, shared by every order asking): another replica may have seen it come
        back and woken the orders, and they must not be sent back to wait on a stale view.
        """
        for kind in self.needs(order):
            cause = self.causes.get(kind)
            if cause is None or cause.status is not Status.DOWN:
                continue
            if cause.probing is not None or time.monotonic() - cause.probed_at >= self.backoff:
                task = self._probe(cause)
                await asyncio.wait([task], timeout=PROBE_WAIT)
            if cause.status is Status.DOWN:
                return cause
        return None

    def down(self) -> dict[str, dict[str, object]]:
        """The causes down now, for /healthz."""
        return {
            kind: {"since": cause.down_since, "reason": cause.reason}
            for kind, cause in self.causes.items()
            if cause.status is Status.DOWN
        }

    # --- probing ----------------------------------------------------------------------------
    def helpers(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """One supervised loop per cause: a probe that hangs delays no other cause."""
        return {f"probe-{kind}": self._loop_for(cause) for kind, cause in self.causes.items()}

    def _loop_for(self, cause: Cause) -> Callable[[], Awaitable[None]]:
        async def loop() -> None:
            await self.watch(cause)

        return loop

    async def watch(self, cause: Cause) -> None:
        """Idle (an event wait) while the cause is up; probe with backoff while it is not."""
        while True:
            await cause.needed.wait()
            delay = self.backoff
            while cause.status is not Status.UP:
                if await self._probe(cause) is None:
                    break
                await asyncio.sleep(delay * self.rng.uniform(1 - JITTER, 1 + JITTER))
                delay = min(delay * 2, self.backoff_max)
            cause.needed.clear()

    def _probe(self, cause: Cause) -> asyncio.Task[str | None]:
        """The probe under way, or a new one: never two of one cause at a time."""
        if cause.probing is None:
            cause.probing = asyncio.create_task(self._probe_once(cause), name=f"probe-{cause.kind}")
            cause.probing.add_done_callback(_retrieve)
        return cause.probing

    async def _probe_once(self, cause: Cause) -> str | None:
        try:
            reason = await cause.probe()
            cause.probed_at = time.monotonic()
            self.metrics.dependency_probes.labels(
                cause=cause.kind, result="down" if reason else "up"
            ).inc()
            if reason is None:
                await self._came_up(cause)
            elif cause.status is not Status.DOWN:
                cause.status = Status.DOWN
                cause.down_since = time.time()
                self.metrics.dependency_down.labels(cause=cause.kind).set(1)
                log.warning("dependency_down", cause=cause.kind, reason=reason)
            if reason is not None:
                cause.reason = reason
            self.health.dependencies_down = self.down()
            return reason
        finally:
            cause.probing = None

    async def _came_up(self, cause: Cause) -> None:
        if cause.status is Status.DOWN:
            # Woken before it is marked up: should waking fail (the database away), the
            # cause stays down and the next probe that answers wakes them again.
            woken = await self.wake_waiting(cause.kind)
            since = cause.down_since or time.time()
            down_for = round(time.time() - since, 1)
            log.info("dependency_up", cause=cause.kind, down_for=down_for, woken=woken)
            self.on_wake()
        else:
            # The order's own failure (one lost connection), not an outage: its backoff runs on.
            log.info("dependency_answers", cause=cause.kind, note="no outage, waits run on")
        cause.status = Status.UP
        cause.reason = None
        cause.down_since = None
        self.metrics.dependency_down.labels(cause=cause.kind).set(0)


def _retrieve(task: asyncio.Task[str | None]) -> None:
    """A probe that broke fails its loop (the supervisor logs and restarts it); it is noted
    here too, as an order may have been the only one waiting for it."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("dependency_probe_failed", task=task.get_name(), error=repr(task.exception()))
