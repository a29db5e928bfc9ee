"""Notifications of outcomes, against a real local HTTP receiver and a real SMTP server.

The store is the in-memory twin (its outbox mirrors the PostgreSQL trigger); the dispatcher,
pipeline, simulator and notifier are the real ones.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from pydantic import SecretStr

from biomero_importer.model import STAGE_IMPORTED, STAGE_INGEST_FAILED, Notification
from biomero_importer.notify import email_message, idempotency_key, sign, webhook_body
from biomero_importer.notify.channels import Webhook
from biomero_importer.notify.notifier import BACKOFF_MAX, Notifier, backoff
from biomero_importer.observability.metrics import Metrics
from biomero_importer.omero.simulator import SimulatorGateway
from biomero_importer.store import Finish, MemoryStore
from tests.notify_support import SmtpReceiver, WebhookReceiver, notify_settings, self_signed
from tests.support import make_tiffs
from tests.unit.conftest import finished, memory_replica, order, unit_settings

pytestmark = pytest.mark.unit

SECRET = "hmac-test-secret-1"
RESEARCHER = "researcher@lab.example"
USERS: dict[str, Any] = {
    "researcher": {"groups": ["Demo"], "email": RESEARCHER},
    "nomail": ["Demo"],  # the plain form: groups only, so no address
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
        metrics = service.metrics

    assert webhook.bad_signatures == 0 and webhook.duplicates == 0
    assert set(webhook.deliveries) == {f"{u}:{outbox[u][0]}" for u in (good.uuid, bad.uuid)}
    assert all(delivered == ["email", "webhook"] for _, delivered in outbox.values())
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

    assert len(smtp.messages) == 2
    mails = {str(m["Idempotency-Key"]).split(":")[0]: (to, m) for to, m in smtp.messages.values()}
    to, ok_mail = mails[good.uuid]
    assert to == [RESEARCHER] and ok_mail["To"] == RESEARCHER
    assert ok_mail["Subject"] == f"Import completed: order {good.uuid}"
    assert "2 Images" in ok_mail.get_content()
    _, failed_mail = mails[bad.uuid]
    assert failed_mail["Subject"] == f"Import failed: order {bad.uuid}"
    text = failed_mail.get_content()
    assert "missing.tif" in text and f"biomero-importer retry {bad.uuid}" in text
    assert "imaging@facility.example" in text
    assert counter(metrics, "notifications_delivered", channel="webhook") == 2
    assert counter(metrics, "notifications_delivered", channel="email") == 2


async def test_a_receiver_error_is_retried_with_backoff_until_it_answers(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    webhook.statuses = [503, 429, 408]
    settings = unit_settings(
        tmp_path, root, notify_retry_backoff=0.05, **notify_settings(webhook, None)
    )
    new = order(make_tiffs(root, 1))
    async with memory_replica(settings) as (service, _):
        store = service.store
        assert isinstance(store, MemoryStore)
        await store.submit(new)
        await finished(store, new.uuid)
        await until(all_done(store, 1))
        metrics = service.metrics
    assert webhook.requests == 4 and len(webhook.deliveries) == 1
    assert counter(metrics, "notifications_failed", channel="webhook", kind="retry") == 3
    assert counter(metrics, "notifications_delivered", channel="webhook") == 1


async def test_a_permanent_refusal_and_a_missing_address_are_never_retried(
    tmp_path: Path, root: Path, webhook: WebhookReceiver, smtp: SmtpReceiver
) -> None:
    webhook.statuses = [400]
    settings = unit_settings(
        tmp_path,
        root,
        omero_simulator_users=USERS,
        notify_retry_backoff=0.01,
        **notify_settings(webhook, smtp),
    )
    new = order(make_tiffs(root, 1), user="nomail")
    async with memory_replica(settings) as (service, _):
        store = service.store
        assert isinstance(store, MemoryStore)
        with structlog.testing.capture_logs() as logs:
            await store.submit(new)
            await finished(store, new.uuid)
            await until(all_done(store, 1))
            # a retry would come after 0.01 s: give it many chances to (wrongly) happen
            assert service.notifier is not None
            for _ in range(20):
                await service.notifier.deliver_due()
                await asyncio.sleep(0.01)
        metrics = service.metrics
    [(_, _, _, delivered, _)] = store.outbox()
    assert delivered == ["email:failed", "webhook:failed"]
    assert webhook.requests == 1 and smtp.messages == {}
    reasons = {
        e["channel"]: e["reason"] for e in logs if e["event"] == "notification_undeliverable"
    }
    assert reasons == {
        "webhook": "HTTP 400: refused by the receiver",
        "email": "no email address known for OMERO user 'nomail'",
    }
    assert counter(metrics, "notifications_failed", channel="webhook", kind="permanent") == 1
    assert counter(metrics, "notifications_failed", channel="email", kind="permanent") == 1


async def test_without_channels_outcomes_are_marked_done_at_once(
    tmp_path: Path, root: Path
) -> None:
    settings = unit_settings(tmp_path, root)
    new = order(make_tiffs(root, 1))
    async with memory_replica(settings) as (service, _):
        store = service.store
        assert isinstance(store, MemoryStore)
        await store.submit(new)
        await finished(store, new.uuid)
        await until(all_done(store, 1))
    assert [delivered for *_, delivered, _ in store.outbox()] == [[]]


async def test_a_hanging_receiver_never_delays_the_next_order(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    webhook.hang = True
    settings = unit_settings(tmp_path, root, **notify_settings(webhook, None))
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
        # the second order was claimed, run and finished while the first one's
        # notification still hung
        assert webhook.open_hangs == 1 and webhook.deliveries == {}
        assert service.dispatcher.supervisor.failing() == []


async def test_a_second_send_of_the_same_outcome_reuses_its_key_and_body(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    """At least once: a replica that sent but could not record sends again after the lease;
    the receiver sees the same key and byte-identical signed body, and keeps one."""
    settings = unit_settings(tmp_path, root, **notify_settings(webhook, None))
    store = MemoryStore(worker_id="A", lease_seconds=1.0)
    new = order(make_tiffs(root, 1))
    await store.submit(new)
    await store.claim(1)
    await store.finish(Finish(new.uuid, STAGE_IMPORTED, "Imported"))
    gateway = SimulatorGateway(settings)
    notifier = Notifier(settings, store, gateway, Metrics())
    try:
        [note] = await store.claim_notifications(10, lease_seconds=0)
        await notifier.deliver(note)  # sent, then the replica "dies" before recording it
        assert await notifier.deliver_due() == 1  # the lease ran out: sent again, recorded
    finally:
        notifier.close()
        gateway.close()
    assert webhook.requests == 2 and webhook.duplicates == 1 and len(webhook.deliveries) == 1
    assert webhook.bad_signatures == 0
    assert store.outbox()[0][3:] == (["webhook"], True)


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
    for secret in ("pw-in-url", "t0k3n", "hooks/biomero", SECRET):
        assert secret not in text


def test_backoff_doubles_to_a_cap_with_jitter() -> None:
    waits = [backoff(n, 5.0, rand=lambda: 0.5) for n in range(1, 12)]
    assert waits[:4] == [5.0, 10.0, 20.0, 40.0]
    assert max(waits) == BACKOFF_MAX
    assert backoff(3, 5.0, rand=lambda: 0.0) == 15.0 and backoff(3, 5.0, rand=lambda: 1.0) == 25.0
    assert backoff(10_000, 5.0) <= BACKOFF_MAX * 1.25


async def test_the_backlog_gauges_count_outcomes_still_owed(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    await webhook.stop()
    settings = unit_settings(tmp_path, root, **notify_settings(webhook, None))
    now = [1_800_000_000.0]
    store = MemoryStore(worker_id="A", clock=lambda: now[0])
    for _ in range(2):
        new = order(make_tiffs(root, 1))
        await store.submit(new)
        await store.claim(1)
        await store.finish(Finish(new.uuid, STAGE_IMPORTED, None))
    gateway = SimulatorGateway(settings)
    metrics = Metrics()
    notifier = Notifier(settings, store, gateway, metrics)
    try:
        assert await notifier.deliver_due() == 2  # both fail: the receiver is down
        await notifier.update_backlog()
        assert metrics.registry.get_sample_value("biomero_importer_notification_backlog") == 2
        oldest = metrics.registry.get_sample_value(
            "biomero_importer_oldest_notification_age_seconds"
        )
        assert oldest is not None and oldest >= 0
        await webhook.start()
        now[0] += BACKOFF_MAX * 2  # past any backoff
        assert await notifier.deliver_due() == 2
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


async def test_a_batch_of_one_users_outcomes_looks_the_address_up_once(
    tmp_path: Path, root: Path, smtp: SmtpReceiver
) -> None:
    settings = unit_settings(
        tmp_path, root, omero_simulator_users=USERS, **notify_settings(None, smtp)
    )
    store = MemoryStore(worker_id="A")
    for _ in range(3):
        new = order(make_tiffs(root, 1))
        await store.submit(new)
        await store.claim(1)
        await store.finish(Finish(new.uuid, STAGE_IMPORTED, None))
    gateway = CountingGateway(settings)
    notifier = Notifier(settings, store, gateway, Metrics())
    try:
        assert await notifier.deliver_due() == 3
    finally:
        notifier.close()
        gateway.close()
    assert gateway.lookups == 1
    assert [to for to, _ in smtp.messages.values()] == [[RESEARCHER]] * 3


class BrokenOutbox(MemoryStore):
    """An outbox whose every read fails (a bug, a broken table): imports must go on."""

    async def claim_notifications(self, limit: int, lease_seconds: float) -> list[Notification]:
        raise RuntimeError("outbox broken")


async def test_a_failing_notifier_never_stops_the_replica_from_claiming(
    tmp_path: Path, root: Path, webhook: WebhookReceiver
) -> None:
    settings = unit_settings(tmp_path, root, **notify_settings(webhook, None))
    store = BrokenOutbox(worker_id=settings.worker_id, lease_seconds=settings.lease_seconds)
    with structlog.testing.capture_logs() as logs:
        async with memory_replica(settings, store) as (service, _):
            await until(lambda: sum(e["event"] == "notifications_pass_failed" for e in logs) >= 2)
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
    store = MemoryStore(worker_id="A")
    new = order(make_tiffs(root, 1))
    await store.submit(new)
    await store.claim(1)
    await store.finish(Finish(new.uuid, STAGE_IMPORTED, None))
    values = {**notify_settings(None, smtp), "notify_email_starttls": True}
    metrics = Metrics()
    try:
        for password, expected in (("wrong", False), ("smtp-pw", True)):
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
                [note] = await store.claim_notifications(10, lease_seconds=0)
                result = await notifier.deliver(note)
            finally:
                notifier.close()
                gateway.close()
            # a refused login concerns every message: tried again later, not given up
            assert result.done is expected and smtp.logins[-1] == ("importer", expected)
    finally:
        smtp.stop()
    assert counter(metrics, "notifications_failed", channel="email", kind="retry") == 1
    assert [to for to, _ in smtp.messages.values()] == [[RESEARCHER]]


def _note(**changes: Any) -> Notification:
    values: dict[str, Any] = {
        "id": 1,
        "uuid": "u-1",
        "event_id": 7,
        "stage": STAGE_INGEST_FAILED,
        "attempts": 1,
        "delivered": (),
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
    assert sign(body, "k") == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    mail = email_message(note, sender="Imaging <imaging@facility.example>", recipient=RESEARCHER)
    again = email_message(note, sender="x@facility.example", recipient="a@b")
    assert mail["Message-ID"] == again["Message-ID"]  # one id per outcome, whatever the sender
    assert str(mail["Message-ID"]).endswith("@facility.example>")
    assert "\n" not in str(mail["Subject"]) and str(mail["Subject"]).startswith("Import failed")
    cancelled = email_message(
        _note(description="Cancelled"), sender="i@facility.example", recipient=RESEARCHER
    )
    assert str(cancelled["Subject"]) == "Import cancelled: order u-1"
