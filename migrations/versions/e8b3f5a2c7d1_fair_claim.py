"""Fair claims: each queue row knows its order's user and group.

Revision ID: e8b3f5a2c7d1
Revises: d5a1c9e3f7b2
Create Date: 2026-11-30

The claim picks the oldest pending order of the user (then group) with the fewest orders
running instead of the oldest order overall, so one researcher's thousand orders no longer
hold everyone else back. To stay one indexed query it needs the user and group on the queue
row: ``importer_orders.user_name`` and ``group_name`` are copied from the order's latest
``imports`` row by a trigger of their own, on every write that moves ``latest_id``, so every
writer (OMERO.biomero, SQL clients, the service) keeps them current without knowing they
exist. Existing rows are adopted from their latest row. ``importer_orders_ix_pending_user`` walks the pending orders
user by user, oldest first.

The SQL is frozen here, as this revision first ran it: the application's ``db/sql.py`` may
change.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e8b3f5a2c7d1"
down_revision: str | None = "d5a1c9e3f7b2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORDER_OWNER = """
CREATE OR REPLACE FUNCTION importer_order_owner() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    latest record;
BEGIN
    SELECT i.user_name, i.group_name INTO latest FROM imports i WHERE i.id = NEW.latest_id;
    -- The trigger on imports always points latest_id at a history row; a queue row written
    -- by hand (tests, repairs) may not, and then keeps the names it was given.
    IF FOUND THEN
        NEW.user_name := latest.user_name;
        NEW.group_name := latest.group_name;
    END IF;
    RETURN NEW;
END;
$$;
"""

OWNER_TRIGGER = (
    "CREATE TRIGGER importer_order_owner BEFORE INSERT OR UPDATE OF latest_id"
    " ON importer_orders FOR EACH ROW EXECUTE FUNCTION importer_order_owner()"
)


def upgrade() -> None:
    # NOT NULL with a constant default: PostgreSQL adds it without rewriting the table; the
    # adoption below and the trigger then write the real names.
    for column in ("user_name", "group_name"):
        op.add_column(
            "importer_orders",
            sa.Column(column, sa.String(), nullable=False, server_default=sa.text("''")),
        )
    op.execute(
        """
        UPDATE importer_orders o
        SET user_name = i.user_name, group_name = i.group_name
        FROM imports i
        WHERE i.id = o.latest_id
        """
    )
    op.execute(ORDER_OWNER)
    op.execute("DROP TRIGGER IF EXISTS importer_order_owner ON importer_orders")
    op.execute(OWNER_TRIGGER)
    op.create_index(
        "importer_orders_ix_pending_user",
        "importer_orders",
        ["user_name", "queued_at"],
        postgresql_where=sa.text("stage = 'Import Pending' AND worker_id IS NULL"),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index("importer_orders_ix_pending_user", table_name="importer_orders", if_exists=True)
    op.execute("DROP TRIGGER IF EXISTS importer_order_owner ON importer_orders")
    op.execute("DROP FUNCTION IF EXISTS importer_order_owner()")
    op.drop_column("importer_orders", "group_name")
    op.drop_column("importer_orders", "user_name")
