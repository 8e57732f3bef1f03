"""Live model monitoring and shadow models (issue 18): one modelrun row per analysed job.

- modelrun: model id and version, shadow or active, when, the score and positive flag per label
  (JSON), and statistics of the input (rows, columns, pixel spacing, stored-value percentiles
  p1/p50/p99, manufacturer and model name); ``subject`` (level and series UIDs) pairs a shadow
  model's run with the active model's on the same series.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the modelrun table."""
    op.create_table(
        "modelrun",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("shadow", sa.Boolean(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("scores", sa.String(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("columns", sa.Integer(), nullable=True),
        sa.Column("pixel_spacing_mm", sa.Float(), nullable=True),
        sa.Column("p1", sa.Float(), nullable=True),
        sa.Column("p50", sa.Float(), nullable=True),
        sa.Column("p99", sa.Float(), nullable=True),
        sa.Column("manufacturer", sa.String(length=64), nullable=False),
        sa.Column("manufacturer_model", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["job.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id"),
    )
    op.create_index("ix_modelrun_model_id", "modelrun", ["model_id"])
    op.create_index("ix_modelrun_recorded_at", "modelrun", ["recorded_at"])
    op.create_index("ix_modelrun_subject", "modelrun", ["subject"])


def downgrade() -> None:
    """Drop the modelrun table."""
    op.drop_index("ix_modelrun_subject", table_name="modelrun")
    op.drop_index("ix_modelrun_recorded_at", table_name="modelrun")
    op.drop_index("ix_modelrun_model_id", table_name="modelrun")
    op.drop_table("modelrun")
