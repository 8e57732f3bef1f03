"""Several nodes on one database (issue 15): job leases and the nodes' registry.

- job.owner: the node id running the job ('' for jobs from before this revision, and queued ones);
- job.lease_until: until when the owner's claim holds; its heartbeat renews it, and a running job
  whose lease has expired is requeued by any node (its attempts count, as a restart's do);
- clusternode: one row per node process (role, data folder identity, heartbeat), so that a node
  whose data folder differs from the running nodes' is refused at start.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the lease columns (empty for existing rows) and the node table."""
    with op.batch_alter_table("job") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=64), nullable=False, server_default=""))
        batch.add_column(sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "clusternode",
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("storage_id", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("node_id"),
    )


def downgrade() -> None:
    """Drop the node table and the lease columns."""
    op.drop_table("clusternode")
    with op.batch_alter_table("job") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("owner")
