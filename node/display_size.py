"""The size at which the node draws a display image (the heatmap SCs, the web Analyse page), and
the reduction of a display to it where it is made.

A display is the source frame windowed to uint8 (:func:`node.inference.prepared.display_image`).
Every picture drawn from it has a long side between :data:`MIN_SIDE` and :data:`MAX_SIDE`
(:func:`drawn_size`); a display over :data:`MAX_SIDE` is therefore reduced where it is prepared
(:func:`reduce_display`, exactly the resize the renderer made before: OpenCV's area average of
the uint8 image) and travels at that size with its full size beside it. Kept apart from
``node.outputs`` (highdicom) and ``node.inference`` so that both, and the small preparation
children, import it without the other.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Long side of the drawn image (before the legend and text band are added).
MIN_SIDE = 512
MAX_SIDE = 1024


def drawn_size(rows: int, cols: int) -> tuple[float, int, int]:
    """``(scale, height, width)`` of the picture drawn from a ``rows`` x ``cols`` display: reduced
    to a long side of :data:`MAX_SIDE`, enlarged to :data:`MIN_SIDE`, else as it is (scale 1)."""
    long_side = max(rows, cols)
    scale = 1.0
    if long_side > MAX_SIDE:
        scale = MAX_SIDE / long_side
    elif long_side < MIN_SIDE:
        scale = MIN_SIDE / long_side
    return scale, max(round(rows * scale), 1), max(round(cols * scale), 1)


def reduce_display(display: np.ndarray) -> np.ndarray:
    """``display`` (uint8, (rows, cols) or (rows, cols, 3)) reduced to its drawn size with
    ``cv2.INTER_AREA`` when its long side is over :data:`MAX_SIDE`; otherwise ``display`` itself
    (a smaller one is enlarged only when drawn)."""
    scale, height, width = drawn_size(*display.shape[:2])
    if scale >= 1.0:
        return display
    return np.asarray(cv2.resize(display, (width, height), interpolation=cv2.INTER_AREA))
