"""The two SQL-language helpers become plpgsql, so their plans are kept for the session.

Revision ID: a3c5e7f9b1d4
Revises: f1b3d5e7a9c2
Create Date: 2026-12-02

Before PostgreSQL 18, an SQL-language function called from another statement is planned
afresh on every call. The stage trigger calls ``importer_owed_channels()`` at every ending:
in the dispatch benchmark (5,000 orders, pg_stat_statements with ``track_planning``) that was
2,934 plannings taking 889 ms, against 235 ms of execution, about 0.15 ms of PostgreSQL's
2.3 ms per order. ``importer_channel()`` (called when due waits are promoted and when
claimers are woken) had the same shape. As plpgsql functions both return the same query's
result and keep its plan per connection. The downgrade restores the SQL versions from the
revisions that wrote them.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "a3c5e7f9b1d4"
down_revision: str | None = "f1b3d5e7a9c2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWED_CHANNELS = """
CREATE OR REPLACE FUNCTION importer_owed_channels() RETURNS varchar[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT COALESCE(array_agg(DISTINCT c ORDER BY c), '{}')
        FROM importer_notify_replicas r, unnest(r.channels) c
        WHERE r.seen_at > (SELECT max(seen_at) FROM importer_notify_replicas)
                          - interval '1 hour'
    );
END;
$$;
"""

CHANNEL = """
CREATE OR REPLACE FUNCTION importer_channel() RETURNS text
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
        SELECT convert_from(substring(t.tgargs FROM 1 FOR position('\\x00'::bytea IN t.tgargs)
                                      - 1), 'UTF8')
        FROM pg_trigger t
        WHERE t.tgname = 'importer_track_insert' AND t.tgrelid = 'imports'::regclass
    );
END;
$$;
"""


def _frozen(revision_id: str, name: str) -> str:
    """SQL an earlier revision froze, from its module as alembic loaded it for this run (a
    revision imports no application code, so each keeps this look-up itself)."""
    script = op.get_context().script
    found = None if script is None else script.get_revision(revision_id)
    if found is None:
        raise RuntimeError(f"revision {revision_id} is not in this migration run's scripts")
    sql: str = getattr(found.module, name)
    return sql


def upgrade() -> None:
    op.execute(OWED_CHANNELS)
    op.execute(CHANNEL)


def downgrade() -> None:
    op.execute(_frozen("c6e8a0b2d4f3", "OWED_CHANNELS"))
    op.execute(_frozen("a9c1e3d5f7b2", "CHANNEL"))
