"""Every database state we can meet upgrades to head without losing a row."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from biomero_importer.db.migrate import (
    VERSION_TABLE,
    alembic_config,
    head_revision,
    include_name,
    include_object,
    is_at_head,
    migrate,
)
from biomero_importer.db.models import Base
from biomero_importer.db.sql import DEFAULT_CHANNEL
from biomero_importer.db.urls import asyncpg_dsn, sync_url
from biomero_importer.store import PostgresStore

from .upstream import columns, create_upstream, dump

T = TypeVar("T")


def _queue(url: str) -> dict[str, tuple[str, int]]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT uuid, stage, latest_id FROM importer_orders")
            return {uuid: (stage, latest) for uuid, stage, latest in cur.fetchall()}
    finally:
        conn.close()


def test_empty_database_migrates_to_head(database_url: str) -> None:
    before, after = migrate(database_url, channel=DEFAULT_CHANNEL)
    assert before is None
    assert after == head_revision()
    assert "description" in columns(database_url, "imports")
    assert is_at_head(database_url) == (True, head_revision())


@pytest.mark.parametrize(
    ("with_description", "stamped", "revision"),
    [
        (False, False, "78d3d6d84aec"),
        (True, False, "78d3d6d84aec"),
        (True, True, "78d3d6d84aec"),
        (True, True, "92e8f9e637a1"),
    ],
    ids=[
        "tables-without-description",
        "tables-without-version-table",
        "stamped-78d3d6d84aec",
        "stamped-92e8f9e637a1",
    ],
)
def test_upstream_database_is_adopted_with_every_row(
    database_url: str, with_description: bool, stamped: bool, revision: str
) -> None:
    create_upstream(
        database_url, with_description=with_description, stamped=stamped, revision=revision
    )
    names_before = columns(database_url, "imports")
    imports_before = dump(database_url, "imports")
    pre_before = dump(database_url, "imports_preprocessing")
    neighbours_before = dump(database_url, "biomero_job_view")

    migrate(database_url, channel=DEFAULT_CHANNEL)

    # every column a state lacked is added, NULL for history rows; every other value is kept
    added = [name for name in columns(database_url, "imports") if name not in names_before]
    assert set(added) <= {"description", "import_options"}
    assert revision != "92e8f9e637a1" or "import_options" not in added
    if added:
        assert set(dump(database_url, "imports", added)) == {(None,) * len(added)}
    assert dump(database_url, "imports", names_before) == imports_before
    assert dump(database_url, "imports_preprocessing") == pre_before
    assert dump(database_url, "biomero_job_view") == neighbours_before
    assert dump(database_url, "alembic_version_biomero") == [("a1b2c3d4e5f6",)]
    assert is_at_head(database_url)[0]

    # one queue row per order, pointing at its latest history row
    latest: dict[str, tuple[str, int]] = {}
    for row in imports_before:
        row_id, stage, uuid = row[0], row[5], row[6]
        if uuid not in latest or latest[uuid][1] < row_id:
            latest[uuid] = (str(stage), int(str(row_id)))
    assert _queue(database_url) == latest


def _stage_a_previous_head(url: str) -> None:
    """A database our 2.0.0.dev0 left at its head c41d8e2f7a93: that graph had no 92e8f9e637a1,
    so the tables have no ``import_options``."""
    create_upstream(url, with_description=True, stamped=True, orders=20)
    engine = create_engine(sync_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            command.upgrade(alembic_config(conn), "c41d8e2f7a93")
            conn.execute(text("ALTER TABLE imports DROP COLUMN import_options"))
            conn.commit()
    finally:
        engine.dispose()


def test_our_previous_head_upgrades_and_gains_import_options(database_url: str) -> None:
    _stage_a_previous_head(database_url)
    names_before = columns(database_url, "imports")
    imports_before = dump(database_url, "imports")
    queue_before = _queue(database_url)

    before, after = migrate(database_url, channel=DEFAULT_CHANNEL)

    assert (before, after) == ("c41d8e2f7a93", head_revision())
    assert "import_options" in columns(database_url, "imports")
    assert dump(database_url, "imports", names_before) == imports_before
    assert _queue(database_url) == queue_before


def _insert(cur: Any, stage: str, order: str, options: str | None) -> None:
    cur.execute(
        "INSERT INTO imports (group_name, user_name, destination_id, destination_type, stage,"
        " uuid, files, file_names, import_options)"
        " VALUES ('g', 'u', '1', 'Screen', %s, %s, '[\"/data/p.zarr\"]', '[]', %s)",
        (stage, order, options),
    )


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "running"])
def test_duplicate_submission_restore_keeps_import_options(
    migrated_url: str, finished: bool
) -> None:
    options = '{"schema": 1, "platePixelSource": "label", "plateLabelName": "nuclei"}'
    order = "00000000-0000-4000-8000-0000000000aa"
    conn = psycopg2.connect(migrated_url)
    try:
        with conn, conn.cursor() as cur:
            _insert(cur, "Import Pending", order, options)
            if finished:
                _insert(cur, "Import Completed", order, options)
            else:
                _insert(cur, "Import Started", order, options)
                cur.execute("UPDATE importer_orders SET worker_id = 'w' WHERE uuid = %s", (order,))
            # the second submission of the same order, by a writer that sends no options
            _insert(cur, "Import Pending", order, None)
            cur.execute(
                "SELECT stage, description, import_options FROM imports WHERE uuid = %s"
                " ORDER BY id DESC LIMIT 1",
                (order,),
            )
            stage, description, restored = cur.fetchone()
    finally:
        conn.close()
    assert stage == ("Import Completed" if finished else "Import Started")
    assert description.startswith("Duplicate submission ignored")
    assert restored == options


def test_revisions_hold_their_own_sql() -> None:
    """An old revision must not change when the application changes: no revision imports
    application code (the SQL it runs is frozen in its own file)."""
    versions = Path(__file__).resolve().parents[2] / "migrations" / "versions"
    for revision_file in versions.glob("*.py"):
        tree = ast.parse(revision_file.read_text())
        imported = {
            node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        } | {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        assert not any(name.startswith("biomero_importer") for name in imported), revision_file


def test_upstream_head_is_in_our_graph() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_revision("92e8f9e637a1").down_revision == "78d3d6d84aec"
    chain = [rev.revision for rev in script.walk_revisions("base", "heads")]
    assert chain.index("92e8f9e637a1") > chain.index(head_revision())
    assert "c41d8e2f7a93" in chain


def test_database_at_head_is_left_alone(migrated_url: str) -> None:
    before, after = migrate(migrated_url, channel=DEFAULT_CHANNEL)
    assert before == after == head_revision()


def test_three_processes_migrate_exactly_once(database_url: str) -> None:
    create_upstream(database_url, with_description=False, stamped=False, orders=20)
    rows_before = len(dump(database_url, "imports"))
    code = (
        "import sys; from biomero_importer.db.migrate import migrate;"
        "b, a = migrate(sys.argv[1], channel='biomero_importer_orders'); print('RESULT', b, a)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, database_url], stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = [
        line.split()[1:]
        for p in procs
        for line in p.communicate(timeout=120)[0].splitlines()
        if line.startswith("RESULT ")
    ]
    assert [p.returncode for p in procs] == [0, 0, 0]
    # exactly one of them saw the unversioned database; the others found it at head
    assert sorted(out[0] for out in outputs) == sorted(["None", head_revision(), head_revision()])
    assert len(dump(database_url, "imports")) == rows_before
    assert dump(database_url, VERSION_TABLE) == [(head_revision(),)]


def test_models_match_migrated_schema(migrated_url: str) -> None:
    engine = create_engine(sync_url(migrated_url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_name": include_name,
                    "include_object": include_object,
                    "compare_type": True,
                    "compare_server_default": True,
                },
            )
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_autogenerate_ignores_other_applications_tables(database_url: str) -> None:
    create_upstream(database_url, with_description=True, stamped=True, orders=1)
    migrate(database_url, channel=DEFAULT_CHANNEL)
    engine = create_engine(sync_url(database_url))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"include_name": include_name, "include_object": include_object}
            )
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    touched = {str(item) for item in diff}
    assert not any("biomero" in entry for entry in touched)


def _owners(url: str) -> tuple[dict[str, tuple[str, str]], dict[str, tuple[str, str]]]:
    """(queue row names, latest history row names) per uuid."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT uuid, user_name, group_name FROM importer_orders")
            queue = {uuid: (user, group) for uuid, user, group in cur.fetchall()}
            cur.execute(
                "SELECT DISTINCT ON (uuid) uuid, user_name, group_name FROM imports"
                " ORDER BY uuid, id DESC"
            )
            latest = {uuid: (user, group) for uuid, user, group in cur.fetchall()}
            return queue, latest
    finally:
        conn.close()


