"""Radiologist feedback per finding (issue 18): the feedback table.

One row per verdict (agree, disagree with the correct label, unsure) of one user on one finding of a
finished job, with what the model said (version, threshold in force, score, decision). No foreign key
to the job: feedback outlives the study's pruning. Re-marking supersedes the user's previous row
(superseded_at); a partial unique index keeps one current row per job, finding and user.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_CURRENT = sa.text("superseded_at IS NULL")


def upgrade() -> None:
    """Create the feedback table and its indexes."""
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("positive", sa.Boolean(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("correct_label", sa.String(length=64), nullable=True),
        sa.Column("comment", sa.String(length=2000), nullable=False),
        sa.Column("user_name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("superseded_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_feedback_job_id"), "feedback", ["job_id"], unique=False)
    op.create_index(op.f("ix_feedback_study_uid"), "feedback", ["study_uid"], unique=False)
    op.create_index(op.f("ix_feedback_model_id"), "feedback", ["model_id"], unique=False)
    op.create_index(op.f("ix_feedback_created_at"), "feedback", ["created_at"], unique=False)
    op.create_index(
        "uq_feedback_current",
        "feedback",
        ["job_id", "label", "user_name"],
        unique=True,
        sqlite_where=_CURRENT,
        postgresql_where=_CURRENT,
    )


def downgrade() -> None:
    """Drop the feedback table."""
    op.drop_index("uq_feedback_current", table_name="feedback")
    op.drop_index(op.f("ix_feedback_created_at"), table_name="feedback")
    op.drop_index(op.f("ix_feedback_model_id"), table_name="feedback")
    op.drop_index(op.f("ix_feedback_study_uid"), table_name="feedback")
    op.drop_index(op.f("ix_feedback_job_id"), table_name="feedback")
    op.drop_table("feedback")
