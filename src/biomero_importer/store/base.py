"""The one interface to orders: claimed, written and read by the dispatcher, CLI and demo.

Two implementations share these semantics: :class:`~.postgres.PostgresStore` (asyncpg, the
service and the CLI) and :class:`~.memory.MemoryStore` (a dict and a clock, for the unit tier).
The behavioural tests in ``tests/store`` run against both.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg

from biomero_importer.model import (
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


class StoreClosed(Exception):
    """The store gave up because the service is stopping."""


class StoreUnavailable(Exception):
    """The database did not answer; the call was not retried (leases, health checks)."""


class OrderNotFound(Exception):
    def __init__(self, uuid: str) -> None:
        super().__init__(f"no order with uuid {uuid}")
        self.uuid = uuid


class OrderBusy(Exception):
    """The order is not in a stage that allows the request (``stage`` says which it is)."""

    def __init__(self, uuid: str, stage: str) -> None:
        super().__init__(f"order {uuid} is {stage}")
        self.uuid = uuid
        self.stage = stage


@dataclass(frozen=True)
class Finish:
    """A terminal stage (or a hand-back to 'Import Pending') for an owned order."""

    uuid: str
    #: the claim's run number (``ClaimedOrder.runs``): with the worker id, the fencing token
    run: int = field(kw_only=True)
    stage: str
    description: str | None
    file_names: list[str] | None = None
    objects: list[dict[str, Any]] | None = None
    #: a hand-back that waits: not claimed again for this many seconds (database clock)
    delay: float | None = None
    #: the wait is an automatic retry of a transient failure: ``retries`` goes up by one
    transient_retry: bool = False
    #: the wait is for files to settle: ``waiting_since`` is set unless it already is (any
    #: other finish clears it: that run got past the settle check)
    settling: bool = False
    #: a wait because this dependency is down: ``wake_waiting(cause)`` makes the order due
    #: as soon as it answers again (``delay`` stays the fallback due time)
    wait_cause: TransientKind | None = None


#: what one attempt at one channel came to
DeliveryOutcome = Literal["delivered", "given_up", "retry"]


@dataclass(frozen=True)
class Delivery:
    """One channel of one outcome, claimed for one attempt. ``token`` is the claim's
    generation: the attempt is recorded only under it (a fencing token)."""

    note: Notification
    channel: str
    token: int


@dataclass(frozen=True)
class DeliveryResult:
    """What one attempt did: ``retry`` makes the channel due again in ``retry_in`` seconds."""

    id: int
    channel: str
    token: int
    result: DeliveryOutcome
    retry_in: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class ChannelState:
    """One channel the order's latest outcome owes, as ``show`` lists it."""

    channel: str
    event_id: int
    stage: str
    queued_at: datetime
    attempts: int
    due_at: datetime | None
    last_error: str | None
    delivered_at: datetime | None
    given_up_at: datetime | None


@dataclass(frozen=True)
class Orphan:
    """A delivery no replica can make: its channel is configured nowhere any more."""

    id: int
    channel: str
    token: int
    uuid: str
    event_id: int


@dataclass(frozen=True)
class ReplicaChannels:
    """The notification channels one replica recorded, and where each points (no secrets)."""

    worker_id: str
    channels: tuple[str, ...]
    endpoints: dict[str, str]


@dataclass(frozen=True)
class Lease:
    """An owned order's lease after a renewal round."""

    #: False when another transaction held the row: still ours, judged again next round
    renewed: bool
    cancel_requested: bool


@dataclass(frozen=True)
class CancelResult:
    """``cancelled``: ended before it started; otherwise its importer will stop it."""

    stage: str
    cancelled: bool


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"  # the database or the connection: retry the same statement
    DATA = "data"  # this row's values: the order fails, nothing else does
    OTHER = "other"  # not understood: log, fail the order, keep serving


# Connection-level failures and the errors a healthy database returns while it is busy,
# failing over or resolving contention: the same statement succeeds later.
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # admin shutdown, "cannot connect now", statement and lock timeouts
    asyncpg.exceptions.OperatorInterventionError,
    # A pooled connection that received the server's shutdown FATAL while idle fails its next
    # query with "cannot switch to state 12; another operation (2) is in progress"; the pool
    # drops that connection, so the retry gets a fresh one.
    asyncpg.exceptions.InternalClientError,
    # serialization failures and deadlocks
    asyncpg.exceptions.TransactionRollbackError,
    # "too many clients", out of memory or disk: the server recovers, the statement is fine
    asyncpg.exceptions.InsufficientResourcesError,
    # a standby that was the primary a moment ago, until the pool reconnects to the new one
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.LockNotAvailableError,
    OSError,
    asyncio.TimeoutError,
)


def classify(exc: BaseException) -> ErrorKind:
    if isinstance(exc, _TRANSIENT):
        return ErrorKind.TRANSIENT
    if isinstance(exc, (asyncpg.exceptions.DataError, UnicodeError, ValueError)):
        return ErrorKind.DATA
    return ErrorKind.OTHER


def is_transient(exc: BaseException) -> bool:
    return classify(exc) is ErrorKind.TRANSIENT


