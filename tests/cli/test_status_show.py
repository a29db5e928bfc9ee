"""status and show read the latest state and the full history without a running service."""

from __future__ import annotations

import json
import re
from pathlib import Path

from biomero_importer.db.migrate import is_at_head
from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.store import DeliveryResult, Finish, PostgresStore
from tests.cli.conftest import CliSetup, ainvoke, append_stage, execute, invoke
from tests.support import insert_order, make_settings, make_tiffs, write_config

# What a replica records on a running order's queue row, 3 s ago.
PROGRESS = (
    "UPDATE importer_orders SET progress = $2::json, progress_at = now() - interval '3 s'"
    " WHERE uuid = $1"
)
RUNNING_PROGRESS = {
    "step": "import",
    "units_done": 1,
    "units_total": 2,
    "current_file": "image1.tif",
    "bytes_done": 1500,
    "bytes_total": 2_400_000,
}


async def _orders(setup: CliSetup) -> dict[str, str]:
    files = make_tiffs(setup.root, 2)
    orders = {
        "old_done": await insert_order(setup.url, files, user="alice", group="Lab"),
        "failed": await insert_order(setup.url, files[:1], user="alice", group="Lab"),
        "pending": await insert_order(setup.url, files, user="bob", group="Other"),
        "running": await insert_order(
            setup.url, files, user="bob", group="Lab", destination_type="Screen"
        ),
    }
    await append_stage(setup.url, orders["old_done"], "Import Started")
    await append_stage(setup.url, orders["old_done"], "Import Completed")
    await append_stage(setup.url, orders["failed"], "Import Started")
    await append_stage(setup.url, orders["failed"], "Import Failed", "File not found: " + "x" * 200)
    await append_stage(setup.url, orders["running"], "Import Started")
    await execute(setup.url, PROGRESS, orders["running"], json.dumps(RUNNING_PROGRESS))
    await execute(
        setup.url,
        "UPDATE importer_orders SET updated_at = now() - interval '3 days' WHERE uuid = $1",
        orders["old_done"],
    )
    return orders


async def _status(setup: CliSetup, *args: str) -> list[dict[str, object]]:
    result = await ainvoke("status", *args, "--json", "--config", setup.config)
    assert result.exit_code == 0, result.output
    records: list[dict[str, object]] = json.loads(result.stdout)
    return records


async def test_status_filters(cli_setup: CliSetup) -> None:
    orders = await _orders(cli_setup)
    everything = await _status(cli_setup)
    assert [r["uuid"] for r in everything][-1] == orders["old_done"]
    assert {r["uuid"] for r in everything} == set(orders.values())
    assert {r["uuid"] for r in (await _status(cli_setup, "--user", "alice"))} == {
        orders["old_done"],
        orders["failed"],
    }
    assert {r["uuid"] for r in (await _status(cli_setup, "--group", "Lab"))} == {
        orders["old_done"],
        orders["failed"],
        orders["running"],
    }
    assert [r["uuid"] for r in (await _status(cli_setup, "--stage", "failed"))] == [
        orders["failed"]
    ]
    assert [r["uuid"] for r in (await _status(cli_setup, "--stage", "Import Started"))] == [
        orders["running"]
    ]
    recent = {r["uuid"] for r in (await _status(cli_setup, "--since", "1d"))}
    assert recent == set(orders.values()) - {orders["old_done"]}
    assert len(await _status(cli_setup, "--since", "4d")) == 4
    assert len(await _status(cli_setup, "--limit", "2")) == 2
    combined = await _status(cli_setup, "--user", "bob", "--group", "Lab")
    assert [r["uuid"] for r in combined] == [orders["running"]]
    record = combined[0]
    assert record["stage"] == "Import Started"
    assert record["destination_type"] == "Screen"
    assert record["files"] == 2
    progress = record["progress"]
    assert isinstance(progress, dict) and progress.pop("recorded_at")
    assert progress == RUNNING_PROGRESS
    assert all(r["progress"] is None for r in everything if r["uuid"] != orders["running"])


