"""An outcome is queued in the outbox only when it owes a channel.

Revision ID: c6e8a0b2d4f3
Revises: b3d5f7a9c1e4
Create Date: 2026-12-02

Before, every outcome inserted an ``importer_outbox`` row, and with no channel configured (the
default) the owed-channels trigger then marked it done at once: two writes and their index
entries per order for nothing, later pruned. The stage trigger
(``importer_order_stage_changed``) now decides the owed channels itself
(``importer_owed_channels()``: every channel of the replicas seen within the hour before the
latest one was, as before) and inserts the outbox row and its delivery rows only when there
is one, so ``importer_outbox_owed`` and its trigger are gone. What an outcome owes is still
decided once, in the outcome's own transaction. The SQL is frozen here, as this revision
first ran it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "c6e8a0b2d4f3"
down_revision: str | None = "b3d5f7a9c1e4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWED_CHANNELS = """
CREATE OR REPLACE FUNCTION importer_owed_channels() RETURNS varchar[]
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(array_agg(DISTINCT c ORDER BY c), '{}')
    FROM importer_notify_replicas r, unnest(r.channels) c
    WHERE r.seen_at > (SELECT max(seen_at) FROM importer_notify_replicas) - interval '1 hour'
$$;
"""

STAGE_CHANGED = """
CREATE OR REPLACE FUNCTION importer_order_stage_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    owed varchar[];
    queued bigint;
BEGIN
    IF NEW.stage NOT IN ('Import Started', 'Import Preprocessing') THEN
        NEW.progress := NULL;
        NEW.progress_at := NULL;
    END IF;
    IF NEW.stage IN ('Import Completed', 'Import Failed')
       AND OLD.stage NOT IN ('Import Completed', 'Import Failed') THEN
        NEW.not_before := NULL;
        NEW.waiting_since := NULL;
        NEW.retries := 0;
        owed := importer_owed_channels();
        IF cardinality(owed) > 0 THEN
            INSERT INTO importer_outbox (uuid, event_id, stage)
            VALUES (NEW.uuid, NEW.latest_id, NEW.stage)
            ON CONFLICT (event_id) DO NOTHING
            RETURNING id INTO queued;
            IF queued IS NOT NULL THEN
                INSERT INTO importer_outbox_delivery (outbox_id, channel)
                SELECT queued, c FROM unnest(owed) c;
            END IF;
        END IF;
    END IF;
    RETURN NEW;
END;
$$;
"""

# As revision f4a7c2e9b1d3 and b3d5f7a9c1e4 left them.
PREVIOUS_STAGE_CHANGED = """
CREATE OR REPLACE FUNCTION importer_order_stage_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.stage NOT IN ('Import Started', 'Import Preprocessing') THEN
        NEW.progress := NULL;
        NEW.progress_at := NULL;
    END IF;
    IF NEW.stage IN ('Import Completed', 'Import Failed')
       AND OLD.stage NOT IN ('Import Completed', 'Import Failed') THEN
        NEW.not_before := NULL;
        NEW.waiting_since := NULL;
        NEW.retries := 0;
        INSERT INTO importer_outbox (uuid, event_id, stage)
        VALUES (NEW.uuid, NEW.latest_id, NEW.stage)
        ON CONFLICT (event_id) DO NOTHING;
    END IF;
    RETURN NEW;
END;
$$;
"""

PREVIOUS_OWED = """
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


def upgrade() -> None:
    op.execute(OWED_CHANNELS)
    op.execute(STAGE_CHANGED)
    op.execute("DROP TRIGGER IF EXISTS importer_outbox_owed ON importer_outbox")
    op.execute("DROP FUNCTION IF EXISTS importer_outbox_owed()")


def downgrade() -> None:
    op.execute(PREVIOUS_OWED)
    op.execute(
        "CREATE TRIGGER importer_outbox_owed AFTER INSERT ON importer_outbox"
        " FOR EACH ROW EXECUTE FUNCTION importer_outbox_owed()"
    )
    op.execute(PREVIOUS_STAGE_CHANGED)
    op.execute("DROP FUNCTION IF EXISTS importer_owed_channels()")
