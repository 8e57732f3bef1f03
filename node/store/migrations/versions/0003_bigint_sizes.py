"""Byte sizes as 64-bit integers: a study over 2 GiB overflowed PostgreSQL's int4.

SQLite's INTEGER is already 64-bit, so nothing changes there.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("study", "series", "instance")


def upgrade() -> None:
    """Widen byte_size."""
    if op.get_bind().dialect.name == "sqlite":
        return
    for table in TABLES:
        op.alter_column(table, "byte_size", type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    """Narrow byte_size back (fails if a value no longer fits)."""
    if op.get_bind().dialect.name == "sqlite":
        return
    for table in TABLES:
        op.alter_column(table, "byte_size", type_=sa.Integer(), existing_nullable=False)
