"""Fixtures: an in-process node on loopback with a free port, stopped after the test."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.app import Node, build_node
from node.settings import load_settings
from tests import helpers
from tests.helpers import write_config
from tests.store.pgserver import PostgresServer, postgres_bindir

#: Fixture modules shared by tests in several folders: the processed node of the web and webhook
#: tests (tests/processed_node.py).
pytest_plugins = ["tests.processed_node"]

_PG: dict[str, PostgresServer] = {}


def _postgres() -> PostgresServer | None:
    """The session's PostgreSQL server, started on first use; None when PostgreSQL is not installed."""
    if "server" not in _PG:
        bindir = postgres_bindir()
        if bindir is None:
            return None
        _PG["server"] = PostgresServer(bindir)
    return _PG["server"]


def pytest_configure(config: pytest.Config) -> None:
    """PACS_NODE_TEST_DATABASE=postgresql: every node the tests configure gets a fresh database on a
    PostgreSQL server started on loopback for the session (default: SQLite in its data folder)."""
    wanted = os.environ.get("PACS_NODE_TEST_DATABASE", "sqlite")
    if wanted == "postgresql":
        server = _postgres()
        if server is None:
            raise pytest.UsageError("PACS_NODE_TEST_DATABASE=postgresql but PostgreSQL is not installed")
        helpers.DATABASE_FACTORY = server.new_database
    elif wanted != "sqlite":
        raise pytest.UsageError(f"PACS_NODE_TEST_DATABASE={wanted}: sqlite or postgresql")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Stop the PostgreSQL server if one was started."""
    server = _PG.pop("server", None)
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """The session's PostgreSQL server (started on demand); skipped where it is not installed,
    failed in CI, which installs it."""
    server = _postgres()
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; scripts/system-deps.sh installs it")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    return server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each kind (SQLite file; fresh database on the test PostgreSQL server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'node.db'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Build and start nodes (DICOM on a free loopback port); all are stopped at the end."""
    started: list[Node] = []

    def factory(folder: Path | None = None, **sections: dict) -> Node:
        config = write_config(folder or tmp_path, **sections)
        node = build_node(load_settings(config))
        node.start()
        started.append(node)
        return node

    yield factory
    for node in started:
        node.stop()
