"""A claim moves its user's head once per pick, not once per order it takes.

Revision ID: d1f3a5c7e9b2
Revises: c9e1f3a5b7d0
Create Date: 2026-12-03

When a pick of ``importer_claim`` took a run of one user's orders, the ready trigger
(``importer_order_ready``) ran for each of them and called ``importer_refresh_user``, which
locked the user's row each time: only the call for the head did anything (it found the next
ready order after the whole run), the others returned. In a drain of 6,000 orders that was
6,000 trigger calls and as many locks of the same row. Now the claim marks its own update
(a transaction-local setting the trigger's WHEN reads) and moves the head itself, once, from
the head it read under the user's lock. Every other change of an order's readiness goes
through the trigger as before. The SQL is the previous revision's with these changes.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "d1f3a5c7e9b2"
down_revision: str | None = "c9e1f3a5b7d0"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPDATE = """\
        -- ids are drawn first, so importer_track_order finds them already applied. Each row
"""
UPDATE_NOW = """\
        -- ids are drawn first, so importer_track_inserts finds them already applied. Each row
"""
CLAIMED = """\
        WITH claimed AS (
            UPDATE importer_orders o
"""
CLAIMED_NOW = """\
        -- the ready trigger leaves this update to the head move below
        PERFORM set_config('biomero_importer.claiming', 'on', true);
        WITH claimed AS (
            UPDATE importer_orders o
"""
TAKEN = """\
        FROM claimed c;
"""
TAKEN_NOW = """\
        FROM claimed c;
        PERFORM set_config('biomero_importer.claiming', 'off', true);
        -- the run began at the head read under the user's lock: the head moves past it once
        PERFORM importer_refresh_user(chosen, h_at, h_seq, NULL, NULL, NULL);
"""


def _ready(row: str) -> str:
    return (
        f"({row}.stage = 'Import Pending' AND {row}.worker_id IS NULL"
        f" AND NOT {row}.cancel_requested AND NOT {row}.waiting)"
    )


_MOVES_A_HEAD = (
    f"({_ready('OLD')} IS DISTINCT FROM {_ready('NEW')}"
    " OR OLD.user_name IS DISTINCT FROM NEW.user_name"
    f" OR ({_ready('NEW')} AND (OLD.group_name, OLD.queued_at, OLD.queue_seq)"
    " IS DISTINCT FROM (NEW.group_name, NEW.queued_at, NEW.queue_seq)))"
)
READY_TRIGGER = (
    "CREATE TRIGGER importer_order_ready_update AFTER UPDATE ON importer_orders FOR EACH ROW"
    f" WHEN ({_MOVES_A_HEAD}"
    " AND current_setting('biomero_importer.claiming', true) IS DISTINCT FROM 'on')"
    " EXECUTE FUNCTION importer_order_ready()"
)
PREVIOUS_READY_TRIGGER = (
    "CREATE TRIGGER importer_order_ready_update AFTER UPDATE ON importer_orders FOR EACH ROW"
    f" WHEN {_MOVES_A_HEAD} EXECUTE FUNCTION importer_order_ready()"
)


def _previous_claim() -> str:
    """b5d7f9a1c3e6's importer_claim, from its module as alembic loaded it for this run."""
    script = op.get_context().script
    found = None if script is None else script.get_revision("b5d7f9a1c3e6")
    if found is None:
        raise RuntimeError("revision b5d7f9a1c3e6 is not in this migration run's scripts")
    claim: str = found.module._claim()
    return claim


def _claim() -> str:
    claim = _previous_claim()
    for old, new in ((UPDATE, UPDATE_NOW), (CLAIMED, CLAIMED_NOW), (TAKEN, TAKEN_NOW)):
        if claim.count(old) != 1:
            raise RuntimeError(f"importer_claim: {old.strip()[:60]!r} is not where expected")
        claim = claim.replace(old, new)
    return claim


def upgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS importer_order_ready_update ON importer_orders")
    op.execute(READY_TRIGGER)
    op.execute(_claim())


def downgrade() -> None:
    op.execute(_previous_claim())
    op.execute("DROP TRIGGER IF EXISTS importer_order_ready_update ON importer_orders")
    op.execute(PREVIOUS_READY_TRIGGER)
