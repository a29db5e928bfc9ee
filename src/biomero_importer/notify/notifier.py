"""Delivers queued outcome notifications: the replica's ``notifications`` helper.

Every pass claims a batch of due outbox rows (leased, so no other replica sends them at the
same time), sends each channel not yet settled for a row, and records what happened: settled
channels are never sent again; a row with a channel that failed for now is due again after a
backoff that doubles from ``notify_retry_backoff`` up to ten minutes, with jitter. Delivery is
therefore at least once per channel: a replica that dies between sending and recording sends
again after the lease, under the same idempotency key.

Nothing here can hold up an order: the loop is its own task, HTTP uses asyncio streams with a
timeout, and SMTP and OMERO email lookups run in two threads of the notifier's own.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog

from biomero_importer.model import Notification
from biomero_importer.notify.channels import DeliveryFailed, Mailer, Webhook, endpoint
from biomero_importer.notify.message import (
    EVENT,
    EVENT_HEADER,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    email_message,
    idempotency_key,
    outcome,
    sign,
    webhook_body,
)
from biomero_importer.observability.metrics import Metrics
from biomero_importer.omero.port import OmeroError, OmeroGateway
from biomero_importer.settings import Settings
from biomero_importer.store import NotificationResult, OrderStore, StoreClosed

log = structlog.get_logger(__name__)

CHANNELS = ("webhook", "email")
BATCH = 50
# Longer than one row's worst delivery (webhook timeout + SMTP timeout + an OMERO lookup with
# its retries): a row is sent again by another replica only if this one stopped.
DELIVERY_LEASE = 300.0
BACKOFF_MAX = 600.0
# A channel still failing after this long is given up for the row (logged, counted): the
# outbox must not grow without bound behind a receiver that is gone for good.
GIVE_UP_AFTER = 3 * 24 * 3600.0
RETENTION = 7 * 24 * 3600.0
PRUNE_INTERVAL = 600.0
STATS_INTERVAL = 10.0
EMAIL_CACHE_SECONDS = 300.0


def failed(channel: str) -> str:
    """How a channel that can never succeed for a row is recorded in its ``delivered``."""
    return f"{channel}:failed"


def backoff(attempts: int, first: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after ``attempts`` tries: doubling, capped, jittered
    (0.75-1.25x) so a receiver coming back is not hit by every row at once."""
    base: float = min(first * 2.0 ** min(max(attempts - 1, 0), 30), max(BACKOFF_MAX, first))
    return base * (0.75 + rand() / 2)


