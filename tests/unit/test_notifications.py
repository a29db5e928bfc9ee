"""Notifications of outcomes, against a real local HTTP receiver and a real SMTP server.

The store is the in-memory twin (its outbox mirrors the PostgreSQL triggers); the dispatcher,
pipeline, simulator and notifier are the real ones. Every webhook request is verified with the
Standard Webhooks reference verifier (the ``standardwebhooks`` package).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks.webhooks
import structlog
from pydantic import SecretStr, ValidationError
from standardwebhooks import Webhook as Verifier

from biomero_importer.model import STAGE_IMPORTED, STAGE_INGEST_FAILED, Notification
from biomero_importer.notify import (
    channel_skew,
    email_message,
    idempotency_key,
    valid_address,
    webhook_body,
    webhook_headers,
)
from biomero_importer.notify.channels import Webhook
from biomero_importer.notify.message import shown
from biomero_importer.notify.notifier import Notifier, backoff
from biomero_importer.observability.metrics import Metrics
from biomero_importer.omero.simulator import SimulatorGateway
from biomero_importer.settings import Settings, webhook_keys
from biomero_importer.store import Delivery, Finish, MemoryStore, OrderStore, ReplicaChannels
from tests.notify_support import (
    SmtpBlackHole,
    SmtpReceiver,
    WebhookReceiver,
    free_port,
    new_secret,
    notify_settings,
    self_signed,
)
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit

SECRET = new_secret()
RESEARCHER = "researcher@lab.example"
USERS: dict[str, Any] = {
    "researcher": {"groups": ["Demo"], "email": RESEARCHER},
    "nomail": ["Demo"],  # the plain form: groups only, so no address
    "twice": {"groups": ["Demo"], "email": "me@lab.example,x@evil.example"},
}


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver(SECRET)
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpReceiver]:
    receiver = SmtpReceiver()
    receiver.start()
    yield receiver
    receiver.stop()


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def all_done(store: MemoryStore, count: int) -> Callable[[], bool]:
    def check() -> bool:
        rows = store.outbox()
        return len(rows) == count and all(done for *_, done in rows)

    return check


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"biomero_importer_{name}_total", labels)
    return value or 0.0


async def deliver_due(notifier: Notifier, store: OrderStore, channel: str) -> int:
    """One round of one channel, as its loop does it: claim what is due, attempt each."""
    claimed = await store.claim_deliveries(channel, 50, notifier.settings.notify_delivery_lease)
    await asyncio.gather(*(notifier.attempt(d) for d in claimed))
    return len(claimed)


async def finished_outcome(store: MemoryStore, root: Path, **kw: Any) -> str:
    new = order(make_tiffs(root / f"o{time.monotonic_ns()}", 1), **kw)
    await store.submit(new)
    [claimed] = await store.claim(1)
    await store.finish(Finish(new.uuid, STAGE_IMPORTED, "Imported", run=claimed.runs))
    return new.uuid


async def test_each_outcome_is_posted_signed_and_emailed_to_the_researcher(
    tmp_path: Path, root: Path, webhook: WebhookReceiver, smtp: SmtpReceiver
) -> None:
    settings = unit_settings(
        tmp_path, root, omero_simulator_users=USERS, **notify_settings(webhook, smtp)
    )
    good = order(make_tiffs(root / "good", 2))
    bad = order([root / "missing.tif"])
    async with memory_replica(settings) as (service, _):
        store = service.store
        assert isinstance(store, MemoryStore)
        for new in (good, bad):
            await store.submit(new)
        assert (await finished(store, good.uuid))[0] == STAGE_IMPORTED
        assert (await finished(store, bad.uuid))[0] == STAGE_INGEST_FAILED
        await until(all_done(store, 2))
        outbox = {uuid: (event_id, delivered) for uuid, event_id, _, delivered, _ in store.outbox()}
        channels = {c.channel: c for c in await store.order_deliveries(good.uuid)}
        metrics = service.metrics

    assert webhook.bad_signatures == 0 and webhook.duplicates == 0
    assert set(webhook.deliveries) == {f"{u}:{outbox[u][0]}" for u in (good.uuid, bad.uuid)}
    assert all(delivered == ["email", "webhook"] for _, delivered in outbox.values())
    assert set(channels) == {"email", "webhook"}
    assert all(c.delivered_at is not None and c.attempts == 1 for c in channels.values())
    by_uuid = {body["uuid"]: body for body in webhook.deliveries.values()}
    done, failed = by_uuid[good.uuid], by_uuid[bad.uuid]
    assert (done["stage"], done["outcome"], failed["outcome"]) == (
        STAGE_IMPORTED,
        "completed",
        "failed",
    )
    assert done["user"] == "researcher" and done["group"] == "Demo"
    assert done["destination"] == {"type": "Dataset", "id": "151"}
    assert [o["type"] for o in done["objects"]] == ["Image", "Image"]
    assert failed["objects"] == [] and "missing.tif" in failed["description"]
    timings = done["timings"]
    assert timings["queued_at"] <= timings["started_at"] <= timings["finished_at"]
    # the URL's user and password become Basic auth; the path and query are sent as given
    seen = webhook.headers_seen[0]
    assert seen["authorization"] == "Basic " + base64.b64encode(b"hook:pw-in-url").decode()
    assert seen["request_line"].startswith("POST /hooks/biomero?token=t0k3n-in-query HTTP/1.1")
    # Standard Webhooks headers: the id is the outcome's idempotency key
    assert seen["webhook-id"] == seen["idempotency-key"]
    assert abs(int(seen["webhook-timestamp"]) - time.time()) < 60
    assert seen["webhook-signature"].startswith("v1,")

    assert len(smtp.messages) == 2
    mails = {str(m["Idempotency-Key"]).split(":")[0]: (to, m) for to, m in smtp.messages.values()}
    to, ok_mail = mails[good.uuid]
    assert to == [RESEARCHER] and ok_mail["To"] == RESEARCHER
    assert ok_mail["Subject"] == f"Import completed: order {good.uuid}"
    assert "2 Images" in ok_mail.get_content()
    _, failed_mail = mails[bad.uuid]
    assert failed_mail["Subject"] == f"Import failed: order {bad.uuid}"
    assert "missing.tif" in failed_mail.get_content()
    assert counter(metrics, "notifications_delivered", channel="webhook") == 2
    assert counter(metrics, "notifications_delivered", channel="email") == 2


@pytest.mark.parametrize("status", [401, 404, 301, 503])
async def test_every_answer_but_410_is_retried_until_it_is_accepted(
    tmp_path: Path, root: Path, webhook: WebhookReceiver, status: int
) -> None:
    """A receiver answering 401 while its secret is rotated must not lose the outcomes that
    finish meanwhile: only 410 Gone is final."""
    webhook.statuses = [status, status, status]
    # a channel with nothing in flight claims its due retries at the next poll: at 10 ms
    # the three retries wait out their backoffs (0.02, 0.04, 0.08 s), not 50 ms polls
    settings = unit_settings(
        tmp_path,
        root,
        notify_retry_backoff=0.02,
        poll_interval=0.01,
        **notify_settings(webhook, None),
    )
    new = order(make_tiffs(root, 1))
    async with memory_replica(settings) as (service, _):
        store = service.store
        assert isinstance(store, MemoryStore)
        await store.submit(new)
        await finished(store, new.uuid)
        await until(all_done(store, 1))
        [state] = await store.order_deliveries(new.uuid)
        metrics = service.metrics
    assert webhook.requests == 4 and len(webhook.deliveries) == 1
    assert state.delivered_at is not None and state.attempts == 4
    assert state.last_error is not None and state.last_error.startswith(f"HTTP {status}")
    assert counter(metrics, "notifications_failed", channel="webhook", kind="retry") == 3
    assert counter(metrics, "notifications_given_up", channel="webhook", reason="final") == 0


async def test_a_final_answer_and_an_unusable_address_are_given_up_visibly(
    tmp_path: Path, root: Path, webhook: WebhookReceiver, smtp: SmtpReceiver
) -> None:
    webhook.statuses = [410]
    settings = unit_settings(
        tmp_path,
        root,
        omero_simulator_users=USERS,
        notify_retry_backoff=0.01,
        **notify_settings(webhook, smtp),
    )
    nomail = order(make_tiffs(root / "a", 1), user="nomail")
    twice = order(make_tiffs(root / "b", 1), user="twice")
    async with memory_replica(settings) as (service, _):
        store = service.store
        assert isinstance(store, MemoryStore)
        with structlog.testing.capture_logs() as logs:
            for new in (nomail, twice):
                await store.submit(new)
                await finished(store, new.uuid)
            await until(all_done(store, 2))
            await asyncio.sleep(0.1)  # a retry would come after 0.01 s
        states = {c.channel: c for c in await store.order_deliveries(twice.uuid)}
        metrics = service.metrics
    assert sorted(d for *_, d, _ in store.outbox()) == [
        ["email:failed", "webhook"],
        ["email:failed", "webhook:failed"],
    ]
    assert webhook.requests == 2 and smtp.messages == {}
    given_up = [e for e in logs if e["event"] == "notification_given_up"]
    reasons = sorted((e["channel"], e["error"]) for e in given_up)
    assert reasons == [
        ("email", "no valid email address for OMERO user 'nomail': no address"),
        ("email", "no valid email address for OMERO user 'twice': names more than one address"),
        ("webhook", "HTTP 410: the receiver is gone for good"),
    ]
    assert all(e["reason"] == "final" for e in given_up)
    assert states["email"].given_up_at is not None and states["email"].attempts == 1
    assert counter(metrics, "notifications_given_up", channel="webhook", reason="final") == 1
    assert counter(metrics, "notifications_given_up", channel="email", reason="final") == 2


async def test_a_channel_still_failing_after_give_up_after_is_given_up(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    await webhook.stop()
    settings = unit_settings(tmp_path, root, **notify_settings(webhook, None))
    now = [1_800_000_000.0]
    store = MemoryStore(worker_id="A", clock=lambda: now[0])
    gateway = SimulatorGateway(settings)
    metrics = Metrics()
    notifier = Notifier(settings, store, gateway, metrics)
    try:
        await notifier.record_channels()
        uuid = await finished_outcome(store, root)
        assert await deliver_due(notifier, store, "webhook") == 1
        [state] = await store.order_deliveries(uuid)
        assert state.given_up_at is None and state.due_at is not None
        now[0] += settings.notify_give_up_after
        assert await deliver_due(notifier, store, "webhook") == 1
    finally:
        notifier.close()
        gateway.close()
    [state] = await store.order_deliveries(uuid)
    assert state.given_up_at is not None and state.attempts == 2
    assert counter(metrics, "notifications_given_up", channel="webhook", reason="expired") == 1


async def test_without_channels_an_outcome_queues_nothing(tmp_path: Path, root: Path) -> None:
    """Before: an outbox row per outcome, marked done at once (two writes for nothing)."""
    settings = unit_settings(tmp_path, root)
    new = order(make_tiffs(root, 1))
    async with memory_replica(settings) as (service, _):
        store = service.store
        assert isinstance(store, MemoryStore)
        await store.submit(new)
        await finished(store, new.uuid)
        assert store.outbox() == []
        stats = await store.notification_stats()
        assert stats is not None and stats[0] == 0


async def test_a_hanging_receiver_never_delays_the_next_order(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    webhook.hang = True
    settings = unit_settings(
        tmp_path, root, notify_delivery_lease=600, **notify_settings(webhook, None)
    )
    first, second = order(make_tiffs(root / "a", 1)), order(make_tiffs(root / "b", 1))
    async with memory_replica(settings) as (service, _):
        store = service.store
        assert isinstance(store, MemoryStore) and service.notifier is not None
        # longer than this test can take: the POST hangs for as long as it runs
        service.notifier.webhook = Webhook(webhook.url, timeout=600)
        await store.submit(first)
        await finished(store, first.uuid)
        await until(lambda: webhook.open_hangs == 1)
        await store.submit(second)
        assert (await finished(store, second.uuid))[0] == STAGE_IMPORTED
        # the second order was claimed, run and finished, and its own notification sent,
        # while the first one's still hung
        await until(lambda: webhook.open_hangs == 2)
        assert webhook.deliveries == {}
        assert service.dispatcher.supervisor.failing() == []


async def test_a_black_holed_smtp_server_never_delays_a_webhook(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    hole = SmtpBlackHole(free_port())
    settings = unit_settings(
        tmp_path,
        root,
        omero_simulator_users=USERS,
        notify_email_host="127.0.0.1",
        notify_email_port=hole.port,
        notify_email_starttls=False,
        notify_email_sender="imaging@facility.example",
        notify_email_timeout=30,
        **notify_settings(webhook, None),
    )
    orders = [order(make_tiffs(root / f"o{n}", 1)) for n in range(6)]
    try:
        async with memory_replica(settings) as (service, _):
            store = service.store
            assert isinstance(store, MemoryStore)
            started = time.monotonic()
            # one after another, each webhook delivered before the next order: the later
            # outcomes find the email channel already stuck on the silent server
            submitted: list[str] = []
            for new in orders:
                await store.submit(new)
                submitted.append(new.uuid)
                await until(lambda: len(webhook.deliveries) == len(submitted), timeout=15)
                await until(lambda: hole.connections >= 1, timeout=15)
            took = time.monotonic() - started
            assert hole.connections >= 1  # the emails are stuck on the silent server
            assert not any(done for *_, done in store.outbox())
    finally:
        hole.stop()
    # all six webhooks while every email waits out a 30 s timeout
    assert took < 15


async def test_a_second_send_of_the_same_outcome_reuses_its_id_and_body(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    """At least once: a replica that sent but could not record sends again after the lease;
    the receiver sees the same webhook-id and byte-identical body, and keeps one."""
    settings = unit_settings(
        tmp_path, root, notify_delivery_lease=2, **notify_settings(webhook, None)
    )
    now = [1_800_000_000.0]
    store = MemoryStore(worker_id="A", lease_seconds=1.0, clock=lambda: now[0])
    gateway = SimulatorGateway(settings)
    notifier = Notifier(settings, store, gateway, Metrics())
    try:
        await notifier.record_channels()
        await finished_outcome(store, root)
        [first] = await store.claim_deliveries("webhook", 10, 2)
        # sent, then the replica "dies" before recording: POST without the record
        await notifier._post(first.note)
        now[0] += 3  # the lease ran out: sent again, recorded
        assert await deliver_due(notifier, store, "webhook") == 1
    finally:
        notifier.close()
        gateway.close()
    assert webhook.requests == 2 and webhook.duplicates == 1 and len(webhook.deliveries) == 1
    assert webhook.raw[0][1] == webhook.raw[1][1]
    assert webhook.raw[0][0]["webhook-id"] == webhook.raw[1][0]["webhook-id"]
    assert webhook.bad_signatures == 0
    assert store.outbox()[0][3:] == (["webhook"], True)


async def test_every_secret_of_a_rotation_signs_and_a_replay_is_rejected(
    tmp_path: Path, root: Path, webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two secrets while one is rotated: a receiver holding either verifies. A captured
    request replayed later than the verifier's tolerance (5 minutes) is refused by it."""
    old = new_secret()
    values = notify_settings(webhook, None)
    values["notify_webhook_secret"] = SecretStr(f"{old} {SECRET}")
    settings = unit_settings(tmp_path, root, **values)
    store = MemoryStore(worker_id="A")
    gateway = SimulatorGateway(settings)
    notifier = Notifier(settings, store, gateway, Metrics())
    try:
        await notifier.record_channels()
        await finished_outcome(store, root)
        assert await deliver_due(notifier, store, "webhook") == 1
    finally:
        notifier.close()
        gateway.close()
    [(headers, body)] = webhook.raw
    assert len(webhook.deliveries) == 1 and webhook.bad_signatures == 0
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, SECRET):
        assert Verifier(secret).verify(body, headers)["event"] == "order.finished"
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        Verifier(new_secret()).verify(body, headers)
    # the same bytes, replayed six minutes later: the verifier's clock moves on
    later = datetime.now(timezone.utc) + timedelta(minutes=6)

    class Later(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:
            return later

    monkeypatch.setattr(standardwebhooks.webhooks, "datetime", Later)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError, match="too old"):
        Verifier(SECRET).verify(body, headers)


