"""A connection going back to the store's pool costs no statement (issue 22), and still comes
back clean: asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
RESET ALL``) was one more round trip after every pool call, for state the service never leaves
on a pooled connection."""

from __future__ import annotations

import asyncpg

from biomero_importer.db.urls import asyncpg_dsn
from biomero_importer.store import PostgresStore


async def _last_statement(url: str, pid: int) -> str:
    conn = await asyncpg.connect(url)
    try:
        query: str = await conn.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
        return query
    finally:
        await conn.close()


async def test_a_released_connection_runs_no_reset_statement(migrated_url: str) -> None:
    url = asyncpg_dsn(migrated_url)
    store = PostgresStore(url, pool_size=1, retry=False)
    await store.open()
    try:
        async with store.pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        assert await store.ping()
        # the one connection of the pool: its last statement is the store's own, not a reset
        assert await _last_statement(url, pid) == "SELECT 1"
        assert await store.append_stage("no-such-order", "Import Started", run=1) is False
        assert "pg_advisory_unlock_all" not in await _last_statement(url, pid)
    finally:
        await store.close()


async def test_a_transaction_left_open_is_still_rolled_back_on_release(migrated_url: str) -> None:
    url = asyncpg_dsn(migrated_url)
    store = PostgresStore(url, pool_size=1, retry=False)
    await store.open()
    try:
        async with store.pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TABLE left_open (n int)")
        async with store.pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('left_open')") is None
    finally:
        await store.close()
