"""Integrity of stored bytes and duplicate SOP instances (issue 21, items 8 and 9).

- instance.sha256: the SHA-256 of each received file as written at ingest (NULL for instances
  received before this revision: their integrity is unknown and they are accepted as they are);
- instance.replaced_at: when a later copy with different content replaced the stored one;
- outboxitem.sha256: the SHA-256 of each output file as written, checked before it is sent;
- duplicateevent: every copy of a known SOP Instance UID that was not a plain resend of the same
  bytes (different content, or another study or series), with what the node did about it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the columns (NULL for existing rows) and the duplicate event table."""
    with op.batch_alter_table("instance") as batch:
        batch.add_column(sa.Column("sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("replaced_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("outboxitem") as batch:
        batch.add_column(sa.Column("sha256", sa.String(length=64), nullable=True))
    op.create_table(
        "duplicateevent",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("study_uid", sa.String(length=64), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("received_study_uid", sa.String(length=64), nullable=False),
        sa.Column("received_series_uid", sa.String(length=64), nullable=False),
        sa.Column("calling_aet", sa.String(length=16), nullable=False),
        sa.Column("content_differs", sa.Boolean(), nullable=False),
        sa.Column("conflict", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("byte_size", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_duplicateevent_received_at"), "duplicateevent", ["received_at"], unique=False)
    op.create_index(
        op.f("ix_duplicateevent_sop_instance_uid"), "duplicateevent", ["sop_instance_uid"], unique=False
    )
    op.create_index(op.f("ix_duplicateevent_study_uid"), "duplicateevent", ["study_uid"], unique=False)


def downgrade() -> None:
    """Drop the table and the columns."""
    op.drop_index(op.f("ix_duplicateevent_study_uid"), table_name="duplicateevent")
    op.drop_index(op.f("ix_duplicateevent_sop_instance_uid"), table_name="duplicateevent")
    op.drop_index(op.f("ix_duplicateevent_received_at"), table_name="duplicateevent")
    op.drop_table("duplicateevent")
    with op.batch_alter_table("outboxitem") as batch:
        batch.drop_column("sha256")
    with op.batch_alter_table("instance") as batch:
        batch.drop_column("replaced_at")
        batch.drop_column("sha256")