async def test_a_request_signed_outside_the_tolerance_is_refused_and_retried(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    """A sender whose clock is ten minutes behind: the reference verifier refuses every
    request (the receiver answers 401), and the notifier keeps trying instead of dropping."""
    settings = unit_settings(
        tmp_path, root, notify_retry_backoff=0.01, **notify_settings(webhook, None)
    )
    store = MemoryStore(worker_id="A")
    gateway = SimulatorGateway(settings)
    notifier = Notifier(settings, store, gateway, Metrics(), clock=lambda: time.time() - 600)
    try:
        await notifier.record_channels()
        uuid = await finished_outcome(store, root)
        assert await deliver_due(notifier, store, "webhook") == 1
        assert webhook.bad_signatures == 1 and webhook.deliveries == {}
        [state] = await store.order_deliveries(uuid)
        assert state.given_up_at is None and state.last_error == "HTTP 401"
        notifier.clock = time.time
        await asyncio.sleep(0.05)
        assert await deliver_due(notifier, store, "webhook") == 1
    finally:
        notifier.close()
        gateway.close()
    assert len(webhook.deliveries) == 1


async def test_nothing_of_the_webhook_url_but_its_host_is_logged(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    await webhook.stop()  # down: every attempt fails and is logged
    settings = unit_settings(
        tmp_path, root, notify_retry_backoff=0.01, **notify_settings(webhook, None)
    )
    new = order(make_tiffs(root, 1))
    with structlog.testing.capture_logs() as logs:
        async with memory_replica(settings) as (service, _):
            store = service.store
            assert isinstance(store, MemoryStore)
            await store.submit(new)
            await finished(store, new.uuid)
            await until(lambda: any(e["event"] == "notification_failed" for e in logs))
    text = repr(logs)
    assert "notification_failed" in text and "notifications_enabled" in text
    assert f"http://127.0.0.1:{webhook.port}" in text
    for secret in ("pw-in-url", "t0k3n", "hooks/biomero", "hook:", SECRET):
        assert secret not in text


def _settings(tmp_path: Path, root: Path, **values: Any) -> Settings:
    return unit_settings(tmp_path, root, **values)


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example/biomero?token=t0k3n",
        "http://10.0.0.5:8080/h",
        "http://user:pw@hooks.example/x",
    ],
)
def test_plain_http_is_refused_except_to_this_machine_or_when_allowed(
    tmp_path: Path, root: Path, url: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        _settings(tmp_path, root, notify_webhook_url=url)
    message = str(caught.value.errors(include_input=False)[0]["msg"])
    assert "https://" in message and "t0k3n" not in message and "pw" not in message
    assert _settings(tmp_path, root, notify_webhook_url=url, notify_webhook_allow_http=True)
    for local in ("http://127.0.0.1:9/h", "http://[::1]:9/h", "http://localhost/h"):
        assert _settings(tmp_path, root, notify_webhook_url=local).notify_webhook_url == local
    assert _settings(tmp_path, root, notify_webhook_url="https://hooks.example/h")


@pytest.mark.parametrize(
    "secret",
    ["plain-old-hmac-secret", "whsec_not*base64", "whsec_c2hvcnQ=", f"{SECRET} oops"],
)
def test_webhook_secrets_must_be_standard_webhooks_secrets(
    tmp_path: Path, root: Path, secret: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        _settings(tmp_path, root, notify_webhook_secret=SecretStr(secret))
    assert secret not in str(caught.value.errors(include_input=False))
    with pytest.raises(ValueError):
        webhook_keys(secret)


def test_backoff_doubles_to_a_cap_with_jitter() -> None:
    waits = [backoff(n, 5.0, 600.0, rand=lambda: 0.5) for n in range(1, 12)]
    assert waits[:4] == [5.0, 10.0, 20.0, 40.0]
    assert max(waits) == 600.0
    assert backoff(3, 5.0, rand=lambda: 0.0) == 15.0 and backoff(3, 5.0, rand=lambda: 1.0) == 25.0
    assert backoff(10_000, 5.0, 30.0) <= 30.0 * 1.25


async def test_the_backlog_gauges_count_outcomes_still_owed(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    await webhook.stop()
    settings = unit_settings(tmp_path, root, **notify_settings(webhook, None))
    now = [1_800_000_000.0]
    store = MemoryStore(worker_id="A", clock=lambda: now[0])
    gateway = SimulatorGateway(settings)
    metrics = Metrics()
    notifier = Notifier(settings, store, gateway, metrics)
    try:
        await notifier.record_channels()
        for _ in range(2):
            await finished_outcome(store, root)
        assert await deliver_due(notifier, store, "webhook") == 2  # the receiver is down
        await notifier.update_backlog()
        assert metrics.registry.get_sample_value("biomero_importer_notification_backlog") == 2
        oldest = metrics.registry.get_sample_value(
            "biomero_importer_oldest_notification_age_seconds"
        )
        assert oldest is not None and oldest >= 0
        await webhook.start()
        now[0] += settings.notify_retry_backoff_max * 2  # past any backoff
        assert await deliver_due(notifier, store, "webhook") == 2
        await notifier.update_backlog()
        assert metrics.registry.get_sample_value("biomero_importer_notification_backlog") == 0
    finally:
        notifier.close()
        gateway.close()


class CountingGateway(SimulatorGateway):
    lookups = 0

    def experimenter_email(self, user: str) -> str | None:
        self.lookups += 1
        return super().experimenter_email(user)


async def test_outcomes_of_one_user_look_the_address_up_once(
    tmp_path: Path, root: Path, smtp: SmtpReceiver
) -> None:
    settings = unit_settings(
        tmp_path, root, omero_simulator_users=USERS, **notify_settings(None, smtp)
    )
    store = MemoryStore(worker_id="A")
    gateway = CountingGateway(settings)
    notifier = Notifier(settings, store, gateway, Metrics())
    try:
        await notifier.record_channels()
        for _ in range(3):
            await finished_outcome(store, root)
        assert await deliver_due(notifier, store, "email") == 3
    finally:
        notifier.close()
        gateway.close()
    assert gateway.lookups == 1
    assert [to for to, _ in smtp.messages.values()] == [[RESEARCHER]] * 3


class BrokenOutbox(MemoryStore):
    """An outbox whose every read fails (a bug, a broken table): imports must go on."""

    async def claim_deliveries(
        self, channel: str, limit: int, lease_seconds: float
    ) -> list[Delivery]:
        raise RuntimeError("outbox broken")


async def test_a_failing_notifier_never_stops_the_replica_from_claiming(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    settings = unit_settings(tmp_path, root, **notify_settings(webhook, None))
    store = BrokenOutbox(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    with structlog.testing.capture_logs() as logs:
        async with memory_replica(settings, store) as (service, _):
            await until(lambda: sum(e["event"] == "notifications_claim_failed" for e in logs) >= 2)
            later = order(make_tiffs(root, 1))
            await store.submit(later)
            assert (await finished(store, later.uuid))[0] == STAGE_IMPORTED
            assert service.dispatcher.supervisor.failing() == []
            assert service.health.claiming
    assert webhook.requests == 0


async def test_email_goes_over_starttls_with_the_configured_login(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = self_signed(tmp_path)
    if tls is None:
        pytest.skip("no openssl command to make a certificate with")
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))  # trust the test certificate
    smtp = SmtpReceiver(tls=tls, login=("importer", "smtp-pw"))
    smtp.start()
    now = [1_800_000_000.0]
    store = MemoryStore(worker_id="A", clock=lambda: now[0])
    values = {**notify_settings(None, smtp), "notify_email_starttls": True}
    metrics = Metrics()
    try:
        for password, expected in (("wrong", None), ("smtp-pw", "email")):
            settings = unit_settings(
                tmp_path,
                root,
                omero_simulator_users=USERS,
                notify_email_user="importer",
                notify_email_password=SecretStr(password),
                **values,
            )
            gateway = SimulatorGateway(settings)
            notifier = Notifier(settings, store, gateway, metrics)
            try:
                await notifier.record_channels()
                if expected is None:
                    uuid = await finished_outcome(store, root)
                now[0] += 3600  # past the backoff of the first attempt
                [delivery] = await store.claim_deliveries("email", 10, 0)
                await notifier.attempt(delivery)
            finally:
                notifier.close()
                gateway.close()
            [state] = await store.order_deliveries(uuid)
            # a refused login concerns every message: tried again later, not given up
            assert (state.delivered_at is not None) is (expected is not None)
            assert state.given_up_at is None
            assert smtp.logins[-1] == ("importer", expected is not None)
    finally:
        smtp.stop()
    assert counter(metrics, "notifications_failed", channel="email", kind="retry") == 1
    assert [to for to, _ in smtp.messages.values()] == [[RESEARCHER]]


# --- what a message may say -----------------------------------------------------------------
def _note(**changes: Any) -> Notification:
    values: dict[str, Any] = {
        "id": 1,
        "uuid": "u-1",
        "event_id": 7,
        "stage": STAGE_INGEST_FAILED,
        "attempts": 1,
        "age_seconds": 0.0,
        "user": "researcher",
        "group": "Demo",
        "destination_type": "Dataset",
        "destination_id": "151",
        "description": "File not found: /data/r\udce9sum\udce9.tif",
        "objects": [],
        "queued_at": None,
        "started_at": None,
        "finished_at": None,
    }
    values.update(changes)
    return Notification(**values)


def test_messages_are_the_same_bytes_every_time_and_header_safe() -> None:
    note = _note(uuid="evil\r\nX-Injected: 1")
    body = webhook_body(note)
    assert body == webhook_body(note)  # retries send identical, identically signed bytes
    payload = json.loads(body)
    assert payload["description"] == "File not found: /data/r\\xe9sum\\xe9.tif"
    key = idempotency_key(note)
    assert "\r" not in key and "\n" not in key and key.endswith(":7")
    headers = webhook_headers(note, body, 1_800_000_000, webhook_keys(SECRET))
    assert headers["webhook-id"] == key and headers["webhook-timestamp"] == "1800000000"
    assert all("\r" not in v and "\n" not in v for v in headers.values())
    mail = email_message(note, sender="Imaging <imaging@facility.example>", recipient=RESEARCHER)
    again = email_message(note, sender="x@facility.example", recipient="a@b.example")
    assert mail["Message-ID"] == again["Message-ID"]  # one id per outcome, whatever the sender
    assert str(mail["Message-ID"]).endswith("@facility.example>")
    assert "\n" not in str(mail["Subject"]) and str(mail["Subject"]).startswith("Import failed")
    assert "X-Injected" not in mail and "Injected" not in str(mail["Subject"]).split("_")[0]
    cancelled = email_message(
        _note(description="Cancelled"), sender="i@facility.example", recipient=RESEARCHER
    )
    assert str(cancelled["Subject"]) == "Import cancelled: order u-1"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("me@lab.org,x@y.com", "names more than one address"),
        ("me@lab.org, x@y.com", "contains spaces or control characters"),
        ("me@lab.org;x@y.com", "names more than one address"),
        ("Me <me@lab.org>", "contains spaces or control characters"),
        ("<me@lab.org>", "is not a single plain address"),
        ("me@lab.org\r\nBcc: x@y.com", "contains spaces or control characters"),
        ("me@lab.org (comment)", "contains spaces or control characters"),
        ('"me@x"@lab.org', "needs exactly one @"),
        ("me@@lab.org", "names more than one address"),
        ("melab.org", "needs exactly one @"),
        ("me@localhost", "has an invalid domain"),
        ("me@[10.0.0.1]", "has an invalid domain"),
        ("me@lab..org", "has an invalid domain"),
        ("m\u202ee@lab.org", "contains spaces or control characters"),
        ("mé@lab.org", "has an invalid part before the @"),
        ("x" * 65 + "@lab.org", "has an invalid part before the @"),
        ("", "no address"),
        (None, "no address"),
    ],
)
def test_only_exactly_one_plain_address_is_a_recipient(raw: str | None, why: str) -> None:
    assert valid_address(raw) == (None, why)


def test_plain_addresses_are_recipients() -> None:
    for raw in ("researcher@lab.example", "a.b+imaging@sub.uni-x.ac.uk", " me@lab.org "):
        assert valid_address(raw) == (raw.strip(), "")


def test_order_text_in_an_email_is_labelled_capped_data() -> None:
    """Whoever writes an order row chooses its description, paths and user name: none of it
    may read as the facility speaking, hide itself, or reach a header."""
    lure = (
        "ACTION REQUIRED: your account expires, log in at https://evil.example/login"
        " \u202etxt.exe\u202c\r\nFrom: it@facility.example\x1b[31m" + " and more" * 100
    )
    note = _note(
        description=lure,
        user="researcher\nBcc: x@evil.example",
        group="Demo\u2066hidden\u2069",
        destination_id="www.evil.example",
    )
    mail = email_message(note, sender="imaging@facility.example", recipient=RESEARCHER)
    text = mail.get_content()
    lines = text.splitlines()
    reason = next(line for line in lines if line.lstrip().startswith("Reason:"))
    # labelled as data from the order, on its one line, cut
    assert "data from the order" in text and "not a message from your imaging facility" in text
    assert len(reason) <= 320 and "..." in reason
    assert "https://" not in text and "https[:]//evil.example/login" in reason
    assert "www.evil" not in text and "www[.]evil.example" in text
    for hidden in ("\u202e", "\u202c", "\u2066", "\u2069", "\x1b", "\r"):
        assert hidden not in text
    assert not any(line.startswith("From:") for line in lines)
    assert "Bcc" not in str(mail).split("\n\n", 1)[0]  # nothing reaches the headers
    assert mail["To"] == RESEARCHER and mail["Bcc"] is None
    assert shown("x" * 500) == shown("x" * 500, 120) and len(shown("x" * 500)) <= 120


def test_replicas_differ_by_channel_set_or_endpoint_not_by_order(
    tmp_path: Path, root: Path
) -> None:
    hook = "http://127.0.0.1:9/h?token=t0k3n"
    settings = unit_settings(
        tmp_path,
        root,
        notify_webhook_url=hook,
        notify_email_host="mail.lab.example",
        notify_email_sender="imaging@facility.example",
    )
    where = {"webhook": "http://127.0.0.1:9", "email": "smtp://mail.lab.example:587 (STARTTLS)"}
    same = ReplicaChannels("a", ("email", "webhook"), where)
    assert channel_skew(settings, [same, ReplicaChannels("b", ("webhook", "email"), where)])[0]
    fewer = ReplicaChannels("c", ("webhook",), {"webhook": where["webhook"]})
    elsewhere = ReplicaChannels("d", ("email", "webhook"), {**where, "webhook": "https://x:443"})
    agree, detail = channel_skew(settings, [same, fewer, elsewhere])
    assert not agree and "c: webhook" in detail and "https://x:443" in detail
    assert "t0k3n" not in detail and " a:" not in detail
    assert channel_skew(settings, []) == (
        True,
        "no replica has recorded its channels in the last hour",
    )


async def test_a_channel_no_replica_has_any_more_is_given_up_after_give_up_after(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    """Email owed while replica A had it; A is gone and B has the webhook only: nobody would
    ever claim the email, so it is given up once the outcome is older than give-up-after."""
    settings = unit_settings(
        tmp_path, root, notify_give_up_after=3600, **notify_settings(webhook, None)
    )
    now = [1_800_000_000.0]
    a = MemoryStore(worker_id="A", clock=lambda: now[0])
    b = MemoryStore(worker_id="B", clock=lambda: now[0], shared=a)
    await a.record_channels(["email", "webhook"], {})
    uuid = await finished_outcome(a, root)
    gateway = SimulatorGateway(settings)
    metrics = Metrics()
    notifier = Notifier(settings, b, gateway, metrics)
    try:
        await notifier.record_channels()
        assert await deliver_due(notifier, b, "webhook") == 1
        await notifier.give_up_orphans()  # A was seen just now: the email may still come
        assert [c.given_up_at for c in await b.order_deliveries(uuid)] == [None, None]
        now[0] += 3 * 3600  # A stopped long ago
        await notifier.record_channels()
        with structlog.testing.capture_logs() as logs:
            await notifier.give_up_orphans()
    finally:
        notifier.close()
        gateway.close()
    email, hook = await b.order_deliveries(uuid)
    assert email.given_up_at is not None and email.last_error is not None
    assert "no replica" in email.last_error and hook.delivered_at is not None
    assert all(done for *_, done in b.outbox())
    assert [e["channel"] for e in logs if e["event"] == "notification_given_up"] == ["email"]
    assert counter(metrics, "notifications_given_up", channel="email", reason="expired") == 1
