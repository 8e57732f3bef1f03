"""Shared bytes on object storage (issue 15 part 3): which received instances are in the store.

- instance.uploaded_at: when the instance's file was put to storage.object_store (NULL: not yet,
  or no object store). With an object store a series is routed only once every instance of it
  is uploaded, so any node can fetch its files.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the upload column (NULL for existing rows)."""
    with op.batch_alter_table("instance") as batch:
        batch.add_column(sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drop the upload column."""
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("uploaded_at")
