"""Readiness checks of the web side that the node's own ``ready()`` does not make."""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

#: how long the probe waits for a lock held by a writer before it calls the database not writable
WAIT_MS = 2000


def database_writable(engine: Engine) -> bool:
    """True when the database takes a write: one row of ``alembic_version`` rewritten with its own
    value inside a transaction that is rolled back (a read-only file, a read-only PostgreSQL
    standby or a lock held too long make it False)."""
    try:
        with engine.connect() as connection:
            sqlite = connection.dialect.name == "sqlite"
            before = None
            if sqlite:
                before = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
                connection.exec_driver_sql(f"PRAGMA busy_timeout={WAIT_MS}")
            elif connection.dialect.name == "postgresql":
                connection.execute(text(f"SET LOCAL lock_timeout = {WAIT_MS}"))
            try:
                connection.execute(text("UPDATE alembic_version SET version_num = version_num"))
            finally:
                connection.rollback()
                if sqlite:
                    connection.exec_driver_sql(f"PRAGMA busy_timeout={int(before or 0)}")
                    connection.rollback()
        return True
    except SQLAlchemyError as exc:  # readiness probe: any database error means "not writable"
        log.warning("the database is not writable: %s", type(exc).__name__)
        return False
