"""Thin blood smear microscopy phantoms (VL Microscopic Image, GM), Giemsa-like stain: a field of red
blood cells, some infected with ring-form Plasmodium trophozoites.

Red cells are pink discs with a paler centre (central pallor), packed with a little overlap on a pale
background under slightly uneven illumination. A ring form is a thin purple ring inside a red cell
with one (sometimes two) dark purple-red chromatin dots on it; ``plasmodium`` fields have 1-6
infected cells (each a lesion: mask id and box of the infected cell), ``normal`` fields none. Both
classes carry platelets (small lavender dots between the cells) and sometimes a white cell with a
large purple nucleus, so "anything purple" is not the answer.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import VLMicroscopicImageStorage

from .common import StudyContext, base_dataset, code_item, series_info
from .labels import normalise_labels
from .photo import add_colour_pixel, add_vl_image, blur, paint, rgb_image, to_rgb8
from .rendered import Box, Lesion, RenderedStudy
from .texture import F32, rng_stream, smooth_noise

CELL_UM = 7.5  # red cell diameter


def render_smear(
    seed: int,
    label: str | tuple[str, ...] | list[str] = "normal",
    *,
    size: int = 512,
    jpeg: bool = False,
) -> RenderedStudy:
    """Render one thin blood smear field in memory.

    ``label``: ``normal`` or ``plasmodium``. ``size``: rows = columns (a red cell is about 9 % of
    the side across). ``jpeg``: write it JPEG baseline (YBR_FULL_422) instead of uncompressed RGB.
    Returns a :class:`RenderedStudy` with one image of uint8 RGB pixels (rows, columns, 3).
    """
    labels = normalise_labels("smear", label)
    if size < 64:
        raise ValueError(f"smear size must be >= 64, got {size}")
    s = int(size)
    rng = rng_stream(seed, "smear/field")
    rc = 0.045 * s * float(rng.uniform(0.92, 1.08))
    bg = np.array([rng.uniform(228, 242), rng.uniform(215, 230), rng.uniform(212, 228)], dtype=F32)
    light = F32(1.0) + F32(0.04) * smooth_noise(rng, (s, s), s / 2)
    y, x = np.ogrid[:s, :s]
    rr = ((x - F32(s / 2)) ** 2 + (y - F32(s / 2)) ** 2) / F32((0.75 * s) ** 2)
    light = light - F32(0.08) * rr  # microscope illumination falls off to the corners
    img = np.broadcast_to(bg, (s, s, 3)) * light[..., None]
    img = img.astype(F32)

    cells = _place_cells(rng, s, rc)
    cell_colour = np.array([rng.uniform(205, 228), rng.uniform(110, 140), rng.uniform(115, 145)], dtype=F32)
    for px, py, r in cells:
        _draw_cell(img, px, py, r, cell_colour * F32(rng.uniform(0.95, 1.05)))
    _distractors(rng_stream(seed, "smear/distractors"), img, cells, rc)

    mask = np.zeros((s, s), dtype=np.uint8)
    lesions: list[Lesion] = []
    boxes: list[Box] = []
    if labels == ("plasmodium",):
        par = rng_stream(seed, "smear/parasites")
        inner = [c for c in cells if rc < c[0] < s - rc and rc < c[1] < s - rc]
        n = min(int(par.integers(1, 7)), len(inner))
        for idx in sorted(par.choice(len(inner), size=n, replace=False)):
            px, py, r = inner[idx]
            desc = _ring_form(par, img, px, py, r)
            lid = len(lesions) + 1
            x0, y0 = max(int(math.floor(px - r)), 0), max(int(math.floor(py - r)), 0)
            x1, y1 = min(int(math.ceil(px + r)) + 1, s), min(int(math.ceil(py + r)) + 1, s)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            inside = (xx - px) ** 2 + (yy - py) ** 2 <= r * r
            region = mask[y0:y1, x0:x1]
            region[inside & (region == 0)] = lid
            lesions.append(Lesion(lid, "plasmodium", "ring_form_trophozoite", desc))
            boxes.append(Box(x0, y0, x1, y1, lesion=lid, label="plasmodium"))

    img = blur(img, max(0.35, 0.0015 * s))  # optics
    rgb = to_rgb8(img, rng_stream(seed, "smear/noise"), noise=2.0)
    spacing = CELL_UM / 1000.0 / (2 * rc)  # mm per pixel
    image = rgb_image(rgb, mask, boxes, labels, spacing, {"jpeg": bool(jpeg), "cells": len(cells)})
    geometry = {"cells": len(cells), "infected": len(boxes), "cell_radius_px": round(rc, 2)}
    return RenderedStudy("smear", seed, labels, [image], tuple(lesions), geometry)


def _place_cells(rng: np.random.Generator, s: int, rc: float) -> list[tuple[float, float, float]]:
    """Red cells by dart throwing: centres at least 1.75 radii apart, some touching or overlapping."""
    target = int(0.5 * s * s / (math.pi * rc * rc))
    cells: list[tuple[float, float, float]] = []
    pts = np.zeros((0, 2))
    for _ in range(target * 8):
        if len(cells) >= target:
            break
        p = rng.uniform(-0.5 * rc, s + 0.5 * rc, 2)
        if len(pts) and float(np.min(np.sum((pts - p) ** 2, axis=1))) < (1.75 * rc) ** 2:
            continue
        cells.append((float(p[0]), float(p[1]), rc * float(rng.uniform(0.88, 1.1))))
        pts = np.vstack([pts, p])
    return cells


def _window(
    img: np.ndarray, px: float, py: float, reach: float
) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    s = img.shape[0]
    x0, x1 = max(int(px - reach), 0), min(int(px + reach) + 2, s)
    y0, y1 = max(int(py - reach), 0), min(int(py + reach) + 2, s)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    d = np.sqrt((xx - F32(px)) ** 2 + (yy - F32(py)) ** 2).astype(F32)
    return slice(y0, y1), slice(x0, x1), d, np.arctan2(yy - F32(py), xx - F32(px)).astype(F32)


def _draw_cell(img: np.ndarray, px: float, py: float, r: float, colour: np.ndarray) -> None:
    """One red cell: a pink disc, darker rim, paler centre."""
    sy, sx, d, _ = _window(img, px, py, r + 2)
    if d.size == 0:
        return
    body = np.clip((F32(r) - d) / F32(1.0) + F32(0.5), F32(0), F32(1))
    pallor = np.clip((F32(0.5 * r) - d) / F32(0.35 * r) + F32(0.5), F32(0), F32(1))
    patch = img[sy, sx]
    paint(patch, body * F32(0.92), tuple(colour))
    paint(patch, pallor * F32(0.5), (238.0, 200.0, 200.0))
    rim = np.exp(-(((d - F32(0.85 * r)) / F32(0.12 * r)) ** 2)) * body
    patch *= F32(1.0) - F32(0.08) * rim[..., None]


def _distractors(
    rng: np.random.Generator, img: np.ndarray, cells: list[tuple[float, float, float]], rc: float
) -> None:
    """Platelets between the cells and, sometimes, a white cell (either class)."""
    s = img.shape[0]
    for _ in range(int(rng.integers(2, 8))):
        px, py = rng.uniform(0, s, 2)
        r = float(rng.uniform(0.12, 0.2)) * rc
        sy, sx, d, _ = _window(img, px, py, r + 2)
        a = np.clip((F32(r) - d) / F32(max(0.4 * r, 0.5)) + F32(0.5), F32(0), F32(1))
        paint(img[sy, sx], a * F32(0.6), (170.0, 130.0, 185.0))
    if rng.random() < 0.15:
        px, py = rng.uniform(0.15 * s, 0.85 * s, 2)
        r = 1.35 * rc
        sy, sx, d, th = _window(img, px, py, r + 2)
        body = np.clip((F32(r) - d) + F32(0.5), F32(0), F32(1))
        paint(img[sy, sx], body * F32(0.9), (215.0, 195.0, 215.0))
        lobes = F32(0.62 * r) * (F32(1.0) + F32(0.25) * np.cos(F32(3) * th))
        nucleus = np.clip((lobes - d) / F32(1.2) + F32(0.5), F32(0), F32(1))
        paint(img[sy, sx], nucleus * F32(0.85), (95.0, 55.0, 140.0))


def _ring_form(rng: np.random.Generator, img: np.ndarray, px: float, py: float, r: float) -> dict:
    """A ring-form trophozoite inside the cell at (px, py): thin purple ring, chromatin dot(s)."""
    off = float(rng.uniform(0.1, 0.35)) * r
    ang = float(rng.uniform(0, 2 * math.pi))
    qx, qy = px + off * math.cos(ang), py + off * math.sin(ang)
    ring_r = float(rng.uniform(0.3, 0.42)) * r
    width = max(0.7, 0.11 * r)
    sy, sx, d, th = _window(img, qx, qy, ring_r + width + 2)
    ring = np.exp(-(((d - F32(ring_r)) / F32(width)) ** 2)).astype(F32)
    gap = float(rng.uniform(0, 2 * math.pi))
    ring *= F32(0.55) + F32(0.45) * np.clip(np.cos(th - F32(gap)) * F32(-1.0) + F32(0.3), F32(0), F32(1))
    patch = img[sy, sx]
    paint(patch, ring * F32(0.85), (115.0, 60.0, 150.0))
    dots = 2 if rng.random() < 0.2 else 1
    for k in range(dots):
        t = gap + k * float(rng.uniform(0.6, 1.2))
        dx, dy = qx + ring_r * math.cos(t), qy + ring_r * math.sin(t)
        dd = np.sqrt(
            (np.arange(sx.start, sx.stop)[None, :] - F32(dx)) ** 2
            + (np.arange(sy.start, sy.stop)[:, None] - F32(dy)) ** 2
        )
        dr = max(0.8, float(rng.uniform(0.13, 0.18)) * r)
        dot = np.clip((F32(dr) - dd.astype(F32)) / F32(0.6) + F32(0.5), F32(0), F32(1))
        paint(patch, dot * F32(0.95), (85.0, 20.0, 85.0))
    return {
        "cell_centre_px": [round(px, 1), round(py, 1)],
        "cell_radius_px": round(r, 2),
        "ring_centre_px": [round(qx, 1), round(qy, 1)],
        "ring_radius_px": round(ring_r, 2),
        "chromatin_dots": dots,
    }


def smear_datasets(study: RenderedStudy, ctx: StudyContext) -> list[Dataset]:
    """The DICOM dataset of a rendered blood smear field (VL Microscopic Image IOD, GM)."""
    image = study.images[0]
    series = series_info(ctx, 1, "GM", "Thin blood smear, Giemsa stain, 100x oil", "BLOOD")
    ds = base_dataset(ctx, series, VLMicroscopicImageStorage, 1, dt.timedelta(seconds=10))
    add_vl_image(ds, ["ORIGINAL", "PRIMARY"])
    ds.AnatomicRegionSequence = [code_item("87612001", "SCT", "Blood")]
    _specimen(ds, ctx)
    row_sp, col_sp = image.pixel_spacing
    ds.PixelSpacing = [f"{row_sp:.8f}"[:16], f"{col_sp:.8f}"[:16]]
    add_colour_pixel(ds, image, jpeg=bool(image.attributes.get("jpeg")))
    return [ds]


def _specimen(ds: Dataset, ctx: StudyContext) -> None:
    """Specimen module: one slide holding a peripheral blood smear."""
    ds.ContainerIdentifier = f"SLIDE-{ctx.study_id}"
    ds.IssuerOfTheContainerIdentifierSequence = []
    ds.ContainerTypeCodeSequence = [code_item("433466003", "SCT", "Microscope slide")]
    item = Dataset()
    item.SpecimenIdentifier = f"SPEC-{ctx.study_id}"
    item.SpecimenUID = ctx.uids("specimen")
    item.IssuerOfTheSpecimenIdentifierSequence = []
    item.SpecimenShortDescription = "Peripheral blood thin smear"
    item.SpecimenPreparationSequence = []
    item.PrimaryAnatomicStructureSequence = [code_item("87612001", "SCT", "Blood")]
    ds.SpecimenDescriptionSequence = [item]
