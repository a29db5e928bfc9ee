"""Orders start at once, however they were written; the listener survives losing its backend."""

from __future__ import annotations

import asyncio
import time
import uuid as uuidlib
from pathlib import Path

import asyncpg

from biomero_importer.utils import ingest_tracker
from tests.support import (
    PICKED_UP,
    insert_order,
    make_settings,
    make_tiffs,
    running_service,
    wait_for_stage,
)

SLOW_POLL = 60.0  # far longer than any wait below: a pickup can only come from NOTIFY


async def test_raw_sql_order_is_picked_up_without_polling(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root / "raw", 2)
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=SLOW_POLL)
    async with running_service(settings, migrated_url):
        await asyncio.sleep(0.3)  # let the listener connect
        started = time.monotonic()
        order = await insert_order(migrated_url, files)
        await wait_for_stage(migrated_url, order, PICKED_UP, timeout=2)
        assert time.monotonic() - started < 1.0
        done = await wait_for_stage(migrated_url, order)
        assert done["stage"] == "Import Completed"
        assert done["file_names"] == '["image0.tif", "image1.tif"]'


async def test_compat_api_order_as_omero_biomero_writes_it(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root / "web", 1)
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=SLOW_POLL)
    assert ingest_tracker.initialize_ingest_tracker(
        {"ingest_tracking_db": migrated_url.replace("postgresql://", "postgresql+psycopg2://")}
    )
    order_uuid = str(uuidlib.uuid4())
    order = {
        "Group": "Demo",
        "Username": "researcher",
        "DestinationID": 151,
        "DestinationType": "Dataset",
        "UUID": order_uuid,
        "Files": [str(f) for f in files],
        "preprocessing_container": "cellularimagingcf/convertleica-docker:v1.2.0",
        "preprocessing_inputfile": "{Files}",
        "preprocessing_outputfolder": "/data",
        "preprocessing_altoutputfolder": "/out",
        "preprocessing_saveoption": "single",
        "extra_params": {"image_uuid": "abc"},
    }
    async with running_service(settings, migrated_url):
        await asyncio.sleep(0.3)
        row_id = await asyncio.to_thread(
            ingest_tracker.log_ingestion_step, order, ingest_tracker.STAGE_NEW_ORDER
        )
        assert isinstance(row_id, int)
        await wait_for_stage(migrated_url, order_uuid, PICKED_UP, timeout=2)
        done = await wait_for_stage(migrated_url, order_uuid)
    # the image is outside the allowlist of this test service: refused before anything runs
    assert done["stage"] == "Import Failed"
    assert "is not allowed" in done["description"]
    conn = await asyncpg.connect(migrated_url)
    try:
        pre = await conn.fetchrow(
            "SELECT p.* FROM imports i JOIN imports_preprocessing p ON p.id = i.preprocessing_id"
            " WHERE i.uuid = $1 LIMIT 1",
            order_uuid,
        )
    finally:
        await conn.close()
    assert pre is not None
    assert pre["container"] == "cellularimagingcf/convertleica-docker:v1.2.0"
    assert pre["input_file"] == "{Files}"
    assert '"image_uuid": "abc"' in pre["extra_params"]
    assert '"saveoption": "single"' in pre["extra_params"]


async def test_manual_retry_update_wakes_the_dispatcher(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=SLOW_POLL)
    missing = import_root / "later.tif"
    async with running_service(settings, migrated_url):
        await asyncio.sleep(0.3)
        order = await insert_order(migrated_url, [missing])
        failed = await wait_for_stage(migrated_url, order)
        assert failed["stage"] == "Import Failed"
        assert failed["description"].startswith("File not found")
        make_tiffs(import_root, 1, prefix="later")
        (import_root / "later0.tif").rename(missing)
        conn = await asyncpg.connect(migrated_url)
        try:
            await conn.execute("UPDATE imports SET stage = 'Import Pending' WHERE uuid = $1", order)
        finally:
            await conn.close()
        done = await wait_for_stage(migrated_url, order, ["Import Completed"], timeout=5)
    assert done["stage"] == "Import Completed"


async def test_listener_killed_orders_still_start_and_listener_returns(
    migrated_url: str, tmp_path: Path, import_root: Path
) -> None:
    files = make_tiffs(import_root, 2)
    settings = make_settings(tmp_path, migrated_url, [import_root], poll_interval=1.0)
    async with running_service(settings, migrated_url) as service:
        await asyncio.sleep(0.3)
        listener = service.dispatcher.listener
        assert listener is not None and listener.connected
        conn = await asyncpg.connect(migrated_url)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%' AND datname = current_database()"
            )
        finally:
            await conn.close()
        assert killed >= 1
        order = await insert_order(migrated_url, files[:1])
        await wait_for_stage(migrated_url, order, PICKED_UP, 2.5)
        deadline = time.monotonic() + 5
        while listener.reconnects < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert listener.connected and listener.reconnects >= 1
        again = await insert_order(migrated_url, files[1:])
        await wait_for_stage(migrated_url, again, timeout=5)
