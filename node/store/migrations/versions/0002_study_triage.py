"""Study triage (priority, suspicion) and urgent-study webhook notification columns.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns; existing studies get no triage yet and no notification."""
    with op.batch_alter_table("study") as batch:
        batch.add_column(sa.Column("priority", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("suspicion", sa.Float(), nullable=True))
        batch.add_column(sa.Column("triaged_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("notify_state", sa.String(length=8), nullable=True))
        batch.add_column(sa.Column("notify_attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("notify_next_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("notify_error", sa.String(length=512), nullable=False, server_default=""))
    op.create_index(op.f("ix_study_notify_state"), "study", ["notify_state"], unique=False)


def downgrade() -> None:
    """Drop the columns."""
    op.drop_index(op.f("ix_study_notify_state"), table_name="study")
    with op.batch_alter_table("study") as batch:
        for name in (
            "notify_error",
            "notify_next_at",
            "notify_attempts",
            "notify_state",
            "triaged_at",
            "suspicion",
            "priority",
        ):
            batch.drop_column(name)
