"""Database engine and sessions. SQLite in WAL mode by default; any SQLAlchemy URL otherwise."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine

from node.errors import StoreError
from node.store import tables  # noqa: F401  (registers the tables on SQLModel.metadata)

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_connection: object, connection_record: object) -> None:
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the C-STORE is answered, power loss included.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """Create the engine for ``url`` and the schema if it is missing; SQLite gets WAL and FULL sync."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    try:
        SQLModel.metadata.create_all(engine)
    except Exception as exc:  # any driver error: report it as ours, with the URL's scheme only
        raise StoreError(f"cannot open the database ({url.split(':', 1)[0]}): {exc}") from exc
    log.info("database ready (%s)", engine.dialect.name)
    return engine


def ping(engine: Engine) -> bool:
    """True when the database answers a trivial query."""
    try:
        with Session(engine) as session:
            session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        return True
    except Exception:  # readiness probe: any failure means "not ready"
        log.warning("database ping failed", exc_info=True)
        return False
