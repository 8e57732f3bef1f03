"""The inference API's work: one uploaded DICOM file through the pipeline's own routing rules,
decoding, preprocessing and model (``node.runner.analyse``), and heatmap PNGs kept for a short
while in memory.

Every refusal is an :class:`InferRefused` with the HTTP status and a message that says which
check failed: 400 not DICOM, 422 no pixel data / image that cannot be analysed / no route,
415 unsupported transfer syntax, 504 over time.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.errors import DecodeError, NodeError, PreprocessError
from node.inference.decode import supported_transfer_syntaxes
from node.outputs.sc import heatmaps_to_show, render_overlay
from node.pipeline.route import route, route_header_from_dataset
from node.runner.analyse import JobTimeout, Stopwatch, analyse
from node.types import AnalysisResult

if TYPE_CHECKING:
    from node.app import Node

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


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


def parse_upload(data: bytes) -> Dataset:
    """The uploaded bytes as a DICOM data set with pixel data in a decodable transfer syntax."""
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except (InvalidDicomError, EOFError, ValueError, TypeError, KeyError, OSError) as exc:
        raise InferRefused(400, f"not a DICOM file (Part 10, with the DICM preamble): {exc}") from exc
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise InferRefused(422, "the DICOM file has no pixel data (not an image)")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        raise InferRefused(400, "the DICOM file has no Transfer Syntax UID in its file meta information")
    if ts not in supported_transfer_syntaxes():
        raise InferRefused(
            415, f"unsupported transfer syntax {ts} ({getattr(ts, 'name', ts)}): no decoder is installed"
        )
    return ds


@dataclass(frozen=True)
class ModelOutcome:
    """One model's result for the upload, with the ids of its heatmap PNGs by label."""

    result: AnalysisResult
    heatmaps: list[tuple[str, str]]  # (label, png id)


def infer(node: Node, data: bytes, store: PngStore, deadline: float) -> tuple[str, list[ModelOutcome]]:
    """Route, analyse and render heatmaps for one uploaded file; return the rule and outcomes."""
    ds = parse_upload(data)
    if node.rules is None:
        raise InferRefused(503, "the node has no routing rules loaded")
    decision = route(node.rules, route_header_from_dataset(ds))
    if not decision.routed:
        modality = ds.get("Modality", "") or "(none)"
        raise InferRefused(422, f"no route for this image (modality {modality}): {decision.reason}")
    models = [m for m in decision.models if node.models.available(m)]
    if not models:
        raise InferRefused(
            422, f"rule '{decision.rule}' routes to {', '.join(decision.models)}, which is not loaded"
        )
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="pacs-node-infer-") as tmp:
        path = Path(tmp) / "upload.dcm"
        path.write_bytes(data)
        for model_id in models:
            watch = Stopwatch(deadline=deadline)
            try:
                result, _ = analyse(
                    node.models.registry.get(model_id),
                    node.models.sessions[model_id],
                    [path],
                    level="image",
                    uid_seed=f"infer|{model_id}|{ds.get('SOPInstanceUID', '')}",
                    watch=watch,
                )
            except JobTimeout as exc:
                raise InferRefused(504, f"inference took too long: {exc}") from exc
            except DecodeError as exc:
                raise InferRefused(422, f"the pixel data cannot be decoded: {exc}") from exc
            except PreprocessError as exc:
                raise InferRefused(422, f"the image cannot be preprocessed for {model_id}: {exc}") from exc
            except NodeError as exc:
                raise InferRefused(500, f"{type(exc).__name__}: {exc}") from exc
            outcomes.append(ModelOutcome(result, _render(result, store)))
    return decision.rule or "", outcomes


def _render(result: AnalysisResult, store: PngStore) -> list[tuple[str, str]]:
    out = []
    for image in result.images:
        if image.display is None:
            continue
        for heatmap in heatmaps_to_show(image, result):
            score = next((s for s in (*image.scores, *result.findings) if s.label == heatmap.label), None)
            picture, _ = render_overlay(image.display, heatmap, score, result.algorithm)
            out.append((heatmap.label, store.put(png_bytes(picture))))
    return out
