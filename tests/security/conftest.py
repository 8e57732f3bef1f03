"""Fixtures for the security tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.certs import Certs, make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server and a client certificate, and an unrelated CA (made once per session)."""
    folder: Path = tmp_path_factory.mktemp("certs")
    return make_certs(folder)
