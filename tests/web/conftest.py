"""The web tests' helpers: the tokens of the shared processed node (its fixture ``processed`` is
in tests/processed_node.py, registered for the whole suite) and the headless browser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.processed_node import ADMIN_TOKEN, READ_TOKEN, TOKENS, cxr_models

__all__ = ["ADMIN_TOKEN", "READ_TOKEN", "TOKENS", "chromium", "cxr_models"]


def chromium() -> str:
    """The headless browser, or skip."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.skip("chromium is not installed")
    return path
