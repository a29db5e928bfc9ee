"""Per-channel delivery of outcome notifications, owed channels decided by the database.

Revision ID: b3d5f7a9c1e4
Revises: a9c1e3d5f7b2
Create Date: 2026-12-01

``importer_notify_replicas``: the notification channels (webhook, email) each replica has,
recorded by the replica when it starts and refreshed while it runs, with where each points
(scheme, host and port only: never a secret).

``importer_outbox_delivery``: one row per channel an outcome owes, with its own due time,
attempts, last error and result (delivered at, or given up at). ``generation`` is the fencing
token: every claim raises it, and a result is recorded only under the generation it was
claimed with, so a replica that comes back after its lease ran out changes nothing.

``importer_outbox_owed`` (AFTER INSERT on ``importer_outbox``) decides the channels an outcome
owes, once, in the outcome's own transaction: every channel of the replicas seen within the
hour before the latest one was (so an outcome written by SQL while every replica is stopped
still owes what the replicas last had). A replica configured with fewer channels therefore
cannot mark done a channel it lacks: it never claims it. An outcome owing nothing is done at once. The stage trigger
(``importer_order_stage_changed``) is untouched: it still only inserts the outbox row.

Outbox rows still undelivered at upgrade get their delivery rows when the first upgraded
replica records its channels (``db/sql.py`` RECORD_CHANNELS). The SQL is frozen here, as this
revision first ran it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b3d5f7a9c1e4"
down_revision: str | None = "a9c1e3d5f7b2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWED = """
CREATE OR REPLACE FUNCTION importer_outbox_owed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    owed varchar[];
BEGIN
    SELECT COALESCE(array_agg(DISTINCT c ORDER BY c), '{}') INTO owed
    FROM importer_notify_replicas r, unnest(r.channels) c
    WHERE r.seen_at > (SELECT max(seen_at) FROM importer_notify_replicas) - interval '1 hour';
    IF cardinality(owed) = 0 THEN
        UPDATE importer_outbox SET done_at = now() WHERE id = NEW.id;
    ELSE
        INSERT INTO importer_outbox_delivery (outbox_id, channel)
        SELECT NEW.id, c FROM unnest(owed) c;
    END IF;
    RETURN NULL;
END;
$$;
"""

OWED_TRIGGER = (
    "CREATE TRIGGER importer_outbox_owed AFTER INSERT ON importer_outbox"
    " FOR EACH ROW EXECUTE FUNCTION importer_outbox_owed()"
)


def upgrade() -> None:
    op.create_table(
        "importer_notify_replicas",
        sa.Column("worker_id", sa.String(), primary_key=True),
        sa.Column("channels", sa.ARRAY(sa.String()), nullable=False),
        sa.Column("endpoints", sa.JSON(), nullable=False, server_default=sa.text("'{}'::json")),
        sa.Column(
            "seen_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
        if_not_exists=True,
    )
    op.create_table(
        "importer_outbox_delivery",
        sa.Column(
            "outbox_id",
            sa.BigInteger(),
            sa.ForeignKey("importer_outbox.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("channel", sa.String(), primary_key=True),
        sa.Column(
            "due_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")
        ),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("generation", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        sa.Column("claimed_by", sa.String(), nullable=True),
        sa.Column("last_error", sa.String(), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("given_up_at", sa.DateTime(timezone=True), nullable=True),
        if_not_exists=True,
    )
    op.create_index(
        "importer_outbox_delivery_ix_due",
        "importer_outbox_delivery",
        ["channel", "due_at"],
        postgresql_where=sa.text("delivered_at IS NULL AND given_up_at IS NULL"),
        if_not_exists=True,
    )
    op.execute(OWED)
    op.execute("DROP TRIGGER IF EXISTS importer_outbox_owed ON importer_outbox")
    op.execute(OWED_TRIGGER)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS importer_outbox_owed ON importer_outbox")
    op.execute("DROP FUNCTION IF EXISTS importer_outbox_owed()")
    op.drop_index(
        "importer_outbox_delivery_ix_due", table_name="importer_outbox_delivery", if_exists=True
    )
    op.drop_table("importer_outbox_delivery", if_exists=True)
    op.drop_table("importer_notify_replicas", if_exists=True)
