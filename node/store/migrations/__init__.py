"""Alembic migrations of the node's database (see node.store.db for how they are applied)."""
