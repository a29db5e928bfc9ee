"""The migration procedure of the README, on a database as the original importer left it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path

import asyncpg
import psycopg2

from tests.db.upstream import columns, create_upstream, dump
from tests.support import make_settings, make_tiffs, running_service, wait_for_stage, write_config


async def _still_running(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM importer_orders"
                " WHERE stage IN ('Import Started', 'Import Preprocessing')"
            )
        )
    finally:
        await conn.close()


def _add_pending(url: str, files: list[Path], count: int) -> list[str]:
    """Orders the web UI queued while the original importer was down (no description column
    value, timestamp set by the client as the original did)."""
    uuids = [str(uuidlib.uuid4()) for _ in range(count)]
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            for n, order in enumerate(uuids):
                cur.execute(
                    "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
                    " stage, uuid, timestamp, files, file_names)"
                    " VALUES ('Demo', 'researcher', '151', 'Dataset', 'Import Pending', %s, now(),"
                    " %s, '[]')",
                    (order, json.dumps([str(files[n % len(files)])])),
                )
    finally:
        conn.close()
    return uuids


async def test_original_database_upgrades_and_pending_orders_run(
    database_url: str, tmp_path: Path, import_root: Path
) -> None:
    create_upstream(database_url, with_description=True, stamped=True, orders=300)
    pending = _add_pending(database_url, make_tiffs(import_root, 3), 5)
    # columns the original had; the migration adds import_options (upstream's 92e8f9e637a1)
    names = columns(database_url, "imports")
    history_before = dump(database_url, "imports")
    preprocessing_before = dump(database_url, "imports_preprocessing")

    settings = make_settings(
        tmp_path, database_url, [import_root], poll_interval=0.5, lease_seconds=1.0
    )
    config = write_config(tmp_path / "settings.yml", settings)
    migrated = subprocess.run(
        [sys.executable, "-m", "biomero_importer", "migrate", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr

    async with running_service(settings, database_url):
        for order in pending:
            done = await wait_for_stage(database_url, order, timeout=30)
            assert done["stage"] == "Import Completed", done["description"]
        # orders the original left half-done are recovered once a lease period has passed
        deadline = time.monotonic() + 20
        while await _still_running(database_url) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    history_after = dump(database_url, "imports", names)
    assert history_after[: len(history_before)] == history_before
    assert dump(database_url, "imports_preprocessing") == preprocessing_before
    # orders the original left half-done are closed with a reason instead of hanging forever
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM importer_orders"
                " WHERE stage IN ('Import Started', 'Import Preprocessing')"
            )
            (still_running,) = cur.fetchone() or (None,)
            cur.execute(
                "SELECT count(*) FROM imports WHERE description LIKE"
                " 'The importer stopped while this order ran%'"
            )
            (closed,) = cur.fetchone() or (None,)
    finally:
        conn.close()
    assert still_running == 0
    assert closed and closed > 0
