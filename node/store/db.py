"""Database engine and sessions. SQLite in WAL mode by default; any SQLAlchemy URL otherwise."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, create_engine

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


MIGRATIONS = Path(__file__).with_name("migrations")
UPGRADE_HINT = "pacs-node db upgrade --config CONFIG"


class SchemaOutdated(StoreError):
    """The database was made by an older version of the node and needs ``pacs-node db upgrade``."""


def _alembic_config(connection: Connection | None = None):  # noqa: ANN202 - alembic's Config
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this version of the node needs."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def _known_revision(revision: str | None) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    if revision is None or revision.startswith("legacy:"):
        return True
    try:
        return ScriptDirectory.from_config(_alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def _current(connection: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _legacy_revision(connection: Connection) -> str | None:
    """For a database made before migrations existed (tables created directly): the revision its
    tables match; None for an empty database."""
    inspector = inspect(connection)
    names = set(inspector.get_table_names())
    if "alembic_version" in names or "study" not in names:
        return None
    columns = {c["name"] for c in inspector.get_columns("study")}
    return "0002" if "priority" in columns else "0001"


def _lock(connection: Connection) -> None:
    """Serialise concurrent migrators (two nodes starting on one fresh PostgreSQL database)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(7301)"))


def schema_status(engine: Engine) -> tuple[str | None, str]:
    """(the database's revision, the revision this version needs); the first is None when the
    database has no schema yet, "legacy:REV" for tables made before migrations existed."""
    with engine.connect() as connection:
        current = _current(connection)
        if current is None:
            legacy = _legacy_revision(connection)
            current = f"legacy:{legacy}" if legacy else None
    return current, head_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Apply the migrations up to ``revision``; returns (revision before, revision after). A database
    made before migrations existed is first stamped with the revision its tables match."""
    from alembic import command

    with engine.begin() as connection:
        _lock(connection)
        before = _current(connection)
        config = _alembic_config(connection)
        if before is None and (legacy := _legacy_revision(connection)):
            log.info("database made before migrations: stamping it at revision %s", legacy)
            command.stamp(config, legacy)
            before = legacy
        command.upgrade(config, revision)
        after = _current(connection)
    assert after is not None
    return before, after


def make_engine(url: str, *, check_schema: bool = True) -> Engine:
    """Create the engine for ``url``; SQLite gets WAL and FULL sync. An empty database gets the
    schema by running the migrations; one at an older revision is refused (SchemaOutdated) unless
    ``check_schema`` is False (``pacs-node db`` commands)."""
    scheme = url.split(":", 1)[0]
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    if not check_schema:
        return engine
    try:
        current, head = schema_status(engine)
        if current is None:
            log.info("empty database: creating the schema (migrations up to %s)", head)
            upgrade(engine)
            current = head
    except Exception as exc:  # any driver error: report it as ours, with the URL's scheme only
        engine.dispose()
        raise StoreError(f"cannot open the database ({scheme}): {exc}") from exc
    if current != head and not _known_revision(current):
        engine.dispose()
        raise StoreError(
            f"the database ({scheme}) is at schema revision {current}, which this version of the node "
            f"does not know (it needs {head}): it was upgraded by a newer version; run that version, "
            "or restore the backup taken before the upgrade"
        )
    if current != head:
        engine.dispose()
        raise SchemaOutdated(
            f"the database ({scheme}) is at schema revision {current}; this version of the node needs "
            f"{head}. Back it up, then run: {UPGRADE_HINT}"
        )
    log.info("database ready (%s, schema %s)", engine.dialect.name, head)
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
