"""The claim and the head look-up keep to the ready index whatever the statistics say.

Revision ID: f1b3d5e7a9c2
Revises: e2c4a6b8d0f1
Create Date: 2026-12-02

``importer_claim`` picks a user's next order, and ``importer_refresh_user`` finds a user's
next head, with ``ORDER BY user_name, queued_at, queue_seq LIMIT 1`` over a range of
``importer_orders_ix_ready``, which yields that order without a sort and reads from the head
on. With statistics taken while nothing was pending (autovacuum analyzing a quiet facility's
table of finished orders), the planner expects one pending row and prefers to walk
``importer_orders_ix_pending`` and sort: under the burst that follows, every pick read every
pending order (15,009 index entries to claim one order of 5,000 in the test; the claim ten
times its usual cost in the dispatch benchmark). Both functions now plan without explicit
sorts where a plan without one exists, so the ordered index scan is the one chosen; a query
that can only be answered by sorting (the choice among a few candidate users) still sorts.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "f1b3d5e7a9c2"
down_revision: str | None = "e2c4a6b8d0f1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FUNCTIONS = (
    "importer_claim(integer, varchar, double precision, integer)",
    "importer_refresh_user(varchar, timestamptz, bigint, timestamptz, bigint, varchar)",
)


def upgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} SET enable_sort = off")


def downgrade() -> None:
    for function in FUNCTIONS:
        op.execute(f"ALTER FUNCTION {function} RESET enable_sort")
