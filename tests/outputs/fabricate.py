"""Fabricated analysis results over real (pydicom test files) and synthetic (node.synth) sources."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset

from node.types import (
    AlgorithmIdentity,
    AnalysisResult,
    Code,
    Heatmap,
    Hotspot,
    ImageResult,
    LabelScore,
    OutputIdentity,
)

IDENTITY = OutputIdentity(
    uid_root="1.2.826.0.1.3680043.8.498.",
    device_name="PACSNODE",
    device_uid="1.2.826.0.1.3680043.8.498.12345",
    manufacturer="pacs-node",
    software_version="0.1.0",
    institution_name="Test Hospital",
)
PRIVATE_CODE = Code("99PN0001", "99PACSNODE", "Synthetic nodule")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
MALIGNANT = Code("86049000", "SCT", "Malignant neoplasm, primary")


def algorithm(research: bool = True, sha256: str = "ab" * 32) -> AlgorithmIdentity:
    """A model identity as the runner makes it."""
    return AlgorithmIdentity(
        model_id="demo-model",
        name="Demo Model",
        version="1.2.0",
        sha256=sha256,
        research_use_only=research,
        parameters="thresholds nodule=0.5 pneumonia=0.5",
    )


@dataclass(frozen=True)
class Spot:
    """Where a label's heatmap peaks on one image: (row, col) centre, radius in pixels, strength."""

    image: int
    label: str
    row: int
    col: int
    radius: float
    strength: float = 1.0


def display_of(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """One frame (1-based ``frame``, else the first) windowed to uint8 grey with 1-99 percentiles
    (what the runner would draw on); colour images are converted to grey."""
    pixels = ds.pixel_array.astype(np.float32)
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        pixels = pixels[(frame or 1) - 1]
    if pixels.ndim == 3:  # colour (rows, cols, 3)
        pixels = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lo, hi = np.percentile(pixels, [1, 99])
    out = (pixels - lo) / max(float(hi - lo), 1.0) * 255.0
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(out, 0, 255).astype(np.uint8)


def blob(shape: tuple[int, int], row: int, col: int, radius: float, strength: float) -> np.ndarray:
    """A Gaussian bump in 0..1."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (strength * np.exp(-((yy - row) ** 2 + (xx - col) ** 2) / (2.0 * radius**2))).astype(np.float32)


def hotspot_of(values: np.ndarray) -> Hotspot | None:
    """Peak and half-maximum region (box, outer contour as (row, col)) of a map."""
    peak = float(values.max())
    if peak <= 0:
        return None
    r, c = np.unravel_index(int(np.argmax(values)), values.shape)
    mask = (values >= 0.5 * peak).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    largest = max(contours, key=cv2.contourArea)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return Hotspot(
        peak_row=int(r),
        peak_col=int(c),
        peak_value=peak,
        box=(int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])),
        polygon=tuple((float(p[0][1]), float(p[0][0])) for p in largest),
    )


def make_result(
    sources: Sequence[Dataset],
    findings: Sequence[LabelScore],
    spots: Sequence[Spot],
    *,
    seed: str = "job-1",
    research: bool = True,
    method: str = "gradcam",
    frames: Sequence[int | None] | None = None,
) -> AnalysisResult:
    """An AnalysisResult over ``sources``: every source is shown (``frames``: the 1-based frame
    shown of each, None for single-frame sources), every label has a heatmap on every image (zero
    background) with Gaussian bumps at ``spots``; image scores follow the spots."""
    labels = [f.label for f in findings]
    images = []
    for index, ds in enumerate(sources):
        shape = (int(ds.Rows), int(ds.Columns))
        maps = []
        scores = []
        for finding in findings:
            values = np.zeros(shape, dtype=np.float32)
            for spot in spots:
                if spot.image == index and spot.label == finding.label:
                    values = np.maximum(values, blob(shape, spot.row, spot.col, spot.radius, spot.strength))
            hot = hotspot_of(values)
            maps.append(Heatmap(label=finding.label, values=values, method=method, hotspot=hot))
            probability = finding.probability if hot is not None else min(finding.probability, 0.05)
            scores.append(
                LabelScore(
                    label=finding.label,
                    code=finding.code,
                    probability=probability,
                    threshold=finding.threshold,
                    positive=probability >= finding.threshold,
                    triage=finding.triage,
                )
            )
        images.append(
            ImageResult(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                scores=tuple(scores),
                heatmaps=tuple(maps),
                display=display_of(ds, frames[index] if frames else None),
                frame=frames[index] if frames else None,
            )
        )
    assert labels
    return AnalysisResult(
        algorithm=algorithm(research),
        study_uid=str(sources[0].StudyInstanceUID),
        series_uids=tuple(dict.fromkeys(str(ds.SeriesInstanceUID) for ds in sources)),
        level="series",
        findings=tuple(findings),
        images=tuple(images),
        uid_seed=seed,
    )


def score(label: str, code: Code, probability: float, threshold: float = 0.5) -> LabelScore:
    """A finding-level score; positive when probability >= threshold."""
    return LabelScore(
        label=label,
        code=code,
        probability=probability,
        threshold=threshold,
        positive=probability >= threshold,
        triage=probability >= threshold,
    )