@dataclass
class Notifier:
    settings: Settings
    store: OrderStore
    gateway: OmeroGateway
    metrics: Metrics

    def __post_init__(self) -> None:
        settings = self.settings
        self.webhook = Webhook(settings.notify_webhook_url) if settings.notify_webhook_url else None
        secret = settings.notify_webhook_secret
        self.secret = None if secret is None else secret.get_secret_value()
        self.mailer = Mailer.from_settings(settings) if settings.notify_email_host else None
        # SMTP and OMERO lookups block: their own threads, never the OMERO or storage pools
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="notify")
        self._emails: dict[str, tuple[float, str | None]] = {}
        self._lookups: dict[str, asyncio.Future[str | None]] = {}
        self._pruned_at = float("-inf")
        self._stats_at = float("-inf")

    @property
    def channels(self) -> list[str]:
        found = []
        if self.webhook is not None:
            found.append("webhook")
        if self.mailer is not None:
            found.append("email")
        return found

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    # --- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        """The supervised helper. A pass that fails is logged and tried again after a pause
        here, not handed to the supervisor: a helper that keeps failing stops the replica
        from claiming, and notifications must never stop imports."""
        if self.channels:
            log.info(
                "notifications_enabled",
                webhook=None if self.webhook is None else endpoint(self.webhook.url),
                signed=self.secret is not None,
                email=None if self.mailer is None else self.mailer.describe(),
            )
        pause = self.settings.poll_interval
        while True:
            try:
                busy = await self.deliver_due() == BATCH
                await self._housekeeping()
                pause = self.settings.poll_interval
            except StoreClosed:
                busy = False  # the replica is stopping: this task is cancelled next
            except Exception:
                pause = min(pause * 2, 60.0)
                log.exception("notifications_pass_failed", retry_in=pause)
                busy = False
            if not busy:
                await asyncio.sleep(pause)

    async def deliver_due(self) -> int:
        """One pass: claim a batch, deliver it, record it; how many rows it held."""
        batch = await self.store.claim_notifications(BATCH, DELIVERY_LEASE)
        if batch:
            results = await asyncio.gather(*(self.deliver(note) for note in batch))
            await self.store.record_notifications(list(results))
        return len(batch)

    async def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._stats_at >= STATS_INTERVAL:
            self._stats_at = now
            await self.update_backlog()
        if now - self._pruned_at >= PRUNE_INTERVAL:
            self._pruned_at = now
            # bounded batches, so a large first prune never holds long locks
            for _ in range(10):
                if await self.store.prune_notifications(RETENTION, 1000) < 1000:
                    break

    async def update_backlog(self) -> None:
        """The backlog gauges, from the database (skipped while it does not answer)."""
        stats = await self.store.notification_stats()
        if stats is not None:
            self.metrics.set_notification_backlog(*stats)

    # --- one row ----------------------------------------------------------------------------
    async def deliver(self, note: Notification) -> NotificationResult:
        settled: list[str] = []
        errors: list[str] = []
        pending: list[str] = []
        for channel in self.channels:
            if channel in note.delivered or failed(channel) in note.delivered:
                continue
            try:
                await self._send(channel, note)
            except DeliveryFailed as exc:
                errors.append(f"{channel}: {exc.reason}")
                if exc.permanent:
                    settled.append(failed(channel))
                    self.metrics.notification_failed(channel, "permanent")
                    log.error(
                        "notification_undeliverable",
                        channel=channel,
                        order_uuid=note.uuid,
                        event_id=note.event_id,
                        reason=exc.reason,
                    )
                else:
                    pending.append(channel)
                    self.metrics.notification_failed(channel, "retry")
            except Exception as exc:
                # not understood: tried again later like a passing failure, but loudly
                log.exception("notification_error", channel=channel, order_uuid=note.uuid)
                errors.append(f"{channel}: {type(exc).__name__}")
                pending.append(channel)
                self.metrics.notification_failed(channel, "retry")
            else:
                settled.append(channel)
                self.metrics.notification_delivered(channel)
                log.info(
                    "notification_delivered",
                    channel=channel,
                    order_uuid=note.uuid,
                    event_id=note.event_id,
                    attempt=note.attempts,
                )
        error = "; ".join(errors) or None
        if pending and note.age_seconds >= GIVE_UP_AFTER:
            for channel in pending:
                self.metrics.notification_failed(channel, "permanent")
            log.error(
                "notification_given_up",
                channels=pending,
                order_uuid=note.uuid,
                event_id=note.event_id,
                attempts=note.attempts,
                reason=error,
            )
            settled += [failed(channel) for channel in pending]
            pending = []
        if not pending:
            return NotificationResult(note.id, tuple(settled), done=True, error=error)
        retry_in = backoff(note.attempts, self.settings.notify_retry_backoff)
        log.warning(
            "notification_failed",
            channels=pending,
            order_uuid=note.uuid,
            event_id=note.event_id,
            attempt=note.attempts,
            reason=error,
            retry_in=round(retry_in, 1),
        )
        return NotificationResult(note.id, tuple(settled), retry_in=retry_in, error=error)

    async def _send(self, channel: str, note: Notification) -> None:
        if channel == "webhook":
            await self._post(note)
        else:
            await self._email(note)

    async def _post(self, note: Notification) -> None:
        assert self.webhook is not None
        body = webhook_body(note)
        headers = {IDEMPOTENCY_HEADER: idempotency_key(note), EVENT_HEADER: EVENT}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(body, self.secret)
        await self.webhook.post(body, headers)

    async def _email(self, note: Notification) -> None:
        assert self.mailer is not None
        sender = self.settings.notify_email_sender
        assert sender is not None
        if not note.user:
            raise DeliveryFailed("the order names no OMERO user", permanent=True)
        recipient = await self._address(note.user)
        if recipient is None:
            raise DeliveryFailed(
                f"no email address known for OMERO user '{note.user}'", permanent=True
            )
        message = email_message(note, sender=sender, recipient=recipient)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.mailer.send, message)
        log.debug("notification_email_sent", order_uuid=note.uuid, outcome=outcome(note))

    async def _address(self, user: str) -> str | None:
        """The experimenter's address, remembered a few minutes: one OMERO lookup per user,
        not per order, when a batch of orders ends."""
        now = time.monotonic()
        cached = self._emails.get(user)
        if cached is not None and now - cached[0] < EMAIL_CACHE_SECONDS:
            return cached[1]
        # the rows of one batch share one lookup per user
        lookup = self._lookups.get(user)
        if lookup is None:
            loop = asyncio.get_running_loop()
            lookup = loop.run_in_executor(self.executor, self.gateway.experimenter_email, user)
            self._lookups[user] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(user, None))
        try:
            address = await asyncio.shield(lookup)
        except OmeroError as exc:
            raise DeliveryFailed(f"OMERO: {exc.reason}", permanent=False) from None
        if address is not None and ("@" not in address or any(c.isspace() for c in address)):
            raise DeliveryFailed(f"OMERO user '{user}' has no valid email address", permanent=True)
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


async def _connect(url: str) -> None:
    parts = urlsplit(url)
    secure = parts.scheme == "https"
    _, writer = await asyncio.open_connection(
        parts.hostname,
        parts.port or (443 if secure else 80),
        ssl=ssl.create_default_context() if secure else None,
    )
    writer.close()
