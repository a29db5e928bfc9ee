"""Acceptance: outcome notifications survive a webhook receiver that is down for 60 s.

Two replicas on a real PostgreSQL finish several orders (completed and failed) while the
webhook receiver is down; the researcher's emails arrive meanwhile (a channel does not wait
for another). Once the receiver is back, every outcome is delivered exactly once as the
idempotent receiver sees it, each signature verifies, and the outbox is done.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import pytest

from biomero_importer.observability.metrics import Metrics
from tests.notify_support import SmtpReceiver, WebhookReceiver, notify_settings
from tests.support import (
    insert_order,
    make_settings,
    make_tiffs,
    running_service,
    wait_for_stage,
)

DOWN_SECONDS = 60.0
SECRET = "acceptance-hmac-secret"
RESEARCHER = "researcher@lab.example"


async def outbox(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch("SELECT * FROM importer_outbox ORDER BY id"))
    finally:
        await conn.close()


async def until_true(check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert callable(check)
        if await check():
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(480)
async def test_a_receiver_down_for_a_minute_gets_every_outcome_once_signed(
    tmp_path: Path, migrated_url: str, import_root: Path
) -> None:
    webhook = WebhookReceiver(SECRET)  # down: not listening yet
    smtp = SmtpReceiver()
    smtp.start()
    settings = [
        make_settings(
            tmp_path,
            migrated_url,
            [import_root],
            poll_interval=0.5,
            omero_simulator_fail_pattern=r"broken\d*\.tif$",
            omero_simulator_users={"researcher": {"groups": ["Demo"], "email": RESEARCHER}},
            **notify_settings(webhook, smtp),
        )
        for _ in range(2)
    ]
    down_since = time.monotonic()
    metrics: list[Metrics] = []
    try:
        async with AsyncExitStack() as stack:
            for replica in settings:
                service = await stack.enter_async_context(running_service(replica, migrated_url))
                metrics.append(service.metrics)
            good = [
                await insert_order(migrated_url, make_tiffs(import_root / f"o{n}", 1))
                for n in range(4)
            ]
            failing = await insert_order(
                migrated_url, make_tiffs(import_root / "bad", 1, prefix="broken")
            )
            orders = [*good, failing]
            rows = {u: await wait_for_stage(migrated_url, u, timeout=60) for u in orders}
            assert {rows[u]["stage"] for u in good} == {"Import Completed"}
            assert rows[failing]["stage"] == "Import Failed"

            # the researcher's emails do not wait for the webhook
            async def emailed() -> bool:
                return len(smtp.messages) == len(orders)

            await until_true(emailed, timeout=60)
            waiting = await outbox(migrated_url)
            assert len(waiting) == len(orders)
            assert all(r["done_at"] is None and r["delivered"] == ["email"] for r in waiting)
            assert all("webhook" in (r["last_error"] or "") for r in waiting)
            assert webhook.requests == 0

            await asyncio.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_since)))
            await webhook.start()

            async def delivered() -> bool:
                rows = await outbox(migrated_url)
                return all(r["done_at"] is not None for r in rows)

            # the next attempt comes within one backoff (5 s doubling, jittered) of its return
            await until_true(delivered, timeout=240)
    finally:
        await webhook.stop()
        smtp.stop()

    done = await outbox(migrated_url)
    keys = {f"{r['uuid']}:{r['event_id']}" for r in done}
    assert [sorted(r["delivered"]) for r in done] == [["email", "webhook"]] * len(orders)
    # exactly one delivery per outcome, as the idempotent receiver sees it, all signed
    assert set(webhook.deliveries) == keys and len(keys) == len(orders)
    assert webhook.bad_signatures == 0
    # two replicas, one lease per row: nothing was sent twice at the same moment
    assert webhook.duplicates == 0
    outcomes = {body["uuid"]: body["outcome"] for body in webhook.deliveries.values()}
    assert outcomes == {**dict.fromkeys(good, "completed"), failing: "failed"}
    for body in webhook.deliveries.values():
        assert body["stage"] == rows[body["uuid"]]["stage"]
        assert body["user"] == "researcher" and body["timings"]["finished_at"] is not None

    assert {tuple(to) for to, _ in smtp.messages.values()} == {(RESEARCHER,)}
    subjects = {str(m["Subject"]) for _, m in smtp.messages.values()}
    assert subjects == {
        *(f"Import completed: order {u}" for u in good),
        f"Import failed: order {failing}",
    }
    retried = sum(
        m.registry.get_sample_value(
            "biomero_importer_notifications_failed_total", {"channel": "webhook", "kind": "retry"}
        )
        or 0.0
        for m in metrics
    )
    assert retried >= len(orders)
