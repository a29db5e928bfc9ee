"""Delivers queued outcome notifications: the replica's ``notifications`` helper.

The database decides which channels an outcome owes, once, when it is queued: every channel a
replica recorded (:meth:`OrderStore.record_channels`, at start and then every few seconds).
Each channel of each outcome is then delivered on its own: every channel this replica has runs
its own loop, which claims due deliveries of that channel only (a lease, and a fencing token
that the record checks), sends each as its own task, and records each the moment it settles.
So a dead SMTP server never delays a webhook, a channel this replica lacks is left to a
replica that has it, and a replica that comes back after its lease ran out changes nothing.

An attempt is cut off at half the lease, so a delivery is taken over only from a replica that
stopped; delivery is at least once per channel (a replica that dies between sending and
recording sends again after the lease, under the same ``webhook-id`` and Message-ID).

Every answer but a final one (410 Gone, a recipient refused for good, no valid address) is
tried again after a backoff that doubles from ``notify_retry_backoff`` to
``notify_retry_backoff_max``, jittered; a channel still failing ``notify_give_up_after``
after the outcome is given up. Given up is logged, counted and shown by ``show``.

Nothing here can hold up an order: the loops are their own tasks, HTTP uses asyncio streams
with a timeout, SMTP runs in threads of its own and OMERO address lookups in others.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog

from biomero_importer.model import Notification
from biomero_importer.notify.channels import DeliveryFailed, Mailer, Webhook, endpoint
from biomero_importer.notify.message import (
    email_message,
    outcome,
    valid_address,
    webhook_body,
    webhook_headers,
)
from biomero_importer.observability.metrics import Metrics, NotificationGiveUp
from biomero_importer.omero.port import OmeroError, OmeroGateway
from biomero_importer.settings import Settings, webhook_keys
from biomero_importer.store import (
    Delivery,
    DeliveryResult,
    OrderStore,
    ReplicaChannels,
    StoreClosed,
)

log = structlog.get_logger(__name__)

CHANNELS = ("webhook", "email")
# Sends of one channel in flight at once. SMTP sends are blocking: one thread each.
CONCURRENCY = {"webhook": 8, "email": 2}
LOOKUP_THREADS = 2
RETENTION = 7 * 24 * 3600.0
PRUNE_INTERVAL = 600.0
# how often the gauges are read and this replica's channels are recorded again
STATS_INTERVAL = 10.0
EMAIL_CACHE_SECONDS = 300.0
PAUSE_MAX = 60.0
ORPHANED = "no replica has had this channel for an hour"


def backoff(
    attempts: int,
    first: float,
    cap: float = 600.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds before the next attempt after ``attempts`` tries: doubling, capped, jittered
    (0.75-1.25x) so a receiver coming back is not hit by every row at once."""
    base: float = min(first * 2.0 ** min(max(attempts - 1, 0), 30), max(cap, first))
    return base * (0.75 + rand() / 2)


