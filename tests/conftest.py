"""Fixtures: an in-process node on loopback with a free port, stopped after the test."""

from __future__ import annotations

import functools
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


#: Folders (and files) whose tests open no database: converters, models, decoding and
#: preprocessing, output building, phantoms, evaluation, the viewer adapters. Their results cannot
#: depend on which database the suite runs against, so the PostgreSQL pass leaves them out. The
#: SQLite pass holds them to it: there a node or engine made by one of them fails the test.
DATABASE_FREE = (
    "tests/byom/",
    "tests/inference/",
    "tests/models/",
    "tests/synth/",
    "tests/viewer/",
    "tests/evaluate/",
    "tests/outputs/",
)
#: ... except these files, which do open one.
NOT_DATABASE_FREE = ("tests/evaluate/test_feedback_labels.py", "tests/outputs/test_kos.py")
#: Fixtures with which a test chooses its database itself (PostgreSQL, or each kind in turn): it
#: runs the same in both passes, so only the SQLite pass runs it.
PINNED_DATABASE = {"postgres", "database_url"}


def _relative(item: pytest.Item) -> str:
    return Path(str(item.path)).resolve().relative_to(Path(__file__).resolve().parent.parent).as_posix()


def database_free(item: pytest.Item) -> bool:
    """True for a test of a folder that opens no database (:data:`DATABASE_FREE`)."""
    path = _relative(item)
    return path.startswith(DATABASE_FREE) and not path.startswith(NOT_DATABASE_FREE)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The PostgreSQL pass runs only the tests whose outcome can depend on the database: those
    that open the suite's database (SQLite in the first pass, PostgreSQL here). Tests that open
    none, or choose theirs (and so ran against PostgreSQL in the first pass), are deselected."""
    if os.environ.get("PACS_NODE_TEST_DATABASE", "sqlite") != "postgresql":
        return
    keep, drop = [], []
    for item in items:
        pinned = PINNED_DATABASE.intersection(getattr(item, "fixturenames", ()))
        (drop if pinned or database_free(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _no_database_in_database_free_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the folders of :data:`DATABASE_FREE`, making a node's configuration or a database
    engine fails the test, so that the PostgreSQL pass may leave those folders out."""
    if not database_free(request.node):
        return

    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError(
            f"{_relative(request.node)} opens a database: remove it from DATABASE_FREE in tests/conftest.py"
        )

    import node.store.db

    monkeypatch.setattr(node.store.db, "create_engine", refuse)
    monkeypatch.setattr(helpers, "DATABASE_FACTORY", refuse)


@functools.cache
def _no_cuda_device() -> str | None:
    """Why no CUDA device is usable here (None when one is): CuPy sees a device, or the CUDA
    libraries load and onnxruntime offers its CUDA provider."""
    try:
        import cupy  # type: ignore[import-not-found]

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
        why = "cupy sees no CUDA device"
    except Exception as exc:  # not installed, or no driver / device
        why = f"cupy: {type(exc).__name__}"
    import onnxruntime as ort

    from node.inference.runtime import missing_cuda_library

    missing = missing_cuda_library()
    if missing is None and "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return f"{why}; onnxruntime: " + (f"{missing} cannot be loaded" if missing else "no CUDA provider")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``gpu`` run only where a CUDA device is usable (see _no_cuda_device)."""
    if item.get_closest_marker("gpu") is not None:
        why = _no_cuda_device()
        if why is not None:
            pytest.skip(f"needs a CUDA GPU ({why})")


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
