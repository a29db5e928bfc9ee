"""Every statement that appends a row for an order copies its ``import_options`` unchanged
(issue 13): claim, stage rows, finish, recovery, cancel and retry, all through db/sql.py."""

from __future__ import annotations

import asyncio

from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.store import Finish, PostgresStore
from tests.support import history, insert_order

OPTIONS = '{"schema": 2, "registration": {"platePixelSource": "source"}, "operations": []}'


async def test_every_row_written_for_an_order_keeps_its_import_options(migrated_url: str) -> None:
    store = PostgresStore(asyncpg_dsn(migrated_url), worker_id="w1", lease_seconds=0.3, pool_size=2)
    await store.open()
    try:
        finished = await insert_order(migrated_url, ["/data/a.tif"], import_options=OPTIONS)
        (claimed,) = await store.claim(1)
        assert claimed.import_options == OPTIONS
        assert await store.append_stage(finished, "Import Preprocessing", run=claimed.runs)
        done = Finish(finished, "Import Completed", None, ["a.tif"], run=claimed.runs)
        assert await store.finish(done)

        abandoned = await insert_order(migrated_url, ["/data/b.tif"], import_options=OPTIONS)
        assert [o.uuid for o in await store.claim(1)] == [abandoned]
        await asyncio.sleep(0.5)  # the lease expires: another replica's recovery closes it
        other = PostgresStore(asyncpg_dsn(migrated_url), worker_id="w2", pool_size=2)
        await other.open()
        try:
            assert await other.recover_expired(max_attempts=1) == [(abandoned, "Import Failed")]
        finally:
            await other.close()

        cancelled = await insert_order(migrated_url, ["/data/c.tif"], import_options=OPTIONS)
        assert (await store.request_cancel(cancelled)).cancelled
        assert await store.retry(finished, "retried") == "Import Completed"
    finally:
        await store.close()

    for order, stages in (
        (finished, ["Import Pending", "Import Started", "Import Preprocessing",
                    "Import Completed", "Import Pending"]),
        (abandoned, ["Import Pending", "Import Started", "Import Failed"]),
        (cancelled, ["Import Pending", "Import Failed"]),
    ):  # fmt: skip
        rows = await history(migrated_url, order)
        assert [row["stage"] for row in rows] == stages
        assert {row["import_options"] for row in rows} == {OPTIONS}