@dataclass
class Notifier:
    settings: Settings
    store: OrderStore
    gateway: OmeroGateway
    metrics: Metrics
    #: the clock of ``webhook-timestamp`` (seconds since the epoch)
    clock: Callable[[], float] = time.time
    _emails: dict[str, tuple[float, str | None]] = field(default_factory=dict, init=False)
    _lookups: dict[str, asyncio.Future[str | None]] = field(default_factory=dict, init=False)
    _skew: dict[str, tuple[tuple[str, ...], dict[str, str]]] = field(
        default_factory=dict, init=False
    )

    def __post_init__(self) -> None:
        settings = self.settings
        url = settings.notify_webhook_url
        self.webhook = Webhook(url, settings.notify_webhook_timeout) if url else None
        secret = settings.notify_webhook_secret
        self.keys = None if secret is None else webhook_keys(secret.get_secret_value())
        self.mailer = Mailer.from_settings(settings) if settings.notify_email_host else None
        # SMTP and OMERO lookups block: threads of their own each, never the OMERO or storage
        # pools, and never each other's (a hung lookup must not hold up a send)
        self.smtp_threads = ThreadPoolExecutor(CONCURRENCY["email"], thread_name_prefix="smtp")
        self.lookup_threads = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix="notify")
        # well below the lease: another replica takes a delivery over only from one that stopped
        self.attempt_bound = settings.notify_delivery_lease / 2
        self._pruned_at = float("-inf")

    @property
    def channels(self) -> list[str]:
        found = []
        if self.webhook is not None:
            found.append("webhook")
        if self.mailer is not None:
            found.append("email")
        return found

    def endpoints(self) -> dict[str, str]:
        """Where each channel points, as recorded in the database and logged: no secrets."""
        return _endpoints(self.settings)

    def close(self) -> None:
        self.smtp_threads.shutdown(wait=False, cancel_futures=True)
        self.lookup_threads.shutdown(wait=False, cancel_futures=True)

    # --- the loops --------------------------------------------------------------------------
    async def run(self) -> None:
        """The supervised helper: a loop per channel and one for the bookkeeping. Each loop
        logs what fails and tries again after a pause: a helper that keeps failing stops
        the replica from claiming, and notifications must never stop imports."""
        if self.channels:
            log.info("notifications_enabled", signed=self.keys is not None, **self.endpoints())
        await self.record_channels()
        tasks = [asyncio.create_task(self._channel_loop(c)) for c in self.channels]
        tasks.append(asyncio.create_task(self._bookkeeping_loop()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def record_channels(self) -> None:
        """Record this replica's channels (what later outcomes owe) and log any replica that
        has other ones: the outcomes they owe are left to whichever replica has the channel."""
        others = await self.store.record_channels(self.channels, self.endpoints())
        ours = (tuple(sorted(self.channels)), self.endpoints())
        current = {}
        for replica in others:
            theirs = (tuple(sorted(replica.channels)), replica.endpoints)
            if theirs != ours:
                current[replica.worker_id] = theirs
                if self._skew.get(replica.worker_id) != theirs:
                    self._log_skew(replica)
        self._skew = current

    def _log_skew(self, replica: ReplicaChannels) -> None:
        log.warning(
            "notification_channels_differ",
            replica=replica.worker_id,
            theirs=list(replica.channels),
            their_endpoints=replica.endpoints,
            ours=self.channels,
            our_endpoints=self.endpoints(),
        )

    async def _bookkeeping_loop(self) -> None:
        pause = STATS_INTERVAL
        while True:
            await asyncio.sleep(pause)
            try:
                await self.record_channels()
                await self.update_backlog()
                if await self._prune():
                    await self.give_up_orphans()
                pause = STATS_INTERVAL
            except StoreClosed:
                return  # the replica is stopping
            except Exception:
                pause = min(pause * 2, PAUSE_MAX)
                log.exception("notifications_bookkeeping_failed", retry_in=pause)

    async def _prune(self) -> bool:
        """Delete done rows past their retention, every PRUNE_INTERVAL; whether it ran."""
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_INTERVAL:
            return False
        self._pruned_at = now
        # bounded batches, so a large first prune never holds long locks
        for _ in range(10):
            if await self.store.prune_notifications(RETENTION, 1000) < 1000:
                break
        return True

    async def give_up_orphans(self) -> None:
        """Give up deliveries of a channel no replica has any more, once their outcome is
        older than ``notify_give_up_after``: no replica would ever claim (or give up) them."""
        orphans = await self.store.orphaned_deliveries(self.settings.notify_give_up_after, 100)
        for orphan in orphans:
            result = DeliveryResult(
                orphan.id, orphan.channel, orphan.token, "given_up", error=ORPHANED
            )
            if await self.store.record_delivery(result):
                self.metrics.notification_given_up(orphan.channel, "expired")
                log.error(
                    "notification_given_up",
                    reason="expired",
                    error=ORPHANED,
                    channel=orphan.channel,
                    order_uuid=orphan.uuid,
                    event_id=orphan.event_id,
                )

    async def update_backlog(self) -> None:
        """The backlog gauges, from the database (skipped while it does not answer)."""
        stats = await self.store.notification_stats()
        if stats is not None:
            self.metrics.set_notification_backlog(*stats)

    async def _channel_loop(self, channel: str) -> None:
        """Keep up to CONCURRENCY[channel] deliveries of one channel in flight; claim more as
        each one settles, else poll."""
        limit = CONCURRENCY[channel]
        running: set[asyncio.Task[None]] = set()
        settled = asyncio.Event()

        def done(task: asyncio.Task[None]) -> None:
            running.discard(task)
            settled.set()

        pause = self.settings.poll_interval
        try:
            while True:
                settled.clear()
                try:
                    free = limit - len(running)
                    claimed = (
                        await self.store.claim_deliveries(
                            channel, free, self.settings.notify_delivery_lease
                        )
                        if free > 0
                        else []
                    )
                    for delivery in claimed:
                        task = asyncio.create_task(self.attempt(delivery))
                        running.add(task)
                        task.add_done_callback(done)
                    pause = self.settings.poll_interval
                except StoreClosed:
                    return
                except Exception:
                    pause = min(pause * 2, PAUSE_MAX)
                    log.exception("notifications_claim_failed", channel=channel, retry_in=pause)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(settled.wait(), pause)
        finally:
            # stopping: a delivery cut off here is sent again after its lease
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    # --- one delivery -----------------------------------------------------------------------
    async def attempt(self, delivery: Delivery) -> None:
        """Send one channel of one outcome and record what happened. Never raises: what it
        cannot record is sent again after the lease."""
        note, channel = delivery.note, delivery.channel
        failure: DeliveryFailed | None = None
        try:
            await asyncio.wait_for(self._send(channel, note), timeout=self.attempt_bound)
        except asyncio.TimeoutError:
            failure = DeliveryFailed(f"no result within {self.attempt_bound:g} s", permanent=False)
        except DeliveryFailed as exc:
            failure = exc
        except Exception as exc:
            # not understood: tried again later like a passing failure, but loudly
            log.exception("notification_error", channel=channel, order_uuid=note.uuid)
            failure = DeliveryFailed(type(exc).__name__, permanent=False)
        result = self._judge(delivery, failure)
        try:
            recorded = await self.store.record_delivery(result)
        except StoreClosed:
            return
        except Exception:
            log.exception("notification_record_failed", channel=channel, order_uuid=note.uuid)
            return
        if not recorded:
            # our lease ran out and another replica claimed it since: its record counts
            log.warning(
                "notification_result_superseded",
                channel=channel,
                order_uuid=note.uuid,
                event_id=note.event_id,
            )

    def _judge(self, delivery: Delivery, failure: DeliveryFailed | None) -> DeliveryResult:
        note, channel = delivery.note, delivery.channel
        context = {"channel": channel, "order_uuid": note.uuid, "event_id": note.event_id}
        if failure is None:
            self.metrics.notification_delivered(channel)
            log.info("notification_delivered", attempt=note.attempts, **context)
            return DeliveryResult(note.id, channel, delivery.token, "delivered")
        if failure.permanent or note.age_seconds >= self.settings.notify_give_up_after:
            reason: NotificationGiveUp = "final" if failure.permanent else "expired"
            self.metrics.notification_failed(channel, "permanent")
            self.metrics.notification_given_up(channel, reason)
            log.error(
                "notification_given_up",
                reason=reason,
                error=failure.reason,
                attempts=note.attempts,
                **context,
            )
            return DeliveryResult(
                note.id, channel, delivery.token, "given_up", error=failure.reason
            )
        self.metrics.notification_failed(channel, "retry")
        retry_in = backoff(
            note.attempts,
            self.settings.notify_retry_backoff,
            self.settings.notify_retry_backoff_max,
        )
        log.warning(
            "notification_failed",
            attempt=note.attempts,
            error=failure.reason,
            retry_in=round(retry_in, 1),
            **context,
        )
        return DeliveryResult(
            note.id, channel, delivery.token, "retry", retry_in=retry_in, error=failure.reason
        )

    async def _send(self, channel: str, note: Notification) -> None:
        if channel == "webhook":
            await self._post(note)
        else:
            await self._email(note)

    async def _post(self, note: Notification) -> None:
        assert self.webhook is not None
        body = webhook_body(note)
        headers = webhook_headers(note, body, int(self.clock()), self.keys)
        await self.webhook.post(body, headers)

    async def _email(self, note: Notification) -> None:
        assert self.mailer is not None
        sender = self.settings.notify_email_sender
        assert sender is not None
        if not note.user:
            raise DeliveryFailed("the order names no OMERO user", permanent=True)
        raw = await self._address(note.user)
        recipient, why = valid_address(raw)
        if recipient is None:
            # the user name is order data: shown quoted (repr) and cut, never as it came
            raise DeliveryFailed(
                f"no valid email address for OMERO user {note.user[:64]!r}: {why}",
                permanent=True,
            )
        message = email_message(note, sender=sender, recipient=recipient)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.smtp_threads, self.mailer.send, message)
        log.debug("notification_email_sent", order_uuid=note.uuid, outcome=outcome(note))

    async def _address(self, user: str) -> str | None:
        """The experimenter's address, remembered a few minutes: one OMERO lookup per user,
        not per order, when a batch of orders ends."""
        now = time.monotonic()
        cached = self._emails.get(user)
        if cached is not None and now - cached[0] < EMAIL_CACHE_SECONDS:
            return cached[1]
        # concurrent deliveries share one lookup per user
        lookup = self._lookups.get(user)
        if lookup is None:
            loop = asyncio.get_running_loop()
            lookup = loop.run_in_executor(
                self.lookup_threads, self.gateway.experimenter_email, user
            )
            self._lookups[user] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(user, None))
        try:
            address = await asyncio.shield(lookup)
        except OmeroError as exc:
            raise DeliveryFailed(f"OMERO: {exc.reason}", permanent=False) from None
        self._emails[user] = (now, address)
        return address


