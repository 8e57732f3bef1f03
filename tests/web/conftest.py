"""The web tests' helpers: the tokens of the shared processed node (its fixture ``processed`` is
in tests/processed_node.py, registered for the whole suite), the headless browser, and the
pictures and UID root of the photograph tests (test_photo.py, test_analyse.py)."""

from __future__ import annotations

import shutil
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.processed_node import ADMIN_TOKEN, READ_TOKEN, TOKENS, cxr_models

__all__ = ["ADMIN_TOKEN", "READ_TOKEN", "TOKENS", "UID_ROOT", "chromium", "cxr_models", "picture"]

UID_ROOT = "1.2.826.0.1.3680043.8.498.77."


def chromium() -> str:
    """The headless browser, or skip."""
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.skip("chromium is not installed")
    return path


def picture(
    colour: tuple[int, int, int] = (200, 40, 30),
    size: tuple[int, int] = (96, 64),
    fmt: str = "JPEG",
    exif_rotate: bool = False,
) -> bytes:
    """A JPEG/PNG picture: one colour with a brighter disc (the heatmap's target)."""
    w, h = size
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[:] = colour
    cv2.circle(rgb, (w // 3, h // 2), min(w, h) // 5, (255, 60, 40), -1)
    image = Image.fromarray(rgb)
    out = BytesIO()
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
        image.save(out, fmt, exif=exif)
    else:
        image.save(out, fmt)
    return out.getvalue()