class OrderStore(abc.ABC):
    """Everything the importer reads and writes about orders."""

    worker_id: str
    lease_seconds: float
    #: False while the database does not answer
    healthy: bool
    #: monotonic time the database last came back (leases are judged a lease period later)
    healthy_since: float

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self, timeout: float = 5.0) -> None:
        """Stop retrying at once, flush what can be written within ``timeout``, close."""

    @abc.abstractmethod
    def stop_retrying(self) -> None:
        """From now on calls that would wait out an outage raise StoreClosed instead."""

    async def serve(self) -> None:
        """Background work the store needs while the service runs (supervised by it)."""
        await asyncio.Event().wait()

    # --- the dispatcher ------------------------------------------------------------------
    @abc.abstractmethod
    async def claim(self, slots: int) -> list[ClaimedOrder]:
        """Claim up to ``slots`` pending orders and append their 'Import Started' rows."""

    @abc.abstractmethod
    async def append_stage(
        self, uuid: str, stage: str, description: str | None = None, *, run: int
    ) -> bool:
        """Append a non-terminal stage row; False unless claim ``run`` of this replica still
        owns the order. (Every write for a running order names its run: a run that lost the
        order writes nothing, even after the same replica claimed it again.)"""

    @abc.abstractmethod
    async def record_objects(
        self, uuid: str, objects: list[dict[str, Any]], *, run: int
    ) -> None: ...

    @abc.abstractmethod
    async def record_progress(self, uuid: str, progress: Progress, *, run: int) -> bool:
        """Best effort, one attempt and never waiting out an outage (progress is for people
        watching; it must not stall the order): True once written, False when the database
        did not answer or this replica does not own the running order."""

    @abc.abstractmethod
    async def finish(self, item: Finish) -> bool:
        """Write a terminal stage or hand-back; True once written, False if not owned."""

    @abc.abstractmethod
    async def renew_leases(self, uuids: list[str]) -> dict[str, Lease]:
        """One attempt, never waiting on another transaction's lock: the orders of ``uuids``
        this replica still owns. Raises StoreUnavailable when the database did not answer."""

    @abc.abstractmethod
    async def wake_waiting(self, cause: TransientKind) -> int:
        """Every order waiting on ``cause`` is due now (keeping its place in the queue), and
        the claimers get one wake-up; returns how many. Bounded statements (batches)."""

    @abc.abstractmethod
    async def recover_expired(self, max_attempts: int) -> list[tuple[str, str]]:
        """Take back orders whose lease expired: [(uuid, new stage)]."""

    @abc.abstractmethod
    async def cancel_pending(self, uuid: str | None = None) -> list[str]:
        """End pending orders whose cancel was requested (a bounded batch)."""

    @abc.abstractmethod
    async def queue_stats(self) -> tuple[int, float] | None:
        """(pending orders, capped; age of the oldest) or None when unreachable (no retry)."""

    @abc.abstractmethod
    async def ping(self) -> bool: ...

    # --- writers, the CLI and the demo ----------------------------------------------------
    @abc.abstractmethod
    async def submit(self, order: NewOrder) -> None:
        """Queue an order exactly as a SQL writer would (one 'Import Pending' row)."""

    @abc.abstractmethod
    async def list_orders(
        self,
        *,
        user: str | None = None,
        group: str | None = None,
        stage: str | None = None,
        max_age_seconds: float | None = None,
        limit: int = 50,
    ) -> list[OrderSummary]: ...

    @abc.abstractmethod
    async def order_detail(self, uuid: str) -> OrderDetail | None: ...

    @abc.abstractmethod
    async def order_events(self, uuid: str, after_id: int = 0) -> list[OrderEvent]: ...

    @abc.abstractmethod
    async def order_state(self, uuid: str) -> OrderState | None: ...

    @abc.abstractmethod
    async def retry(self, uuid: str, note: str) -> str:
        """Queue a finished order again, or make a waiting one due now (it keeps its place);
        appends an 'Import Pending' row with ``note`` and returns the stage it had. Raises
        OrderNotFound, or OrderBusy when it is neither finished nor waiting."""

    @abc.abstractmethod
    async def request_cancel(self, uuid: str) -> CancelResult:
        """Record a cancel request (a pending order ends at once). Raises OrderNotFound, or
        OrderBusy when it already finished."""

    # --- notifications (the outbox) -------------------------------------------------------
    @abc.abstractmethod
    async def record_channels(
        self, channels: list[str], endpoints: dict[str, str]
    ) -> list[ReplicaChannels]:
        """Record (or refresh) this replica's notification channels, from which the database
        decides what every later outcome owes; the other replicas seen within the hour."""

    @abc.abstractmethod
    async def channel_replicas(self) -> list[ReplicaChannels]:
        """Every replica seen within the hour, with its channels (for ``check``)."""

    @abc.abstractmethod
    async def claim_deliveries(
        self, channel: str, limit: int, lease_seconds: float
    ) -> list[Delivery]:
        """Up to ``limit`` due deliveries of ``channel``, oldest due first, none that another
        replica holds: each is leased (due again ``lease_seconds`` from now), its attempt
        counted and its generation raised before it is returned."""

    @abc.abstractmethod
    async def record_delivery(self, result: DeliveryResult) -> bool:
        """Record one attempt under its claim's token; False (nothing changed) when the row
        was claimed again since or is already settled. The outcome is done once every
        channel it owes is delivered or given up."""

    @abc.abstractmethod
    async def orphaned_deliveries(self, older_than: float, limit: int) -> list[Orphan]:
        """Up to ``limit`` unsettled deliveries of a channel no replica seen within the hour
        has, of outcomes queued more than ``older_than`` seconds ago."""

    @abc.abstractmethod
    async def order_deliveries(self, uuid: str) -> list[ChannelState]:
        """The channels the order's latest outcome owes, with their state."""

    @abc.abstractmethod
    async def prune_notifications(self, older_than: float, batch: int = 1000) -> int:
        """Delete up to ``batch`` rows done more than ``older_than`` seconds ago; how many."""

    @abc.abstractmethod
    async def notification_stats(self) -> tuple[int, float] | None:
        """(undelivered rows, capped; age of the oldest) or None when unreachable (no retry)."""