async def check_channels(settings: Settings) -> list[tuple[str, bool, str]]:
    """(channel, reachable, detail) for each configured channel, for ``check``: the webhook
    gets a TCP (and TLS) connection, SMTP a login; nothing is sent."""
    lines: list[tuple[str, bool, str]] = []
    if settings.notify_webhook_url:
        where = endpoint(settings.notify_webhook_url)
        try:
            await asyncio.wait_for(_connect(settings.notify_webhook_url), timeout=10)
            lines.append(("webhook", True, where))
        except (OSError, asyncio.TimeoutError) as exc:
            lines.append(("webhook", False, f"{where}: {type(exc).__name__}"))
    if settings.notify_email_host:
        mailer = Mailer.from_settings(settings)
        try:
            await asyncio.to_thread(mailer.probe)
            lines.append(("email", True, mailer.describe()))
        except Exception as exc:  # whatever it is, the channel is not usable
            lines.append(("email", False, f"{mailer.describe()}: {type(exc).__name__}"))
    return lines


def channel_skew(settings: Settings, replicas: list[ReplicaChannels]) -> tuple[bool, str]:
    """(agree, detail) comparing the channels of this configuration with every replica's."""
    notifier_channels = tuple(c for c in CHANNELS if _configured(settings, c))
    ours = (tuple(sorted(notifier_channels)), _endpoints(settings))
    differ = [r for r in replicas if (tuple(sorted(r.channels)), r.endpoints) != ours]
    if not replicas:
        return True, "no replica has recorded its channels in the last hour"
    if not differ:
        return True, f"{len(replicas)} replica(s): {', '.join(notifier_channels) or 'none'}"
    detail = "; ".join(
        f"{r.worker_id}: {', '.join(r.channels) or 'none'}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in sorted(r.endpoints.items()))})"
            if r.endpoints
            else ""
        )
        for r in differ
    )
    return False, f"here: {', '.join(notifier_channels) or 'none'}; differ: {detail}"


def _configured(settings: Settings, channel: str) -> bool:
    if channel == "webhook":
        return settings.notify_webhook_url is not None
    return settings.notify_email_host is not None


def _endpoints(settings: Settings) -> dict[str, str]:
    found = {}
    if settings.notify_webhook_url is not None:
        found["webhook"] = endpoint(settings.notify_webhook_url)
    if settings.notify_email_host is not None:
        found["email"] = Mailer.from_settings(settings).describe()
    return found


async def _connect(url: str) -> None:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    _, writer = await asyncio.open_connection(
        parts.hostname,
        parts.port or (443 if secure else 80),
        ssl=ssl.create_default_context() if secure else None,
    )
    writer.close()
