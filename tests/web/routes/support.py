"""Helpers the route tests share."""

from __future__ import annotations

from fastapi.testclient import TestClient

from node.app import Node


def client_of(node: Node) -> TestClient:
    """A test client of the node's web application (no token: the node is open on loopback)."""
    return TestClient(node.web_app())
