"""Fixtures: an in-process node on loopback with a free port, stopped after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.app import Node, build_node
from node.settings import load_settings
from tests.helpers import write_config


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
