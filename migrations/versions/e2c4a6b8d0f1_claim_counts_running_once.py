"""The claim counts the running orders per user and per group in one scan of the queue.

Revision ID: e2c4a6b8d0f1
Revises: d8f0b2c4e6a5
Create Date: 2026-12-02

Every call of ``importer_claim`` counts the running orders twice, per user and per group, each
a scan of ``importer_orders``: about a third of a millisecond each in the dispatch benchmark
(pg_stat_statements), where the planner, from a young table's statistics, read the whole
queue each time. One scan with two grouping sets gives both counts. The function is
d8f0b2c4e6a5's with only that statement changed, derived from its frozen text so the two
cannot drift; the downgrade restores that text.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "e2c4a6b8d0f1"
down_revision: str | None = "d8f0b2c4e6a5"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TWO_SCANS = """
    SELECT COALESCE(array_agg(r.user_name), '{}'), COALESCE(array_agg(r.n), '{}')
    INTO run_users, run_counts
    FROM (SELECT o.user_name, count(*)::integer AS n FROM importer_orders o
          WHERE o.worker_id IS NOT NULL GROUP BY o.user_name) r;
    SELECT COALESCE(array_agg(r.group_name), '{}'), COALESCE(array_agg(r.n), '{}')
    INTO run_groups, group_counts
    FROM (SELECT o.group_name, count(*)::integer AS n FROM importer_orders o
          WHERE o.worker_id IS NOT NULL GROUP BY o.group_name) r;
"""

# GROUPING(user_name, group_name) is 1 for a row of the per-user set, 2 for the per-group set;
# the user and group arrays are each built from their own rows in one pass, so a name and its
# count keep the same position.
ONE_SCAN = """
    SELECT COALESCE(array_agg(r.user_name) FILTER (WHERE r.grouped = 1), '{}'),
           COALESCE(array_agg(r.n) FILTER (WHERE r.grouped = 1), '{}'),
           COALESCE(array_agg(r.group_name) FILTER (WHERE r.grouped = 2), '{}'),
           COALESCE(array_agg(r.n) FILTER (WHERE r.grouped = 2), '{}')
    INTO run_users, run_counts, run_groups, group_counts
    FROM (SELECT o.user_name, o.group_name, count(*)::integer AS n,
                 GROUPING(o.user_name, o.group_name) AS grouped
          FROM importer_orders o WHERE o.worker_id IS NOT NULL
          GROUP BY GROUPING SETS ((o.user_name), (o.group_name))) r;
"""


def _previous_claim() -> str:
    """d8f0b2c4e6a5's importer_claim, from its module as alembic loaded it for this run."""
    script = op.get_context().script
    found = None if script is None else script.get_revision("d8f0b2c4e6a5")
    if found is None:
        raise RuntimeError("revision d8f0b2c4e6a5 is not in this migration run's scripts")
    claim: str = found.module.CLAIM
    if claim.count(TWO_SCANS) != 1:
        raise RuntimeError("d8f0b2c4e6a5: the running-order counts are not where expected")
    return claim


def claim() -> str:
    """importer_claim as this revision defines it (f1b3d5e7a9c2 builds on it)."""
    return _previous_claim().replace(TWO_SCANS, ONE_SCAN)


def upgrade() -> None:
    op.execute(claim())


def downgrade() -> None:
    op.execute(_previous_claim())
