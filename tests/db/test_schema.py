"""migrations/schema.sql is exactly what a fresh migrate produces (issue 20, item 8)."""

from __future__ import annotations

from .schema_dump import SCHEMA_FILE, dump_schema, normalise


def test_schema_file_matches_a_fresh_migrate(migrated_url: str) -> None:
    expected = normalise(SCHEMA_FILE.read_text())
    actual = dump_schema(migrated_url)
    assert actual == expected, (
        "migrations/schema.sql is out of date: regenerate it with"
        " .venv/bin/python -m tests.db.schema_dump"
    )
