"""Upstream's ``imports.import_options``: an order's ImportOptions as JSON text (NULL for none).

Revision ID: 92e8f9e637a1
Revises: 78d3d6d84aec
Create Date: 2026-08-19

The original importer's newest revision, with its id, so a database it already upgraded is
found in this graph. Idempotent: a newer upstream writer's ``create_all`` may have created
``imports`` with the column before any revision ran.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "92e8f9e637a1"
down_revision: str | None = "78d3d6d84aec"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("ALTER TABLE imports ADD COLUMN IF NOT EXISTS import_options TEXT")


def downgrade() -> None:
    op.execute("ALTER TABLE imports DROP COLUMN IF EXISTS import_options")
