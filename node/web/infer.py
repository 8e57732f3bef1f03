"""The inference API's HTTP side: the node analyses the upload (``Node.analyse_upload``, wired by
the app factory to the runner), this module keeps its heatmaps as PNGs for a short while in memory
and turns refusals into HTTP statuses: 400 not DICOM, 422 no pixel data / image that cannot be
analysed / no route, 413 over the resource budget (``limits``: pixels, frames, decoded or inflated
bytes), 415 unsupported transfer syntax, 504 over time.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pydicom

from node.errors import RefusalReason, UploadRefused
from node.types import AnalysisResult

if TYPE_CHECKING:
    from node.web.deps import WebNode


class InferRefused(Exception):
    """The upload cannot be analysed; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class PngStore:
    """PNG images by random id, forgotten after ``ttl_s`` (and beyond ``max_items``, oldest first)."""

    ttl_s: float
    max_items: int = 256
    _items: dict[str, tuple[float, bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, png: bytes) -> str:
        """Keep ``png``; return its id."""
        key = secrets.token_urlsafe(16)
        now = time.monotonic()
        with self._lock:
            for old in [k for k, (expires, _) in self._items.items() if expires < now]:
                del self._items[old]
            while len(self._items) >= self.max_items:
                del self._items[next(iter(self._items))]
            self._items[key] = (now + self.ttl_s, png)
        return key

    def get(self, key: str) -> bytes | None:
        """The PNG, or None when unknown or expired."""
        with self._lock:
            item = self._items.get(key)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an RGB (or grey) uint8 image as PNG."""
    image = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def dicom_to_png(path: Path) -> bytes:
    """The first frame of a DICOM image (e.g. the node's heatmap secondary capture) as PNG."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if ds.get("PhotometricInterpretation", "") == "RGB":
        return png_bytes(pixels.astype(np.uint8))
    lo, hi = float(pixels.min()), float(pixels.max())
    grey = ((pixels - lo) * (255.0 / (hi - lo or 1.0))).astype(np.uint8)
    return png_bytes(grey)


#: HTTP status for each reason an upload is refused.
_STATUS: dict[RefusalReason, int] = {
    RefusalReason.NOT_DICOM: 400,
    RefusalReason.NO_PIXELS: 422,
    RefusalReason.UNSUPPORTED_SYNTAX: 415,
    RefusalReason.UNSUPPORTED_PHOTOMETRIC: 415,
    RefusalReason.NO_RULES: 503,
    RefusalReason.NO_ROUTE: 422,
    RefusalReason.NOT_LOADED: 422,
    RefusalReason.UNDECODABLE: 422,
    RefusalReason.OVER_BUDGET: 413,
    RefusalReason.UNPROCESSABLE: 422,
    RefusalReason.TIMEOUT: 504,
    RefusalReason.FAILED: 500,
}


@dataclass(frozen=True)
class ModelOutcome:
    """One model's result for the upload, with the ids of its heatmap PNGs by label."""

    result: AnalysisResult
    heatmaps: list[tuple[str, str]]  # (label, png id)


def infer(
    node: WebNode,
    data: bytes,
    store: PngStore,
    deadline: float,
    progress: Callable[[str, str], None] | None = None,
) -> tuple[str, list[ModelOutcome]]:
    """Have the node analyse one uploaded file; keep its heatmaps as PNGs; map refusals to HTTP.
    ``progress`` is told each step as (stage, message) while it runs."""
    try:
        rule, outcomes = node.analyse_upload(data, deadline, progress)
    except UploadRefused as exc:
        raise InferRefused(_STATUS.get(exc.reason, 500), exc.message) from exc
    return rule, [
        ModelOutcome(result, [(label, store.put(png_bytes(rgb))) for label, rgb in overlays])
        for result, overlays in outcomes
    ]