async def test_status_table(cli_setup: CliSetup) -> None:
    orders = await _orders(cli_setup)
    result = await ainvoke("status", "--config", cli_setup.config)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["UUID", "STAGE", "PROGRESS", "USER"]
    assert len(lines) == 2 + len(orders)
    running_line = next(line for line in lines if orders["running"] in line)
    assert running_line.split()[1:6] == ["Import", "Started", "import", "1/2", "bob"]
    failed_line = next(line for line in lines if orders["failed"] in line)
    assert "Import Failed" in failed_line
    assert "File not found: xxx" in failed_line
    assert "x" * 100 not in failed_line  # descriptions are truncated


async def test_status_rejects_bad_filters(cli_setup: CliSetup) -> None:
    assert (await ainvoke("status", "--since", "soon", "--config", cli_setup.config)).exit_code == 2
    assert (await ainvoke("status", "--stage", "done", "--config", cli_setup.config)).exit_code == 2
    assert (await ainvoke("status", "--limit", "0", "--config", cli_setup.config)).exit_code == 2


async def test_show_lists_the_full_history(cli_setup: CliSetup) -> None:
    files = make_tiffs(cli_setup.root, 1)
    order = await insert_order(
        cli_setup.url,
        files,
        preprocessing={"container": "localhost/convert:1", "extra_params": {"saveoption": "s"}},
    )
    await append_stage(cli_setup.url, order, "Import Started")
    await append_stage(cli_setup.url, order, "Import Preprocessing")
    await append_stage(cli_setup.url, order, "Import Failed", "OMERO unavailable, retry later")
    objects = [{"type": "Image", "id": 7, "name": "image0.tif", "annotated": True}]
    await execute(
        cli_setup.url,
        "UPDATE importer_orders SET objects = $2::json, attempts = 1, runs = 2,"
        " last_worker_id = 'host-1-abc' WHERE uuid = $1",
        order,
        json.dumps(objects),
    )

    result = await ainvoke("show", order, "--json", "--config", cli_setup.config)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [e["stage"] for e in record["history"]] == [
        "Import Pending",
        "Import Started",
        "Import Preprocessing",
        "Import Failed",
    ]
    assert record["description"] == "OMERO unavailable, retry later"
    assert record["preprocessing"]["container"] == "localhost/convert:1"
    assert record["preprocessing"]["extra_params"] == {"saveoption": "s"}
    assert (record["attempts"], record["runs"]) == (1, 2)
    assert record["objects"] == objects
    assert record["files"] == [str(files[0])]
    assert record["worker_id"] is None
    assert record["last_worker_id"] == "host-1-abc"

    text = await ainvoke("show", order, "--config", cli_setup.config)
    assert text.exit_code == 0, text.output
    assert "History (4 rows)" in text.stdout
    for stage in ("Import Pending", "Import Started", "Import Preprocessing", "Import Failed"):
        assert stage in text.stdout
    assert "localhost/convert:1" in text.stdout
    assert "image0.tif" in text.stdout
    assert "host-1-abc (last run; not running now)" in text.stdout


async def test_show_unknown_order(cli_setup: CliSetup) -> None:
    result = await ainvoke(
        "show", "00000000-0000-0000-0000-000000000000", "--config", cli_setup.config
    )
    assert result.exit_code == 1
    assert "no order with uuid" in result.stderr


def test_read_commands_never_migrate(database_url: str, tmp_path: Path, import_root: Path) -> None:
    settings = make_settings(tmp_path, database_url, [import_root])
    config = write_config(tmp_path / "settings.yml", settings)
    for args in (["status"], ["show", "x"], ["retry", "x"], ["cancel", "x"]):
        result = invoke(*args, "--config", config)
        assert result.exit_code == 2, result.output
        assert "biomero-importer migrate" in result.stderr
    assert is_at_head(database_url) == (False, None)


async def test_show_tells_where_a_running_order_is(cli_setup: CliSetup) -> None:
    order = await insert_order(cli_setup.url, make_tiffs(cli_setup.root, 2))
    await append_stage(cli_setup.url, order, "Import Started")
    await execute(cli_setup.url, PROGRESS, order, json.dumps(RUNNING_PROGRESS))
    text = await ainvoke("show", order, "--config", cli_setup.config)
    assert text.exit_code == 0, text.output
    (line,) = [line for line in text.stdout.splitlines() if line.startswith("Progress")]
    assert line.split(None, 1)[1] == (
        "import 1/2, 1.5 kB of 2.4 MB, image1.tif (recorded 3 s ago)"
    ), line
    record = json.loads(
        (await ainvoke("show", order, "--json", "--config", cli_setup.config)).stdout
    )
    assert record["progress"]["units_done"] == 1
    # the order ends: the stage trigger clears the progress, and show says so
    await append_stage(cli_setup.url, order, "Import Completed")
    text = await ainvoke("show", order, "--config", cli_setup.config)
    (line,) = [line for line in text.stdout.splitlines() if line.startswith("Progress")]
    assert line.split() == ["Progress", "-"]


