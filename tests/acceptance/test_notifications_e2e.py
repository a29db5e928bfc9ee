"""Acceptance: outcome notifications on a bad day, and with replicas configured differently.

Bad day: two replicas on a real PostgreSQL finish 200 orders (completed and failed) while the
SMTP server accepts connections and never answers, then answers; the webhook receiver answers
401 for 30 s (its secret being rotated), then flaps between 503 and 200 for 60 s, then 200.
Every outcome must reach the receiver exactly once (counted there by ``webhook-id``, every
request verified with the Standard Webhooks reference verifier) within 60 s of it answering
200 for good, no duplicate may appear after twice the delivery lease, and every email must
arrive once SMTP answers. Leases, backoffs and timeouts are shortened so this takes about two
minutes; the figures are printed (run with ``-s`` to see them).

Skew: replica A has the webhook and email, replica B the webhook only: every outcome still
gets its email (the channels are owed by the database, not by whichever replica claims), and
the difference is logged and reported by ``check``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog

from biomero_importer.notify import channel_skew
from tests.notify_support import (
    SmtpBlackHole,
    SmtpReceiver,
    WebhookReceiver,
    free_port,
    new_secret,
    notify_settings,
)
from tests.support import insert_order, make_settings, make_tiffs, running_service

RESEARCHER = "researcher@lab.example"
USERS = {"researcher": {"groups": ["Demo"], "email": RESEARCHER}}
OUTCOMES = 200
FAILING_EVERY = 10  # one order in ten fails
UNAUTHORIZED_FOR = 30.0
FLAPPING_FOR = 60.0
SMTP_SILENT_FOR = 40.0
LEASE = 6.0
# shortened for the test: the first retry after 1 s, doubling to 8 s
BAD_DAY: dict[str, Any] = {
    "poll_interval": 0.5,
    "max_workers": 8,
    "notify_retry_backoff": 1.0,
    "notify_retry_backoff_max": 8.0,
    "notify_delivery_lease": LEASE,
    "notify_webhook_timeout": 2.0,
    "notify_email_timeout": 2.0,
    "omero_simulator_fail_pattern": r"broken\d*\.tif$",
    "omero_simulator_users": USERS,
}


async def outbox(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch("SELECT * FROM importer_outbox ORDER BY id"))
    finally:
        await conn.close()


async def until_true(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(420)
async def test_a_bad_day_delivers_every_outcome_exactly_once(
    tmp_path: Path, migrated_url: str, import_root: Path
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    wall = time.time() - loop.time()  # loop time to the receivers' wall clock

    def answer() -> int:
        """401 while the secret is rotated, then 503 and 200 in turns, then 200."""
        elapsed = loop.time() - start
        if elapsed < UNAUTHORIZED_FOR:
            return 401
        if elapsed < UNAUTHORIZED_FOR + FLAPPING_FOR:
            return 503 if int(elapsed) % 2 == 0 else 200
        return 200

    webhook = WebhookReceiver(new_secret(), answer=answer)
    await webhook.start()
    smtp_port = free_port()
    hole = SmtpBlackHole(smtp_port)
    smtp = SmtpReceiver(port=smtp_port)
    smtp_values = {
        "notify_email_host": "127.0.0.1",
        "notify_email_port": smtp_port,
        "notify_email_starttls": False,
        "notify_email_sender": "imaging@facility.example",
    }
    settings = [
        make_settings(
            tmp_path,
            migrated_url,
            [import_root],
            **BAD_DAY,
            **notify_settings(webhook, None),
            **smtp_values,
        )
        for n in range(2)
    ]
    smtp_answering_at = None
    try:
        async with AsyncExitStack() as stack:
            for replica in settings:
                await stack.enter_async_context(running_service(replica, migrated_url))
            start = loop.time()  # the receiver's clock starts with both replicas up
            # outcomes through the whole bad stretch: half in the 401 window, half while
            # the receiver flaps
            uuids = []
            spread = (UNAUTHORIZED_FOR + FLAPPING_FOR - 10) / OUTCOMES
            for n in range(OUTCOMES):
                broken = n % FAILING_EVERY == 0
                files = make_tiffs(import_root / f"o{n}", 1, prefix="broken" if broken else "image")
                uuids.append(await insert_order(migrated_url, files))
                await asyncio.sleep(max(0.0, start + (n + 1) * spread - loop.time()))
                if smtp_answering_at is None and loop.time() - start >= SMTP_SILENT_FOR:
                    hole.stop()
                    smtp.start()
                    smtp_answering_at = loop.time()
            if smtp_answering_at is None:
                await asyncio.sleep(max(0.0, start + SMTP_SILENT_FOR - loop.time()))
                hole.stop()
                smtp.start()
                smtp_answering_at = loop.time()
            good_for_good = start + UNAUTHORIZED_FOR + FLAPPING_FOR

            async def all_delivered() -> bool:
                rows = await outbox(migrated_url)
                return len(rows) == OUTCOMES and all(r["done_at"] is not None for r in rows)

            await until_true(all_delivered, timeout=good_for_good + 60 - loop.time())
            done_at = loop.time()
            requests_then = webhook.requests
            # nothing more may arrive: not after twice the delivery lease either
            await asyncio.sleep(2 * LEASE)
            rows = await outbox(migrated_url)
            conn = await asyncpg.connect(migrated_url)
            try:
                deliveries = await conn.fetch("SELECT * FROM importer_outbox_delivery")
            finally:
                await conn.close()
    finally:
        await webhook.stop()
        hole.stop()
        smtp.stop()

    keys = {f"{r['uuid']}:{r['event_id']}" for r in rows}
    assert len(keys) == OUTCOMES and {r["uuid"] for r in rows} == set(uuids)
    # exactly once, as the receiver counts by webhook-id, every request verified
    assert set(webhook.accepted) == keys
    assert all(count == 1 for count in webhook.accepted.values())
    assert webhook.duplicates == 0 and webhook.bad_signatures == 0
    assert webhook.requests == requests_then
    assert all(sorted(r["delivered"]) == ["email", "webhook"] for r in rows)
    assert len(deliveries) == 2 * OUTCOMES
    assert all(d["delivered_at"] is not None and d["given_up_at"] is None for d in deliveries)
    # within 60 s of the receiver answering 200 for good
    last_accept = max(webhook.accepted_at.values()) - wall
    assert last_accept - good_for_good < 60
    # every email once SMTP answered, one per outcome, to the researcher
    assert len(smtp.messages) == OUTCOMES
    assert {tuple(to) for to, _ in smtp.messages.values()} == {(RESEARCHER,)}
    assert hole.connections > 0
    assert smtp_answering_at is not None

    # the figures: how long each outcome waited once its channel could take it
    queued = {f"{r['uuid']}:{r['event_id']}": r["created_at"].timestamp() for r in rows}
    webhook_delays = [webhook.accepted_at[k] - queued[k] for k in keys]
    answering = smtp_answering_at + wall
    by_key = {str(m["Idempotency-Key"]): mid for mid, (_, m) in smtp.messages.items()}
    email_delays = [smtp.inbox.arrived_at[by_key[k]] - max(queued[k], answering) for k in keys]
    before_200 = sum(1 for t in webhook.accepted_at.values() if t - wall < good_for_good)
    webhook_attempts = [d["attempts"] for d in deliveries if d["channel"] == "webhook"]
    email_attempts = [d["attempts"] for d in deliveries if d["channel"] == "email"]
    print(  # noqa: T201 (the figures of the bad day, reported with -s)
        "\nbad day:",
        f"outcomes {OUTCOMES}; webhook: {webhook.requests} requests,",
        f"{sum(webhook.accepted.values())} accepted ({before_200} during the flapping),",
        f"duplicates {webhook.duplicates}, bad signatures {webhook.bad_signatures},",
        f"attempts per outcome median {statistics.median(webhook_attempts):g}"
        f" max {max(webhook_attempts)}, queued-to-accepted median"
        f" {statistics.median(webhook_delays):.1f} s max {max(webhook_delays):.1f} s,",
        f"last {last_accept - good_for_good:.1f} s after 200 for good;",
        f"email: {len(smtp.messages)} delivered ({smtp.inbox.received} sent),",
        f"{hole.connections} connections to the black hole, attempts median"
        f" {statistics.median(email_attempts):g} max {max(email_attempts)},",
        f"wait once SMTP answered median {statistics.median(email_delays):.1f} s"
        f" max {max(email_delays):.1f} s;",
        f"all done {done_at - start:.1f} s after start; no request in the {2 * LEASE:g} s after",
    )


@pytest.mark.timeout(180)
async def test_a_replica_without_email_never_drops_the_email_an_outcome_owes(
    tmp_path: Path, migrated_url: str, import_root: Path
) -> None:
    webhook = WebhookReceiver(new_secret())
    await webhook.start()
    smtp = SmtpReceiver()
    smtp.start()
    quick: dict[str, Any] = {"poll_interval": 0.3, "omero_simulator_users": USERS}
    both = make_settings(
        tmp_path, migrated_url, [import_root], **quick, **notify_settings(webhook, smtp)
    )
    hook_only = make_settings(
        tmp_path, migrated_url, [import_root], **quick, **notify_settings(webhook, None)
    )
    count = 30
    try:
        with structlog.testing.capture_logs() as logs:
            async with AsyncExitStack() as stack:
                a = await stack.enter_async_context(running_service(both, migrated_url))
                b = await stack.enter_async_context(running_service(hook_only, migrated_url))
                assert b.notifier is not None
                await b.notifier.record_channels()  # B now knows of A
                uuids = [
                    await insert_order(migrated_url, make_tiffs(import_root / f"o{n}", 1))
                    for n in range(count)
                ]

                async def all_done() -> bool:
                    rows = await outbox(migrated_url)
                    return len(rows) == count and all(r["done_at"] is not None for r in rows)

                await until_true(all_done, timeout=120)
                rows = await outbox(migrated_url)
                conn = await asyncpg.connect(migrated_url)
                try:
                    ran = await conn.fetch(
                        "SELECT last_worker_id, count(*) FROM importer_orders GROUP BY 1"
                    )
                finally:
                    await conn.close()
                agree, detail = channel_skew(hook_only, await b.store.channel_replicas())
                agree_a, _ = channel_skew(both, await a.store.channel_replicas())
    finally:
        await webhook.stop()
        smtp.stop()
    by_replica = {r["last_worker_id"]: r["count"] for r in ran}
    assert {r["uuid"] for r in rows} == set(uuids)
    assert all(sorted(r["delivered"]) == ["email", "webhook"] for r in rows)
    assert len(smtp.messages) == count and len(webhook.deliveries) == count
    assert webhook.duplicates == 0
    # B, which has no email, ran orders too: their emails were sent by A
    assert by_replica.get(hook_only.worker_id, 0) > 0, by_replica
    # the difference is reported: logged by the replicas, and by check's comparison
    skew = [e for e in logs if e["event"] == "notification_channels_differ"]
    assert skew and {tuple(e["ours"]) for e in skew} <= {("webhook",), ("webhook", "email")}
    assert not agree and "email" in detail and not agree_a
