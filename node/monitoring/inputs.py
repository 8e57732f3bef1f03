"""Statistics of a job's input images, for input drift: size, pixel spacing, percentiles of the
stored values (a sample of up to three images, the middle frame of each), manufacturer and model
name. Nothing that identifies the patient is read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.budget import DEFAULT_BUDGET, Budget
from node.inference.decode import decode_frame, read_dataset

#: Images sampled per job, and the most pixels of each that enter the percentiles.
SAMPLED_IMAGES = 3
SAMPLED_PIXELS = 262_144
#: The numeric statistics compared with the validation reference.
NUMERIC = ("rows", "columns", "pixel_spacing_mm", "p1", "p50", "p99")


@dataclass(frozen=True)
class InputStats:
    """What one job's input looked like."""

    images: int
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_mm: float | None = None
    p1: float | None = None
    p50: float | None = None
    p99: float | None = None
    manufacturer: str = ""
    manufacturer_model: str = ""


def _text(value: object, limit: int = 64) -> str:
    return str(value or "").strip()[:limit]


def input_stats(files: Sequence[Path], budget: Budget = DEFAULT_BUDGET) -> InputStats:
    """Statistics of ``files`` (one job's images): rows, columns and row pixel spacing of the
    first, the 1st/50th/99th percentiles of the stored values of up to SAMPLED_IMAGES images
    spread over the series (each one's middle frame, subsampled), manufacturer and model name.
    Raises the decoder's errors (DecodeError, BudgetExceeded, OSError)."""
    if not files:
        return InputStats(images=0)
    picks = sorted({int(i) for i in np.linspace(0, len(files) - 1, min(SAMPLED_IMAGES, len(files)))})
    values: list[np.ndarray] = []
    first = None
    for i in picks:
        ds = read_dataset(files[i])
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        image = decode_frame(ds, frames // 2, budget)
        if first is None:
            first = (ds, image.header)
        pixels = np.asarray(image.frame(0))
        if pixels.ndim == 3:  # colour: the mean of the samples
            pixels = pixels.mean(axis=-1)
        step = max(1, int(np.ceil(np.sqrt(pixels.size / SAMPLED_PIXELS))))
        values.append(pixels[::step, ::step].astype(np.float64).ravel())
    assert first is not None
    ds, header = first
    p1, p50, p99 = (float(v) for v in np.percentile(np.concatenate(values), [1, 50, 99]))
    spacing = header.pixel_spacing[0] if header.pixel_spacing else None
    return InputStats(
        images=len(files),
        rows=int(header.rows),
        columns=int(header.cols),
        pixel_spacing_mm=None if spacing is None else float(spacing),
        p1=p1,
        p50=p50,
        p99=p99,
        manufacturer=_text(ds.get("Manufacturer")),
        manufacturer_model=_text(ds.get("ManufacturerModelName")),
    )
