"""``node.evaluate.run.overlay_png``: the example PNGs of the evaluation report keep the colours."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from node.evaluate.run import overlay_png


def _decode(png_base64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(png_base64))) as im:
        return np.asarray(im.convert("RGB"))


def test_rgb_display_keeps_red_red() -> None:
    display = np.zeros((32, 48, 3), np.uint8)
    display[..., 0] = 255  # pure red, RGB as display_image gives colour frames
    out = _decode(overlay_png(display, np.zeros((8, 12), np.float32)))
    assert out.shape == (32, 48, 3)
    r, g, b = (int(v) for v in out[16, 24])
    # 0.6 x the photograph + 0.4 x JET(0) (dark blue): red stays the dominant channel
    assert r > 140 and g < 10 and b < 70, (r, g, b)
    assert r > 2 * b


def test_greyscale_display_and_hot_heatmap() -> None:
    display = np.full((20, 20), 100, np.uint8)
    heat = np.ones((20, 20), np.float32)  # JET(255) is dark red
    r, g, b = (int(v) for v in _decode(overlay_png(display, heat))[10, 10])
    assert r > b + 40 and abs(r - 0.6 * 100 - 0.4 * 128) < 6, (r, g, b)


def test_large_display_is_scaled_down() -> None:
    display = np.zeros((600, 300, 3), np.uint8)
    out = _decode(overlay_png(display, np.zeros((600, 300), np.float32), max_side=256))
    assert max(out.shape[:2]) == 256
