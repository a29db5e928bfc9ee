"""retry appends a new pending row for a finished order; cancel ends pending and running ones."""

from __future__ import annotations

import asyncio

from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.store import Finish, PostgresStore
from tests.cli.conftest import CliSetup, ainvoke, append_stage, execute, run_cli
from tests.support import (
    PICKED_UP,
    history,
    insert_order,
    make_tiffs,
    running_service,
    wait_for_stage,
)

UNKNOWN = "00000000-0000-0000-0000-000000000000"


async def test_retry_requeues_a_failed_order(cli_setup: CliSetup) -> None:
    files = make_tiffs(cli_setup.root, 1)
    order = await insert_order(cli_setup.url, files)
    await append_stage(cli_setup.url, order, "Import Started")
    await append_stage(cli_setup.url, order, "Import Failed", "OMERO unavailable, retry later")
    await execute(cli_setup.url, "UPDATE importer_orders SET attempts = 1 WHERE uuid = $1", order)

    result = await ainvoke("retry", order, "--config", cli_setup.config)
    assert result.exit_code == 0, result.output
    assert "queued again" in result.stdout
    rows = await history(cli_setup.url, order)
    assert [r["stage"] for r in rows] == [
        "Import Pending",
        "Import Started",
        "Import Failed",
        "Import Pending",
    ]
    assert rows[2]["description"] == "OMERO unavailable, retry later"  # history kept
    queue = (await execute(cli_setup.url, "SELECT * FROM importer_orders WHERE uuid = $1", order))[
        0
    ]
    assert (queue["stage"], queue["attempts"], queue["latest_id"]) == (
        "Import Pending",
        0,
        rows[-1]["id"],
    )

    async with running_service(cli_setup.settings, cli_setup.url):
        done = await wait_for_stage(cli_setup.url, order, timeout=15)
    assert done["stage"] == "Import Completed"


async def test_retry_of_a_waiting_order_starts_it_within_a_second(cli_setup: CliSetup) -> None:
    """A waiting order (an hour still to go) retried by the CLI, and another by the documented
    SQL UPDATE, each start within a second: the retry wakes the replica (not its fallback
    poll, 30 s here)."""
    quiet = cli_setup.with_config(poll_interval=30.0)
    orders = [await insert_order(quiet.url, make_tiffs(quiet.root / f"w{i}", 1)) for i in (0, 1)]
    store = PostgresStore(asyncpg_dsn(quiet.url), worker_id="host-1-abc", pool_size=2)
    await store.open()
    try:
        for claimed in await store.claim(2):
            wait = "OMERO unavailable; retrying in 60 min, attempt 1 of 5"
            waits = Finish(
                claimed.uuid,
                "Import Pending",
                wait,
                delay=3600,
                transient_retry=True,
                run=claimed.runs,
            )
            assert await store.finish(waits)
    finally:
        await store.close()
    async with running_service(quiet.settings, quiet.url):
        await asyncio.sleep(1.0)  # the replica is up, and nothing is due
        for order in orders:
            assert (await history(quiet.url, order))[-1]["stage"] == "Import Pending"
        result = await ainvoke("retry", orders[0], "--config", quiet.config)
        assert result.exit_code == 0, result.output
        await wait_for_stage(quiet.url, orders[0], PICKED_UP, timeout=1.0)
        await execute(
            quiet.url, "UPDATE imports SET stage = 'Import Pending' WHERE uuid = $1", orders[1]
        )
        await wait_for_stage(quiet.url, orders[1], PICKED_UP, timeout=1.0)
        for order in orders:
            assert (await wait_for_stage(quiet.url, order))["stage"] == "Import Completed"


async def test_retry_refuses_unfinished_and_unknown_orders(cli_setup: CliSetup) -> None:
    order = await insert_order(cli_setup.url, make_tiffs(cli_setup.root, 1))
    pending = await ainvoke("retry", order, "--config", cli_setup.config)
    assert pending.exit_code == 1
    assert "is Import Pending" in pending.stderr
    assert "only finished orders" in pending.stderr
    unknown = await ainvoke("retry", UNKNOWN, "--config", cli_setup.config)
    assert unknown.exit_code == 1
    assert "no order with uuid" in unknown.stderr
    assert len(await history(cli_setup.url, order)) == 1


async def test_cancel_of_a_pending_order_ends_it_at_once(cli_setup: CliSetup) -> None:
    order = await insert_order(cli_setup.url, make_tiffs(cli_setup.root, 1))
    result = await ainvoke("cancel", order, "--config", cli_setup.config)
    assert result.exit_code == 0, result.output
    assert "cancelled before it started" in result.stdout
    rows = await history(cli_setup.url, order)
    assert [(r["stage"], r["description"]) for r in rows] == [
        ("Import Pending", None),
        ("Import Failed", "Cancelled"),
    ]
    again = await ainvoke("cancel", order, "--config", cli_setup.config)
    assert again.exit_code == 1
    assert "already finished" in again.stderr
    assert (await ainvoke("cancel", UNKNOWN, "--config", cli_setup.config)).exit_code == 1


async def test_running_order_refuses_retry_and_is_cancelled(cli_setup: CliSetup) -> None:
    files = make_tiffs(cli_setup.root, 1)
    slow = cli_setup.with_config(omero_simulator_import_delay=60, lease_seconds=30)
    async with running_service(slow.settings, slow.url) as service:
        order = await insert_order(slow.url, files)
        await wait_for_stage(slow.url, order, PICKED_UP, timeout=10)

        refused = await run_cli("retry", order, "--config", slow.config)
        assert refused.exit_code == 1
        assert "only finished orders" in refused.stderr

        cancelled = await run_cli("cancel", order, "--config", slow.config)
        assert cancelled.exit_code == 0, cancelled.stderr
        assert "Cancelled" in cancelled.stdout
        assert service.dispatcher.running_count == 0
    last = (await history(slow.url, order))[-1]
    assert (last["stage"], last["description"]) == ("Import Failed", "Cancelled")
