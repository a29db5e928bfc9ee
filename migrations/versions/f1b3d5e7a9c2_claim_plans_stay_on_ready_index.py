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
sorts where one without exists, so the ordered index scan is the one chosen. In the claim
this holds for the pick and the promotion of due waits (which walked every pending order too)
alone: with the function-wide setting, the planner's penalty on the
sorts nothing can avoid (the choice among candidate users) turned the other statements'
plans pathological (17 s per claim in the benchmark). The claim is e2c4a6b8d0f1's with only
that change, derived from its text; the downgrade restores it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "f1b3d5e7a9c2"
down_revision: str | None = "e2c4a6b8d0f1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFRESH_USER = "importer_refresh_user(varchar, timestamptz, bigint, timestamptz, bigint, varchar)"

DECLARED = """
    started_id integer;
"""
DECLARED_NOW = """
    started_id integer;
    -- the session's setting, restored after the promotion and after each pick
    sort_setting text := current_setting('enable_sort');
    got boolean;
"""
PICK = """
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
"""
PICK_NOW = """
        LIMIT 1
        FOR UPDATE SKIP LOCKED;
        got := FOUND;
        PERFORM set_config('enable_sort', sort_setting, true);
        CONTINUE WHEN NOT got;
"""
PICK_START = """
        SELECT o.uuid, o.latest_id INTO picked, previous_id FROM importer_orders o
"""
# Set right before each of the two statements: they are planned (and planned again after an
# invalidation) only there. The due waits read importer_orders_ix_waiting in not_before order,
# not every pending order.
DUE = """
    WITH due AS (
"""
DUE_NOW = """
    PERFORM set_config('enable_sort', 'off', true);
    WITH due AS (
"""
PROMOTED = """
    GET DIAGNOSTICS promoted = ROW_COUNT;
"""
PROMOTED_NOW = """
    GET DIAGNOSTICS promoted = ROW_COUNT;
    PERFORM set_config('enable_sort', sort_setting, true);
"""
PICK_START_NOW = """
        PERFORM set_config('enable_sort', 'off', true);
        SELECT o.uuid, o.latest_id INTO picked, previous_id FROM importer_orders o
"""


def _previous_claim() -> str:
    """e2c4a6b8d0f1's importer_claim, from its module as alembic loaded it for this run."""
    script = op.get_context().script
    found = None if script is None else script.get_revision("e2c4a6b8d0f1")
    if found is None:
        raise RuntimeError("revision e2c4a6b8d0f1 is not in this migration run's scripts")
    claim: str = found.module.claim()
    return claim


def _claim() -> str:
    claim = _previous_claim()
    replacements = (
        (DECLARED, DECLARED_NOW),
        (DUE, DUE_NOW),
        (PROMOTED, PROMOTED_NOW),
        (PICK_START, PICK_START_NOW),
        (PICK, PICK_NOW),
    )
    for old, new in replacements:
        if claim.count(old) != 1:
            raise RuntimeError(f"importer_claim: {old.strip()!r} is not where expected")
        claim = claim.replace(old, new)
    return claim


def upgrade() -> None:
    op.execute(f"ALTER FUNCTION {REFRESH_USER} SET enable_sort = off")
    op.execute(_claim())


def downgrade() -> None:
    op.execute(f"ALTER FUNCTION {REFRESH_USER} RESET enable_sort")
    op.execute(_previous_claim())