def test_fair_claim_revision_adopts_owners_and_keeps_them_current(database_url: str) -> None:
    create_upstream(database_url, with_description=True, stamped=True, orders=20)
    engine = create_engine(sync_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            command.upgrade(alembic_config(conn), "d5a1c9e3f7b2")
            conn.commit()
    finally:
        engine.dispose()
    queue_before = _queue(database_url)

    assert migrate(database_url, channel=DEFAULT_CHANNEL) == ("d5a1c9e3f7b2", head_revision())

    queue, latest = _owners(database_url)
    assert queue == latest and len(queue) == 20
    assert _queue(database_url) == queue_before
    # Writers that know nothing of the copies: new orders as OMERO.biomero writes them, and
    # a stage row for an existing order.
    conn = psycopg2.connect(database_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for uuid, user in (("new-order", "alice"), ("other-order", "carol")):
                cur.execute(
                    "INSERT INTO imports (group_name, user_name, destination_id,"
                    " destination_type, stage, uuid, files)"
                    " VALUES ('Lab-1', %s, '1', 'Dataset', 'Import Pending', %s, '[]')",
                    (user, uuid),
                )
            existing = sorted(queue)[0]
            cur.execute(
                "INSERT INTO imports (group_name, user_name, destination_id, destination_type,"
                " stage, uuid, files) VALUES ('Lab-2', 'bob', '1', 'Dataset',"
                " 'Import Failed', %s, '[]')",
                (existing,),
            )
    finally:
        conn.close()
    queue, latest = _owners(database_url)
    assert queue == latest
    assert queue["new-order"] == ("alice", "Lab-1")
    assert queue["other-order"] == ("carol", "Lab-1")
    assert queue[existing] == ("bob", "Lab-2")


def test_waits_revision_queues_one_notification_per_outcome(database_url: str) -> None:
    """f4a7c2e9b1d3: old outcomes are not notified; every new outcome is, once, by whatever
    writer ends the order; leaving the running stages clears progress, finishing clears the
    wait and retry state."""
    create_upstream(database_url, with_description=True, stamped=True, orders=20)
    engine = create_engine(sync_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            command.upgrade(alembic_config(conn), "e8b3f5a2c7d1")
            conn.commit()
    finally:
        engine.dispose()
    queue_before = _queue(database_url)

    assert migrate(database_url, channel=DEFAULT_CHANNEL) == ("e8b3f5a2c7d1", head_revision())

    assert _queue(database_url) == queue_before
    conn = psycopg2.connect(database_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM importer_outbox")
            assert cur.fetchone() == (0,)
            # a replica with a channel (since c6e8a0b2d4f3 an outcome that owes none is not
            # queued: see the test after this one)
            cur.execute(
                "INSERT INTO importer_notify_replicas (worker_id, channels)"
                " VALUES ('A', '{webhook}')"
            )

            def insert(stage: str) -> None:
                cur.execute(
                    "INSERT INTO imports (group_name, user_name, destination_id,"
                    " destination_type, stage, uuid, files)"
                    " VALUES ('Lab-1', 'alice', '1', 'Dataset', %s, 'n-1', '[]')",
                    (stage,),
                )

            insert("Import Pending")
            insert("Import Started")
            cur.execute(
                "UPDATE importer_orders SET progress = '{\"units_done\": 3}', progress_at = now(),"
                " retries = 2, waiting_since = now(), not_before = now() WHERE uuid = 'n-1'"
            )
            insert("Import Completed")
            cur.execute(
                "SELECT progress, retries, waiting_since, not_before, latest_id"
                " FROM importer_orders WHERE uuid = 'n-1'"
            )
            progress, retries, waiting_since, not_before, latest_id = cur.fetchone()
            assert (progress, retries, waiting_since, not_before) == (None, 0, None, None)
            # a duplicate submission of the finished order restores its stage: no new outcome
            insert("Import Pending")
            cur.execute("SELECT uuid, event_id, stage FROM importer_outbox")
            assert cur.fetchall() == [("n-1", latest_id, "Import Completed")]
            # the documented SQL retry, then a failure: a second outcome, a second row
            cur.execute("UPDATE imports SET stage = 'Import Pending' WHERE uuid = 'n-1'")
            insert("Import Started")
            insert("Import Failed")
            cur.execute("SELECT stage FROM importer_outbox WHERE uuid = 'n-1' ORDER BY id")
            assert cur.fetchall() == [("Import Completed",), ("Import Failed",)]
    finally:
        conn.close()


def test_an_outcome_that_owes_no_channel_queues_no_outbox_row(migrated_url: str) -> None:
    """c6e8a0b2d4f3. Before: with no channel configured (the default) every outcome inserted
    an outbox row that the owed-channels trigger then marked done: two writes per order for
    nothing. An outcome that owes a channel is queued with its delivery rows, as before."""
    conn = psycopg2.connect(migrated_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:

            def run(order: str, ending: str) -> None:
                for stage in ("Import Pending", "Import Started", ending):
                    cur.execute(
                        "INSERT INTO imports (group_name, user_name, destination_id,"
                        " destination_type, stage, uuid, files)"
                        " VALUES ('Lab', 'alice', '1', 'Dataset', %s, %s, '[]')",
                        (stage, order),
                    )

            run("quiet", "Import Completed")
            cur.execute("SELECT count(*) FROM importer_outbox")
            assert cur.fetchone() == (0,)
            cur.execute(
                "INSERT INTO importer_notify_replicas (worker_id, channels)"
                " VALUES ('A', '{webhook,email}')"
            )
            run("told", "Import Failed")
            cur.execute(
                "SELECT b.uuid, b.stage, b.done_at IS NULL, array_agg(d.channel ORDER BY 1)"
                " FROM importer_outbox b JOIN importer_outbox_delivery d ON d.outbox_id = b.id"
                " GROUP BY 1, 2, 3"
            )
            assert cur.fetchall() == [("told", "Import Failed", True, ["email", "webhook"])]
    finally:
        conn.close()


async def test_outcomes_owed_before_per_channel_delivery_owe_what_they_had_not_settled(
    database_url: str,
) -> None:
    """b3d5f7a9c1e4: an outbox row from f4a7c2e9b1d3 still undelivered gets delivery rows for
    the channels now recorded, minus those it already settled; one settled on every
    channel now recorded is done."""
    engine = create_engine(sync_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            command.upgrade(alembic_config(conn), "f4a7c2e9b1d3")
            conn.commit()
    finally:
        engine.dispose()
    conn = psycopg2.connect(database_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            for order in ("half", "all"):
                for stage in ("Import Pending", "Import Started", "Import Completed"):
                    cur.execute(
                        "INSERT INTO imports (group_name, user_name, destination_id,"
                        " destination_type, stage, uuid, files)"
                        " VALUES ('Lab', 'alice', '1', 'Dataset', %s, %s, '[]')",
                        (stage, order),
                    )
            cur.execute("UPDATE importer_outbox SET delivered = '{email}' WHERE uuid = 'half'")
            cur.execute(
                "UPDATE importer_outbox SET delivered = '{email,webhook:failed}' WHERE uuid = 'all'"
            )
    finally:
        conn.close()

    migrate(database_url, channel=DEFAULT_CHANNEL)
    store = PostgresStore(asyncpg_dsn(database_url), worker_id="A", pool_size=2)
    await store.open()
    try:
        await store.record_channels(["email", "webhook"], {})
        hooks = await store.claim_deliveries("webhook", 10, 60)
        mails = await store.claim_deliveries("email", 10, 60)
        stats = await store.notification_stats()
    finally:
        await store.close()
    assert [d.note.uuid for d in hooks] == ["half"] and mails == []
    assert stats is not None and stats[0] == 1  # 'all' is done


async def test_an_outcome_owes_what_the_replicas_last_had_even_with_none_running(
    migrated_url: str,
) -> None:
    """Replicas record their channels; an outcome written by SQL hours after every replica
    stopped still owes them (the hour counts back from the latest replica seen), and one
    that stopped long before the others no longer counts."""
    store = PostgresStore(asyncpg_dsn(migrated_url), worker_id="A", pool_size=2)
    await store.open()
    try:
        await store.record_channels(["email", "webhook"], {})
    finally:
        await store.close()
    conn = psycopg2.connect(migrated_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO importer_notify_replicas (worker_id, channels, seen_at)"
                " VALUES ('old', '{fax}', now() - interval '6 hours')"
            )
            cur.execute(
                "UPDATE importer_notify_replicas SET seen_at = now() - interval '3 hours'"
                " WHERE worker_id = 'A'"
            )
            for stage in ("Import Pending", "Import Started", "Import Failed"):
                cur.execute(
                    "INSERT INTO imports (group_name, user_name, destination_id,"
                    " destination_type, stage, uuid, files)"
                    " VALUES ('Lab', 'alice', '1', 'Dataset', %s, 'late', '[]')",
                    (stage,),
                )
            cur.execute(
                "SELECT d.channel FROM importer_outbox_delivery d"
                " JOIN importer_outbox b ON b.id = d.outbox_id WHERE b.uuid = 'late'"
                " ORDER BY 1"
            )
            assert cur.fetchall() == [("email",), ("webhook",)]
    finally:
        conn.close()


async def test_a_delivery_of_a_channel_no_replica_has_is_found_for_giving_up(
    migrated_url: str,
) -> None:
    a = PostgresStore(asyncpg_dsn(migrated_url), worker_id="A", pool_size=2)
    b = PostgresStore(asyncpg_dsn(migrated_url), worker_id="B", pool_size=2)
    await a.open()
    await b.open()
    try:
        await a.record_channels(["email", "webhook"], {})
        conn = psycopg2.connect(migrated_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                for stage in ("Import Pending", "Import Started", "Import Completed"):
                    cur.execute(
                        "INSERT INTO imports (group_name, user_name, destination_id,"
                        " destination_type, stage, uuid, files)"
                        " VALUES ('Lab', 'alice', '1', 'Dataset', %s, 'o', '[]')",
                        (stage,),
                    )
                await b.record_channels(["webhook"], {})
                assert await b.orphaned_deliveries(0, 10) == []  # A is alive
                cur.execute(
                    "UPDATE importer_notify_replicas SET seen_at = now() - interval '2 hours'"
                    " WHERE worker_id = 'A'"
                )
                cur.execute("UPDATE importer_outbox SET created_at = now() - interval '2 days'")
        finally:
            conn.close()
        assert await b.orphaned_deliveries(3 * 86400, 10) == []  # not old enough
        [orphan] = await b.orphaned_deliveries(86400, 10)
    finally:
        await a.close()
        await b.close()
    assert (orphan.channel, orphan.uuid, orphan.token) == ("email", "o", 0)


def _round_trip(url: str, revision: str, read: Callable[[str], T]) -> tuple[T, T]:
    """``read`` at ``revision`` and at head, after checking that downgrading from head to
    ``revision`` gives the first back exactly and upgrading again the second."""
    engine = create_engine(sync_url(url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            command.upgrade(alembic_config(conn), revision)
            conn.commit()
        before = read(url)
        migrate(url, channel=DEFAULT_CHANNEL)
        head = read(url)
        with engine.connect() as conn:
            command.downgrade(alembic_config(conn), revision)
            conn.commit()
        assert read(url) == before
        migrate(url, channel=DEFAULT_CHANNEL)
        assert read(url) == head
    finally:
        engine.dispose()
    return before, head


def _claim_functions(url: str) -> tuple[str, list[str] | None]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_get_functiondef('importer_claim'::regproc)")
            claim = cur.fetchone()[0]
            cur.execute("SELECT proconfig FROM pg_proc WHERE proname = 'importer_refresh_user'")
            refresh_config = cur.fetchone()[0]
    finally:
        conn.close()
    return claim, refresh_config


def test_the_claim_revisions_downgrade_to_the_claim_they_replaced(database_url: str) -> None:
    """e2c4a6b8d0f1 and f1b3d5e7a9c2 rebuild importer_claim from d8f0b2c4e6a5's text: their
    downgrades restore it exactly, and upgrading again gives head's functions back."""
    before, head = _round_trip(database_url, "d8f0b2c4e6a5", _claim_functions)
    assert "GROUPING SETS" in head[0]
    assert head[0].count("set_config('enable_sort'") == 4
    assert head[1] == ["enable_sort=off"]
    assert before[1] is None


def _functions(url: str) -> dict[str, tuple[str, str]]:
    """Each importer_* function: (its language, its definition)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT p.proname, l.lanname, pg_get_functiondef(p.oid) FROM pg_proc p"
                " JOIN pg_language l ON l.oid = p.prolang"
                " WHERE p.proname LIKE 'importer\\_%' AND p.prokind = 'f'"
            )
            return {name: (language, body) for name, language, body in cur.fetchall()}
    finally:
        conn.close()


def test_no_function_of_ours_is_planned_again_on_every_call(database_url: str) -> None:
    """Before PostgreSQL 18 an SQL-language function is planned afresh each time it is called
    from another statement; a plpgsql one keeps its plans for the session. The stage trigger
    called importer_owed_channels() at every ending: in the dispatch benchmark (5,000 orders,
    pg_stat_statements with track_planning) that was 2,934 plannings and 889 ms, about 0.15
    ms of PostgreSQL's 2.3 ms per order. Revision a3c5e7f9b1d4 makes both SQL functions
    plpgsql; its downgrade gives the SQL ones back as they were."""
    before, head = _round_trip(database_url, "f1b3d5e7a9c2", _functions)
    assert {name for name, (language, _) in before.items() if language == "sql"} == {
        "importer_channel",
        "importer_owed_channels",
    }
    assert {name for name, (language, _) in head.items() if language != "plpgsql"} == set()
    # none went away (later revisions add their own)
    assert before.keys() <= head.keys()


def _triggers(url: str) -> dict[str, str]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger"
                " WHERE tgrelid IN ('imports'::regclass, 'importer_orders'::regclass)"
                " AND NOT tgisinternal"
            )
            return dict(cur.fetchall())
    finally:
        conn.close()


def test_the_insert_trigger_becomes_a_statement_trigger_on_the_channel_it_had(
    database_url: str,
) -> None:
    """Revision c9e1f3a5b7d0 makes the history rows' trigger a statement trigger and keeps the
    channel a deployment pointed it at; its downgrade gives the row trigger back."""
    engine = create_engine(sync_url(database_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            command.upgrade(alembic_config(conn), "b5d7f9a1c3e6")
            conn.execute(text("DROP TRIGGER importer_track_insert ON imports"))
            conn.execute(
                text(
                    "CREATE TRIGGER importer_track_insert AFTER INSERT ON imports FOR EACH ROW"
                    " EXECUTE FUNCTION importer_track_order('site_orders')"
                )
            )
            conn.commit()
        before = _triggers(database_url)
        with engine.connect() as conn:
            command.upgrade(alembic_config(conn), "c9e1f3a5b7d0")
            conn.commit()
            assert conn.execute(text("SELECT importer_channel()")).scalar() == "site_orders"
        after = _triggers(database_url)
        assert after["importer_track_insert"] == (
            "CREATE TRIGGER importer_track_insert AFTER INSERT ON public.imports"
            " REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT"
            " EXECUTE FUNCTION importer_track_inserts('site_orders')"
        )
        stays = "WHEN ((NOT ((old.worker_id)::text IS DISTINCT FROM (new.worker_id)::text)))"
        assert stays in after["importer_order_owner_moved"]
        with engine.connect() as conn:
            command.downgrade(alembic_config(conn), "b5d7f9a1c3e6")
            conn.commit()
        assert _triggers(database_url) == before
    finally:
        engine.dispose()


def _ending(url: str) -> tuple[str, str]:
    """importer_finish's definition (its settings included) and the stage trigger's."""
    return _functions(url)["importer_finish"][1], _triggers(url)["importer_order_stage_changed"]


def test_the_ending_that_does_the_stage_work_downgrades_to_the_one_it_replaced(
    database_url: str,
) -> None:
    """d0f2b4c6e8a1 builds its downgrade's ending from b8d0f2a4c6e8's own text: the
    downgrade restores that ending, its settings and the trigger exactly."""
    before, head = _round_trip(database_url, "b8d0f2a4c6e8", _ending)
    assert "importer_owed_channels()" not in before[0]
    assert "importer_owed_channels()" in head[0]
    assert "SET \"biomero_importer.finishing\" TO 'on'" in head[0]
    assert "biomero_importer.finishing" not in before[1]
    assert "biomero_importer.finishing" in head[1]