async def test_show_says_when_a_waiting_order_is_tried_again(cli_setup: CliSetup) -> None:
    order = await insert_order(cli_setup.url, make_tiffs(cli_setup.root, 1))
    store = PostgresStore(asyncpg_dsn(cli_setup.url), worker_id="host-1-abc", pool_size=2)
    await store.open()
    try:
        [claimed] = await store.claim(1)
        wait = "OMERO unavailable; retrying in 10 min, attempt 1 of 5"
        retry = Finish(
            claimed.uuid,
            "Import Pending",
            wait,
            delay=600,
            transient_retry=True,
            wait_cause="omero",
            run=claimed.runs,
        )
        assert await store.finish(retry)
    finally:
        await store.close()
    text = await ainvoke("show", order, "--config", cli_setup.config)
    assert text.exit_code == 0, text.output
    # a wait tied to OMERO ends when its probe finds OMERO back: the next try is the latest
    assert re.search(r"Waiting for\s+OMERO to answer; tried the moment it does", text.stdout)
    assert re.search(
        r"Next try\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(at the latest, (in 10 min|in 9 min)\)",
        text.stdout,
    )
    assert re.search(r"Automatic retries\s+1 used", text.stdout)
    assert wait in text.stdout  # the wait is a row of the history
    record = json.loads(
        (await ainvoke("show", order, "--json", "--config", cli_setup.config)).stdout
    )
    assert record["retries"] == 1 and record["not_before"] is not None
    assert record["wait_cause"] == "omero"
    assert record["waiting_since"] is None


async def test_show_lists_each_channel_the_outcome_owes(cli_setup: CliSetup) -> None:
    store = PostgresStore(asyncpg_dsn(cli_setup.url), worker_id="replica-a", pool_size=2)
    await store.open()
    try:
        await store.record_channels(["email", "webhook"], {})
        order = await insert_order(cli_setup.url, make_tiffs(cli_setup.root, 1))
        await append_stage(cli_setup.url, order, "Import Started")
        await append_stage(cli_setup.url, order, "Import Completed", "Imported 1 image")
        [hook] = await store.claim_deliveries("webhook", 10, 60)
        await store.record_delivery(
            DeliveryResult(hook.note.id, "webhook", hook.token, "retry", 60, "HTTP 401")
        )
        [mail] = await store.claim_deliveries("email", 10, 60)
        await store.record_delivery(
            DeliveryResult(mail.note.id, "email", mail.token, "given_up", error="SMTP 550")
        )
    finally:
        await store.close()
    result = await ainvoke("show", order, "--json", "--config", cli_setup.config)
    assert result.exit_code == 0, result.output
    channels = {c["channel"]: c for c in json.loads(result.stdout)["notifications"]}
    assert set(channels) == {"email", "webhook"}
    assert channels["webhook"]["state"] == "owed" and channels["webhook"]["owed"]
    assert channels["webhook"]["attempts"] == 1
    assert channels["webhook"]["last_error"] == "HTTP 401"
    assert channels["webhook"]["next_attempt_at"] is not None
    assert channels["email"]["state"] == "given up" and channels["email"]["given_up"]
    assert channels["email"]["given_up_at"] is not None and not channels["email"]["owed"]
    assert channels["email"]["last_error"] == "SMTP 550"
    assert channels["email"]["delivered_at"] is None
    text = await ainvoke("show", order, "--config", cli_setup.config)
    assert text.exit_code == 0, text.output
    assert "Notifications of the outcome (2 channels)" in text.stdout
    assert re.search(r"email\s+given up\s+\S+ \S+\s+1\s+SMTP 550", text.stdout), text.stdout
    assert re.search(r"webhook\s+owed\s+\S+ \S+\s+1\s+HTTP 401", text.stdout), text.stdout
