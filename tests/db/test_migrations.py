"""Every database state we can meet upgrades to head without losing a row."""

from __future__ import annotations

import subprocess
import sys

import psycopg2
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from biomero_importer.db.migrate import (
    VERSION_TABLE,
    head_revision,
    include_name,
    include_object,
    is_at_head,
    migrate,
)
from biomero_importer.db.models import Base
from biomero_importer.db.sql import DEFAULT_CHANNEL
from biomero_importer.db.urls import sync_url

from .upstream import columns, create_upstream, dump


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
    ("with_description", "stamped"),
    [(False, False), (True, False), (True, True)],
    ids=["tables-without-description", "tables-without-version-table", "stamped-78d3d6d84aec"],
)
def test_upstream_database_is_adopted_with_every_row(
    database_url: str, with_description: bool, stamped: bool
) -> None:
    create_upstream(database_url, with_description=with_description, stamped=stamped)
    imports_before = dump(database_url, "imports")
    pre_before = dump(database_url, "imports_preprocessing")
    neighbours_before = dump(database_url, "biomero_job_view")

    migrate(database_url, channel=DEFAULT_CHANNEL)

    imports_after = dump(database_url, "imports")
    if not with_description:
        # the new column sits at the end and is NULL for history rows
        assert all(row[-1] is None for row in imports_after)
        imports_after = [row[:-1] for row in imports_after]
    assert imports_after == imports_before
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
