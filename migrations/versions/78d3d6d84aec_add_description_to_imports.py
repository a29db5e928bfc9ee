"""Baseline: the original importer's tables, with ``imports.description``.

Revision ID: 78d3d6d84aec
Revises:
Create Date: 2025-01-01

The original importer created its tables with ``create_all`` and only later stamped this
revision, so a database can arrive here empty, with the tables but no version table, or
with the tables minus ``description``. This revision makes all three end in the same schema
without touching existing rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "78d3d6d84aec"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    tables = set(inspector.get_table_names())
    if "imports_preprocessing" not in tables:
        op.create_table(
            "imports_preprocessing",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("container", sa.String(), nullable=False),
            sa.Column("input_file", sa.String(), nullable=False),
            sa.Column("output_folder", sa.String(), nullable=False),
            sa.Column("alt_output_folder", sa.String(), nullable=True),
            sa.Column("extra_params", sa.JSON(), nullable=True),
        )
    if "imports" not in tables:
        op.create_table(
            "imports",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("group_name", sa.String(), nullable=False),
            sa.Column("user_name", sa.String(), nullable=False),
            sa.Column("destination_id", sa.String(), nullable=False),
            sa.Column("destination_type", sa.String(), nullable=False),
            sa.Column("stage", sa.String(), nullable=False),
            sa.Column("uuid", sa.String(length=36), nullable=False),
            sa.Column(
                "timestamp",
                sa.DateTime(timezone=True),
                server_default=sa.text("now()"),
                nullable=True,
            ),
            sa.Column("files", sa.Text(), nullable=False),
            sa.Column("file_names", sa.Text(), nullable=True),
            sa.Column("description", sa.Text(), nullable=True),
            sa.Column(
                "preprocessing_id",
                sa.Integer(),
                sa.ForeignKey("imports_preprocessing.id"),
                nullable=True,
            ),
        )
        op.create_index("ix_imports_user_name", "imports", ["user_name"])
        op.create_index("ix_imports_uuid", "imports", ["uuid"])
        op.create_index("imports_ix_uuid_timestamp", "imports", ["uuid", "timestamp"])
        return
    columns = {column["name"] for column in inspector.get_columns("imports")}
    if "description" not in columns:
        op.add_column("imports", sa.Column("description", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("imports", "description")
