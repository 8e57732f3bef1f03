"""Chest radiograph phantoms (CR and DX): anatomy, tuberculosis-like and pneumonia-like lesions, DICOM header.

The image is built as a processed "for presentation" log-attenuation map ``A`` (0 = direct exposure,
about 0.75 = mediastinum and spine) on a coarse working grid, resampled to the output size, and the
lesions are drawn on full-resolution patches. Stored values rise with attenuation (MONOCHROME2) and
are inverted for MONOCHROME1.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation

from .common import StudyContext, add_image_pixel, base_dataset, code_item, series_info
from .labels import normalise_labels
from .rendered import Box, Lesion, RenderedImage, RenderedStudy
from .texture import (
    F32,
    blur_mm,
    clip_patch,
    curve,
    draw_polyline,
    ellipse_radius,
    fill_polygon,
    fractal_noise,
    gaussian_noise,
    grid_mm,
    mask_box,
    resample,
    rng_stream,
    smooth_noise,
    smoothstep,
    soft_ellipse,
    soft_inside,
    to_px,
    to_stored,
)

SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "CR": ((2500, 2048), (2000, 2500), (2140, 1760)),
    "DX": ((2500, 2500), (2000, 2500), (2500, 2048), (2816, 2304)),
}
BITS: dict[str, tuple[int, ...]] = {"CR": (12,), "DX": (12, 14, 16)}
VIEW_CODES = {"PA": ("399348003", "postero-anterior"), "AP": ("399182009", "antero-posterior")}
_WORK_MAX = 768  # long side of the anatomy working grid (pixels)


@dataclass(frozen=True)
class ChestFrame:
    """Where the chest lies in the image: mm coordinates of normalised chest units.

    ``u`` runs from -1 (image-left rib margin, patient's right) to +1; ``v`` from 0 at the lung
    apices to 1 at the costophrenic angles.
    """

    xc: float
    y_apex: float
    half_width: float
    height: float

    def mm(self, u: float | np.ndarray, v: float | np.ndarray) -> np.ndarray:
        """(x, y) mm of chest point(s) ``(u, v)``; stacked on the last axis for arrays."""
        return np.stack(
            [self.xc + np.asarray(u) * self.half_width, self.y_apex + np.asarray(v) * self.height], axis=-1
        )


def render_cxr(
    seed: int,
    label: str | tuple[str, ...] | list[str] = (),
    *,
    modality: str | None = None,
    rows: int | None = None,
    cols: int | None = None,
    scale: float = 1.0,
    photometric: str | None = None,
    bits_stored: int | None = None,
    view: str | None = None,
) -> RenderedStudy:
    """Render one chest radiograph in memory.

    ``label``: any of ``tuberculosis``, ``pneumonia`` (both allowed; empty or ``"none"`` for a clear
    chest). ``modality`` CR or DX (random when None); ``rows``/``cols`` override the detector size
    (random plausible size when None); ``scale`` shrinks or enlarges the chosen size (0.25 gives
    ~500-700 px images for training) with the pixel spacing adjusted so anatomy keeps its size in mm.
    Returns a :class:`RenderedStudy` with one image whose pixels are uint16 stored values.
    """
    labels = normalise_labels("cxr", label)
    acq = rng_stream(seed, "cxr/acquisition")
    modality = (modality or ("CR" if acq.random() < 0.5 else "DX")).upper()
    if modality not in SIZES:
        raise ValueError(f"cxr modality must be CR or DX, got {modality!r}")
    size_choice = SIZES[modality][int(acq.integers(len(SIZES[modality])))]
    bits_choice = BITS[modality][int(acq.integers(len(BITS[modality])))]
    mono1 = acq.random() < (0.35 if modality == "CR" else 0.2)
    view_choice = "PA" if acq.random() < 0.7 else "AP"
    spacing_jitter = float(acq.uniform(0.96, 1.04))
    kvp = float(acq.choice([110.0, 115.0, 120.0, 125.0]))

    r0, c0 = size_choice
    rows = int(rows or max(round(r0 * scale), 64))
    cols = int(cols or max(round(c0 * scale), 64))
    bits = int(bits_stored or bits_choice)
    if not 8 <= bits <= 16:
        raise ValueError(f"bits_stored must be 8..16, got {bits}")
    photometric = (photometric or ("MONOCHROME1" if mono1 else "MONOCHROME2")).upper()
    view = (view or view_choice).upper()
    if view not in ("PA", "AP"):
        raise ValueError(f"cxr view must be PA or AP, got {view!r}")
    spacing = 430.0 / max(rows, cols) * spacing_jitter
    fov_w, fov_h = cols * spacing, rows * spacing

    anat = rng_stream(seed, "cxr/anatomy")
    s = float(anat.uniform(0.88, 1.04)) * min(1.0, fov_h / 360.0, fov_w / 350.0)
    frame = ChestFrame(
        xc=fov_w / 2 + float(anat.normal(0, 6)),
        y_apex=max((fov_h - 250 * s) / 2 - 12 * s + float(anat.normal(0, 6)), 45 * s),
        half_width=150 * s,
        height=250 * s,
    )
    ws = max(spacing, max(fov_w, fov_h) / _WORK_MAX)
    wshape = (int(math.ceil(fov_h / ws)), int(math.ceil(fov_w / ws)))
    att, lung = _anatomy(anat, frame, wshape, ws, view)

    # window from the anatomy inside the chest (before lesions and noise, so a pair rendered with and
    # without lesions shares it)
    sample = att[::2, ::2][lung[::2, ::2] > 0.5]
    lo_a = float(np.percentile(sample, 1.0)) if sample.size else float(att.min())
    hi_a = float(np.percentile(att[::2, ::2], 99.8))

    full = resample(att, ws, (rows, cols), spacing)
    les_rng = rng_stream(seed, "cxr/lesions")
    mask = np.zeros((rows, cols), dtype=np.uint8)
    lesions: list[Lesion] = []
    boxes: list[Box] = []
    for lab in labels:
        drawers = _tb_lesions if lab == "tuberculosis" else _pneumonia_lesion
        for patch, contrib, shape_desc, kind in drawers(les_rng, frame, lung, ws, spacing, (rows, cols)):
            lid = len(lesions) + 1
            x0, y0, x1, y1 = patch
            full[y0:y1, x0:x1] += contrib
            m = np.abs(contrib) > F32(0.02)
            mask[y0:y1, x0:x1][m] = lid
            box = mask_box(m, x0, y0)
            lesions.append(Lesion(lid, lab, kind, shape_desc))
            if box is not None:
                boxes.append(Box(*box, lesion=lid, label=lab))

    maxv = float(2**bits - 1)
    lo, hi = 0.03 * maxv, 0.86 * maxv
    noise = rng_stream(seed, "cxr/noise")
    quantum = gaussian_noise(noise, (rows, cols))
    level = np.clip(full, F32(0), F32(1))
    level *= F32(0.009)
    level += F32(0.006)
    quantum *= level
    full += quantum
    del quantum, level
    pixels = to_stored(full, hi - lo, lo, maxv)
    wc = lo + (hi - lo) * (lo_a + hi_a) / 2
    ww = (hi - lo) * (hi_a - lo_a) * 1.1
    if photometric == "MONOCHROME1":
        np.subtract(np.uint16(maxv), pixels, out=pixels)
        wc = maxv - wc
    image = RenderedImage(
        pixels=pixels,
        mask=mask,
        boxes=tuple(boxes),
        labels=labels,
        photometric=photometric,
        bits_stored=bits,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        window_center=round(float(wc), 1),
        window_width=round(float(ww), 1),
        pixel_spacing=(spacing, spacing),
        attributes={"modality": modality, "view_position": view, "kvp": kvp},
    )
    return RenderedStudy("cxr", seed, labels, [image], tuple(lesions), {"modality": modality})


# ---------------------------------------------------------------------------------------------- anatomy


def _lung_outline(side: int, rng: np.random.Generator) -> np.ndarray:
    """(u, v) outline of the right (side=-1, image left) or left (side=+1) lung."""
    if side < 0:
        pts = [
            (-0.40, 0.0),
            (-0.60, 0.05),
            (-0.76, 0.18),
            (-0.87, 0.38),
            (-0.93, 0.58),
            (-0.95, 0.80),
            (-0.93, 0.98),
            (-0.80, 0.92),
            (-0.60, 0.85),
            (-0.40, 0.82),
            (-0.24, 0.85),
            (-0.15, 0.90),
            (-0.17, 0.72),
            (-0.17, 0.52),
            (-0.12, 0.32),
            (-0.13, 0.13),
            (-0.24, 0.02),
        ]
    else:
        pts = [
            (0.40, 0.0),
            (0.60, 0.05),
            (0.76, 0.18),
            (0.87, 0.38),
            (0.93, 0.58),
            (0.95, 0.82),
            (0.93, 1.02),
            (0.80, 0.97),
            (0.62, 0.92),
            (0.48, 0.92),
            (0.40, 0.95),
            (0.33, 0.80),
            (0.24, 0.62),
            (0.15, 0.47),
            (0.12, 0.32),
            (0.13, 0.13),
            (0.24, 0.02),
        ]
    arr = np.asarray(pts, dtype=np.float64)
    arr += rng.normal(0, 0.012, arr.shape)
    arr[:, 0] *= rng.uniform(0.95, 1.03)
    return arr


def _anatomy(
    rng: np.random.Generator, fr: ChestFrame, shape: tuple[int, int], ws: float, view: str
) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation map and lung mask (both float32 on the working grid)."""
    x, y = grid_mm(shape, ws)
    u = (x - F32(fr.xc)) / F32(fr.half_width)
    v = (y - F32(fr.y_apex)) / F32(fr.height)

    # body: neck widening into shoulders, chest, abdomen; thickness falls off towards the sides
    bw = F32(0.42) + F32(0.80) * smoothstep(-0.34, -0.10, v) - F32(0.06) * smoothstep(0.9, 1.3, v)
    bw = bw * F32(rng.uniform(1.06, 1.16))
    t = np.clip(F32(1.0) - (u / bw) ** 2, F32(0.0), F32(1.0))
    body = np.sqrt(t) * smoothstep(0.0, 0.04, t)
    att = F32(0.64) * body

    # lungs: filled outlines, soft edge; air thickness grows towards each lung's centre
    canvas = np.zeros(shape, dtype=np.uint8)
    for side in (-1, 1):
        fill_polygon(canvas, to_px(fr.mm(*_lung_outline(side, rng).T), ws))
    lung_sharp = canvas.astype(F32) * F32(1 / 255)
    lung = blur_mm(lung_sharp, 2.0, ws)
    small = cv2.resize(lung_sharp, (shape[1] // 4, shape[0] // 4), interpolation=cv2.INTER_AREA)
    depth = resample(blur_mm(small, 0.09 * fr.height, ws * 4), ws * 4, shape, ws)
    depth = np.clip(depth * F32(1.6), F32(0.0), F32(1.0)) ** F32(0.8)

    # heart (larger on AP), aortic knob; they hide the lung behind them
    hs = float(rng.uniform(0.92, 1.08)) * (1.12 if view == "AP" else 1.0)
    hw, ht = fr.half_width, fr.height
    heart_x, heart_y = fr.mm(0.14, 0.74)
    heart = soft_ellipse(x, y, heart_x, heart_y, 0.42 * hs * hw, 0.17 * hs * ht, 0.45, 0.3 * hw, 6.0)
    knob_x, knob_y = fr.mm(0.17, 0.24)
    knob = soft_ellipse(x, y, knob_x, knob_y, 0.08 * hw, 0.055 * ht, 0.0, 0.08 * hw, 4.0)
    cover = np.maximum(heart, knob)
    att -= F32(0.40) * lung * depth * (F32(1.0) - F32(0.85) * cover)
    att += F32(0.04) * cover

    # lung markings: branching vessels from the hila, plus hilar opacity and fine parenchymal texture
    vessels = _vessel_tree(rng, fr, shape, ws)
    att += F32(0.045) * vessels * lung
    for side in (-1, 1):
        hilum_x, hilum_y = fr.mm(0.2 * side, 0.46)
        hilum = soft_ellipse(x, y, hilum_x, hilum_y, 0.07 * hw, 0.1 * ht, 0.0, 0.07 * hw, 8.0)
        att += F32(0.07) * hilum * lung
    att += F32(0.012) * fractal_noise(rng, shape, (24.0, 12.0, 6.0)) * lung

    # trachea and main bronchi
    canvas[:] = 0
    tx = float(rng.normal(-0.01, 0.01))
    carina = (tx, 0.30)
    trachea = np.stack([fr.mm(tx, -0.45), fr.mm(tx, 0.1), fr.mm(*carina)])
    draw_polyline(canvas, to_px(trachea, ws), 17.0 * fr.half_width / 150 / ws)
    for side, end in ((-1, (-0.22, 0.43)), (1, (0.22, 0.46))):
        pts = np.stack([fr.mm(*carina), fr.mm(*end)])
        draw_polyline(canvas, to_px(pts, ws), (12.0 if side < 0 else 11.0) * fr.half_width / 150 / ws)
    att -= F32(0.09) * blur_mm(canvas.astype(F32) * F32(1 / 255), 1.2, ws)

    # spine: vertebral bodies with disc spaces, seen through the mediastinum
    period = 0.105 * fr.height
    phase = float(rng.uniform(0, period))
    discs = F32(0.75) + F32(0.25) * np.cos((y + F32(phase)) * F32(2 * math.pi / period)) ** 2
    spine = soft_inside(np.abs(u - F32(tx)) / F32(0.11), 0.11 * fr.half_width, 6.0) * smoothstep(
        -0.5, -0.3, v
    )
    att += F32(0.035) * spine * discs

    # ribs (posterior: bright cortex; anterior: fainter) and clavicles
    att += _ribs(rng, fr, shape, ws)
    att += _clavicles(rng, fr, shape, ws, view)

    # gastric bubble under the left hemidiaphragm
    bubble_x, bubble_y = fr.mm(0.45, 1.04)
    bubble = soft_ellipse(x, y, bubble_x, bubble_y, 0.13 * hw, 0.05 * ht, 0.0, 0.05 * hw, 3.0)
    att -= F32(0.08) * bubble

    # soft-tissue texture
    att += F32(0.01) * smooth_noise(rng, shape, 40.0 / ws) * body
    att *= smoothstep(0.0, 0.02, body)
    return att, lung_sharp


def _vessel_tree(rng: np.random.Generator, fr: ChestFrame, shape: tuple[int, int], ws: float) -> np.ndarray:
    """Pulmonary vessels: branching, tapering segments from each hilum, one level at a time (working grid)."""
    canvas = np.zeros(shape, dtype=np.uint8)
    unit = fr.height / 250.0
    fan = np.linspace(-1.9, 1.9, 7)
    starts, headings = [], []
    for side in (-1, 1):
        direction = fan + rng.normal(0, 0.12, fan.size)  # 0 points laterally
        headings.append(direction if side > 0 else math.pi - direction)
        starts.append(np.repeat(fr.mm(0.2 * side, 0.46)[None, :], fan.size, axis=0))
    p = np.concatenate(starts)
    heading = np.concatenate(headings)
    length, width = 32.0 * unit, 4.5 * unit
    for depth in range(6):
        end = p + length * np.stack([np.cos(heading), np.sin(heading)], axis=1)
        mid = (p + end) / 2 + rng.normal(0, 0.08 * length, p.shape)
        segs = to_px(np.stack([p, mid, end], axis=1), ws)  # (n, 3, 2)
        polys = list(np.round(segs * 16.0).astype(np.int32).reshape(-1, 3, 1, 2))
        thickness = max(int(round(width / ws)), 1)
        cv2.polylines(canvas, polys, False, int(120 + 27 * (5 - depth)), thickness, cv2.LINE_AA, shift=4)
        spread = rng.uniform(0.3, 0.55, heading.size)
        jitter = rng.normal(0, 0.1, (2, heading.size))
        heading = np.concatenate([heading - spread + jitter[0], heading + spread + jitter[1]])
        p = np.concatenate([end, end])
        length *= 0.72
        width *= 0.7
    return blur_mm(canvas.astype(F32) * F32(1 / 255), 1.0, ws)


def _ribs(rng: np.random.Generator, fr: ChestFrame, shape: tuple[int, int], ws: float) -> np.ndarray:
    post = np.zeros(shape, dtype=np.uint8)
    ant = np.zeros(shape, dtype=np.uint8)
    unit = fr.height / 250.0
    gap = float(rng.uniform(0.088, 0.1))
    for side in (-1, 1):
        for i in range(10):
            v0 = -0.06 + i * gap + float(rng.normal(0, 0.006))
            reach = min(0.55 + 0.12 * i, 1.02)
            p0 = (0.07 * side, v0)
            p1 = (0.55 * reach * side, v0 - 0.07)
            p2 = (reach * side, v0 + 0.05 + 0.04 * i)
            pts = curve(fr.mm(*p0), fr.mm(*p1), fr.mm(*p2))
            width = (8.0 + 0.25 * i) * unit / ws
            draw_polyline(post, to_px(pts, ws), width, 255)
            draw_polyline(post, to_px(pts, ws), width * 0.55, 140)
            if i >= 1:
                a0 = (reach * side, v0 + 0.05 + 0.04 * i)
                a1 = (0.7 * side, v0 + 0.16 + 0.04 * i)
                a2 = (0.3 * side, v0 + 0.30 + 0.03 * i)
                pts = curve(fr.mm(*a0), fr.mm(*a1), fr.mm(*a2))
                draw_polyline(ant, to_px(pts, ws), 11.0 * unit / ws, 255)
    out = F32(0.045) * blur_mm(post.astype(F32) * F32(1 / 255), 0.8, ws)
    out += F32(0.022) * blur_mm(ant.astype(F32) * F32(1 / 255), 1.5, ws)
    return out


def _clavicles(
    rng: np.random.Generator, fr: ChestFrame, shape: tuple[int, int], ws: float, view: str
) -> np.ndarray:
    canvas = np.zeros(shape, dtype=np.uint8)
    lift = -0.05 if view == "AP" else 0.0
    for side in (-1, 1):
        v_med = -0.07 + lift + float(rng.normal(0, 0.01))
        pts = curve(
            fr.mm(0.1 * side, v_med), fr.mm(0.5 * side, v_med + 0.02), fr.mm(0.95 * side, v_med - 0.13)
        )
        width = 13.0 * fr.height / 250.0 / ws
        draw_polyline(canvas, to_px(pts, ws), width, 255)
        draw_polyline(canvas, to_px(pts, ws), width * 0.5, 150)
    return F32(0.08) * blur_mm(canvas.astype(F32) * F32(1 / 255), 0.8, ws)


# ---------------------------------------------------------------------------------------------- lesions

Patch = tuple[int, int, int, int]


def _patch_grid(
    centre_mm: np.ndarray, half_mm: float, spacing: float, shape: tuple[int, int]
) -> tuple[Patch, np.ndarray, np.ndarray]:
    cx, cy = float(centre_mm[0]) / spacing, float(centre_mm[1]) / spacing
    patch = clip_patch(cx, cy, half_mm / spacing, shape)
    x0, y0, x1, y1 = patch
    x, y = grid_mm((y1 - y0, x1 - x0), spacing, x0 * spacing, y0 * spacing)
    return patch, x, y


def _lung_patch(lung: np.ndarray, ws: float, patch: Patch, spacing: float) -> np.ndarray:
    x0, y0, x1, y1 = patch
    m = resample(lung, ws, (y1 - y0, x1 - x0), spacing, x0 * spacing, y0 * spacing)
    return np.clip(m, F32(0.0), F32(1.0))


def _tb_lesions(
    rng: np.random.Generator,
    fr: ChestFrame,
    lung: np.ndarray,
    ws: float,
    spacing: float,
    shape: tuple[int, int],
) -> list[tuple[Patch, np.ndarray, dict, str]]:
    """Upper-zone nodular opacities with optional cavity and fibrotic streaks (one or both lungs)."""
    sides = [int(rng.choice([-1, 1]))]
    if rng.random() < 0.3:
        sides.append(-sides[0])
    out = []
    unit = fr.height / 250.0
    for side in sides:
        cu, cv = side * float(rng.uniform(0.32, 0.6)), float(rng.uniform(0.1, 0.3))
        centre = fr.mm(cu, cv)
        radius = float(rng.uniform(16, 30)) * unit
        patch, x, y = _patch_grid(centre, radius * 1.9, spacing, shape)
        contrib = np.zeros((y.shape[0], x.shape[1]), dtype=F32)
        # patchy infiltrate
        blob = soft_inside(
            ellipse_radius(x, y, centre[0], centre[1], radius, radius * 0.8, rng.uniform(0, 3)),
            radius,
            radius * 0.5,
        )
        tex = smooth_noise(rng, contrib.shape, 3.0 / spacing)
        contrib += F32(rng.uniform(0.04, 0.07)) * blob * np.clip(F32(0.6) + F32(0.5) * tex, F32(0), F32(1))
        # nodules
        n = int(rng.integers(4, 12))
        for _ in range(n):
            px, py = centre + rng.normal(0, radius * 0.45, 2)
            rr = float(rng.uniform(1.5, 5.0)) * unit
            amp, ry = float(rng.uniform(0.07, 0.14)), rr * float(rng.uniform(0.75, 1.0))
            ang = float(rng.uniform(0, 3))
            # evaluate on a window around the nodule only
            sx = slice(*np.searchsorted(x[0], [px - rr - 2, px + rr + 2]))
            sy = slice(*np.searchsorted(y[:, 0], [py - rr - 2, py + rr + 2]))
            if sx.start == sx.stop or sy.start == sy.stop:
                continue
            r = ellipse_radius(x[:, sx], y[sy], px, py, rr, ry, ang)
            contrib[sy, sx] += F32(amp) * soft_inside(r, rr, 0.7)
        cavity = None
        if rng.random() < 0.55:
            rc = float(rng.uniform(6, 13)) * unit
            wall = float(rng.uniform(2.0, 3.5)) * unit
            pc = centre + rng.normal(0, radius * 0.2, 2)
            r = ellipse_radius(x, y, pc[0], pc[1], rc, rc * rng.uniform(0.8, 1.0), rng.uniform(0, 3))
            outer = soft_inside(r, rc + wall, 0.8)
            inner = soft_inside(r * F32(rc / max(rc - wall, 1.0)), rc - wall, 0.6)
            contrib = contrib * (F32(1.0) - inner) + F32(0.15) * (outer - inner) - F32(0.04) * inner
            cavity = {
                "centre_mm": [round(float(pc[0]), 1), round(float(pc[1]), 1)],
                "radius_mm": round(rc, 1),
            }
        # fibrotic streaks towards the hilum
        if rng.random() < 0.6:
            canvas = np.zeros(contrib.shape, dtype=np.uint8)
            hilum = fr.mm(0.2 * side, 0.47)
            for _ in range(int(rng.integers(2, 5))):
                start = centre + rng.normal(0, radius * 0.3, 2)
                end = start + (hilum - start) * rng.uniform(0.25, 0.45)
                pts = np.stack([start, (start + end) / 2 + rng.normal(0, 3 * unit, 2), end])
                pts_px = to_px(pts, spacing) - np.array([patch[0], patch[1]])
                draw_polyline(canvas, pts_px, 1.2 * unit / spacing)
            contrib += F32(0.05) * canvas.astype(F32) * F32(1 / 255)
        contrib *= _lung_patch(lung, ws, patch, spacing)
        desc = {
            "centre_mm": [round(float(centre[0]), 1), round(float(centre[1]), 1)],
            "radius_mm": round(radius, 1),
            "nodules": n,
            "cavity": cavity,
            "zone": "upper",
            "side": "right" if side < 0 else "left",
        }
        out.append((patch, contrib, desc, "cavitary_nodular_opacity" if cavity else "nodular_opacity"))
    return out


_LOBES = {
    # name: (side, u range, v range, fissure v (sharp boundary) or None, fissure below the region)
    "right_upper": (-1, (0.35, 0.6), (0.18, 0.3), 0.42, True),
    "right_middle": (-1, (0.3, 0.5), (0.52, 0.66), 0.42, False),
    "right_lower": (-1, (0.45, 0.7), (0.62, 0.78), None, False),
    "left_upper": (1, (0.4, 0.6), (0.3, 0.5), None, False),
    "left_lower": (1, (0.5, 0.72), (0.64, 0.8), None, False),
}


def _pneumonia_lesion(
    rng: np.random.Generator,
    fr: ChestFrame,
    lung: np.ndarray,
    ws: float,
    spacing: float,
    shape: tuple[int, int],
) -> list[tuple[Patch, np.ndarray, dict, str]]:
    """A lobar consolidation: fuzzy, patchy opacity with air bronchograms, bounded by a fissure."""
    names = list(_LOBES)
    lobe = names[int(rng.integers(len(names)))]
    side, ur, vr, fissure, below = _LOBES[lobe]
    unit = fr.height / 250.0
    cu, cv = side * float(rng.uniform(*ur)), float(rng.uniform(*vr))
    centre = fr.mm(cu, cv)
    ax, ay = float(rng.uniform(38, 62)) * unit, float(rng.uniform(30, 50)) * unit
    patch, x, y = _patch_grid(centre, max(ax, ay) * 1.35, spacing, shape)
    region = soft_inside(
        ellipse_radius(x, y, centre[0], centre[1], ax, ay, rng.uniform(-0.4, 0.4)), min(ax, ay), 14.0 * unit
    )
    if fissure is not None:
        fy = float(fr.mm(0, fissure)[1])
        step = smoothstep(fy - 1.0, fy + 1.0, y)
        region = region * ((F32(1.0) - step) if below else step)
    patchy = np.clip(
        F32(0.75) + F32(0.35) * fractal_noise(rng, region.shape, (12.0 / spacing, 5.0 / spacing)),
        F32(0.2),
        F32(1.0),
    )
    amp = float(rng.uniform(0.17, 0.27))
    contrib = F32(amp) * region * patchy
    # air bronchograms: darker branching tubes inside the opacity
    canvas = np.zeros(region.shape, dtype=np.uint8)
    hilum = fr.mm(0.2 * side, 0.47)
    for _ in range(int(rng.integers(2, 5))):
        direction = centre - hilum + rng.normal(0, 15 * unit, 2)
        direction /= max(float(np.linalg.norm(direction)), 1e-3)
        start = centre - direction * ax * 0.5
        mid = centre + rng.normal(0, 6 * unit, 2)
        end = centre + direction * ax * 0.6 + rng.normal(0, 8 * unit, 2)
        pts_px = to_px(curve(start, mid, end), spacing) - np.array([patch[0], patch[1]])
        draw_polyline(canvas, pts_px, 3.0 * unit / spacing)
        draw_polyline(
            canvas, pts_px[: len(pts_px) // 2] + rng.normal(0, 6 * unit / spacing, 2), 2.0 * unit / spacing
        )
    tubes = blur_mm(canvas.astype(F32) * F32(1 / 255), 0.5, spacing)
    contrib -= F32(0.06) * tubes * region
    contrib *= _lung_patch(lung, ws, patch, spacing)
    desc = {
        "centre_mm": [round(float(centre[0]), 1), round(float(centre[1]), 1)],
        "half_axes_mm": [round(ax, 1), round(ay, 1)],
        "lobe": lobe,
    }
    return [(patch, contrib, desc, "lobar_consolidation")]


# ---------------------------------------------------------------------------------------------- DICOM


def cxr_datasets(study: RenderedStudy, ctx: StudyContext) -> list[Dataset]:
    """The DICOM dataset of a rendered chest radiograph (CR Image or DX For Presentation IOD)."""
    image = study.images[0]
    modality = image.attributes["modality"]
    view = image.attributes["view_position"]
    series = series_info(ctx, 1, modality, f"Chest {view}", "CHEST")
    sop_class = (
        ComputedRadiographyImageStorage if modality == "CR" else DigitalXRayImageStorageForPresentation
    )
    ds = base_dataset(ctx, series, sop_class, 1, dt.timedelta(seconds=30))
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["L", "F"]
    ds.ViewPosition = view
    ds.KVP = f"{image.attributes['kvp']:.0f}"
    ds.ExposureTime = "12"
    ds.XRayTubeCurrent = "250"
    ds.Exposure = "3"
    ds.DistanceSourceToDetector = "1800" if view == "PA" else "1000"
    row_sp, col_sp = image.pixel_spacing
    spacing = [f"{row_sp:.6f}", f"{col_sp:.6f}"]
    ds.ImagerPixelSpacing = spacing
    if modality == "CR":
        ds.PixelSpacing = spacing
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "Imager pixel spacing; no magnification correction"
        ds.PlateType = "SYNTH"
        ds.PhosphorType = "BaFBr"
    else:
        _dx_attributes(ds, image)
    ds.AnatomicRegionSequence = [code_item("43799004", "SCT", "Chest")]
    add_image_pixel(ds, image)
    ds.WindowCenterWidthExplanation = "CHEST"
    return [ds]


def _dx_attributes(ds: Dataset, image: RenderedImage) -> None:
    """DX Series/Anatomy Imaged/Image/Detector/Acquisition Context values (for presentation)."""
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageLaterality = "U"
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if image.photometric == "MONOCHROME1" else -1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if image.photometric == "MONOCHROME1" else "IDENTITY"
    ds.DetectorType = "SCINTILLATOR"
    ds.DetectorConfiguration = "AREA"
    ds.DetectorID = "SYNTHDET"
    ds.DetectorActiveShape = "RECTANGLE"
    ds.AcquisitionContextSequence = []
    ds.PositionerType = "NONE"
    code, meaning = VIEW_CODES[ds.ViewPosition]
    ds.ViewCodeSequence = [code_item(code, "SCT", meaning)]
    ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
