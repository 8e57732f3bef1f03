"""Dermoscopy phantoms (VL Photographic Image, XC): skin with hairs and one pigmented lesion, a
benign naevus or a melanoma.

A naevus is nearly round and symmetric, with a smooth regular border and one uniform brown with a
regular fine pigment network. A melanoma is asymmetric, its border irregular (notched, several
harmonics) and partly blurred, with colour variegation: dark brown to black areas, a blue-grey
veil, pink-red and pale regression zones and irregular dark globules near the rim. Sizes, skin tone,
hairs and the dermatoscope's circular vignette are drawn alike for both, so neither is a cue. The
lesion's pixels (mask id 1) and box carry the study label.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import VLPhotographicImageStorage

from .common import StudyContext, base_dataset, code_item, series_info
from .labels import normalise_labels
from .photo import add_colour_pixel, add_vl_image, blur, paint, rgb_image, soft_disc, to_rgb8
from .rendered import Box, Lesion, RenderedStudy
from .texture import F32, curve, mask_box, rng_stream, smooth_noise

FIELD_MM = 20.0  # width of the dermoscopic field of view


def render_derm(
    seed: int,
    label: str | tuple[str, ...] | list[str] = "naevus",
    *,
    size: int = 512,
    jpeg: bool = False,
) -> RenderedStudy:
    """Render one dermoscopic photograph in memory.

    ``label``: ``naevus`` or ``melanoma``. ``size``: rows = columns. ``jpeg``: write it JPEG baseline
    (YBR_FULL_422) instead of uncompressed RGB. Returns a :class:`RenderedStudy` with one image of
    uint8 RGB pixels (rows, columns, 3) whose lesion has mask id 1.
    """
    labels = normalise_labels("derm", label)
    if size < 64:
        raise ValueError(f"derm size must be >= 64, got {size}")
    s = int(size)
    melanoma = labels == ("melanoma",)
    skin_rng = rng_stream(seed, "derm/skin")
    img = _skin(skin_rng, s)

    les = rng_stream(seed, "derm/lesion")
    cx = s / 2 + float(les.normal(0, 0.06 * s))
    cy = s / 2 + float(les.normal(0, 0.06 * s))
    r0 = float(les.uniform(0.13, 0.27) if not melanoma else les.uniform(0.15, 0.29)) * s
    alpha, radius_fn, shape = _outline(les, s, cx, cy, r0, melanoma)
    if melanoma:
        _melanoma_colour(les, img, alpha, cx, cy, r0, radius_fn)
    else:
        _naevus_colour(les, img, alpha, cx, cy, r0)
    mask_bool = alpha > F32(0.5)
    box = mask_box(mask_bool)
    mask = mask_bool.astype(np.uint8)
    lesion = Lesion(1, labels[0], "melanoma" if melanoma else "melanocytic_naevus", shape)
    boxes = [Box(*box, lesion=1, label=labels[0])] if box is not None else []

    _hairs(rng_stream(seed, "derm/hairs"), img)
    vig = rng_stream(seed, "derm/scope")
    if vig.random() < 0.5:  # dermatoscope's circular field
        field = soft_disc((s, s), s / 2, s / 2, float(vig.uniform(0.5, 0.6)) * s, 0.02 * s)
        img *= (F32(0.06) + F32(0.94) * field)[..., None]
    rgb = to_rgb8(img, rng_stream(seed, "derm/noise"), noise=2.0)
    image = rgb_image(
        rgb,
        mask,
        boxes,
        labels,
        FIELD_MM / s,
        {"jpeg": bool(jpeg), "lesion_px": [round(cx, 1), round(cy, 1), round(r0, 1)]},
    )
    return RenderedStudy("derm", seed, labels, [image], (lesion,), {"field_mm": FIELD_MM})


def _skin(rng: np.random.Generator, s: int) -> np.ndarray:
    """Skin under dermoscopy gel: one tone with low-frequency shading and fine skin-line texture."""
    tone = float(rng.uniform(0, 1))
    base = np.array([232 - 40 * tone, 185 - 45 * tone, 160 - 50 * tone], dtype=F32) + rng.normal(
        0, 4, 3
    ).astype(F32)
    shade = F32(1.0) + F32(0.05) * smooth_noise(rng, (s, s), s / 3)
    fine = F32(0.025) * smooth_noise(rng, (s, s), max(s / 60, 1.6))
    img = (shade + fine)[..., None] * base[None, None, :]
    # a few pink vessels/erythema blotches on the skin itself (either class)
    for _ in range(int(rng.integers(0, 3))):
        a = soft_disc(
            (s, s),
            float(rng.uniform(0, s)),
            float(rng.uniform(0, s)),
            float(rng.uniform(0.05, 0.12)) * s,
            0.08 * s,
        )
        paint(img, a * F32(0.15), (220.0, 120.0, 120.0))
    return img.astype(F32)


def _outline(
    rng: np.random.Generator, s: int, cx: float, cy: float, r0: float, melanoma: bool
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray], dict]:
    """The lesion's soft alpha, its border radius as a function of angle and a shape description."""
    y, x = np.ogrid[:s, :s]
    dx, dy = x - F32(cx), y - F32(cy)
    theta = np.arctan2(dy, dx).astype(F32)
    dist = np.sqrt(dx * dx + dy * dy).astype(F32)
    if melanoma:
        harmonics = [(1, float(rng.uniform(0.08, 0.18)))]
        harmonics += [(k, float(rng.uniform(0.04, 0.11))) for k in range(2, 8)]
        harmonics += [(k, float(rng.uniform(0.02, 0.05))) for k in range(8, 14)]
        edge = float(rng.uniform(0.04, 0.1)) * r0
    else:
        harmonics = [(2, float(rng.uniform(0.0, 0.08))), (3, float(rng.uniform(0.0, 0.015)))]
        edge = float(rng.uniform(0.015, 0.035)) * r0
    phases = [float(rng.uniform(0, 2 * math.pi)) for _ in harmonics]

    def radius_fn(t: np.ndarray) -> np.ndarray:
        out = np.ones_like(t, dtype=F32)
        for (k, a), ph in zip(harmonics, phases, strict=True):
            out += F32(a) * np.cos(F32(k) * t + F32(ph))
        return F32(r0) * out

    rb = radius_fn(theta)
    edge_map = np.full_like(rb, F32(edge))
    if melanoma:  # the border blurs out on part of the circumference
        edge_map = edge_map * (F32(1.0) + F32(2.5) * np.clip(np.cos(theta - F32(phases[0])), F32(0), F32(1)))
    alpha = np.clip((rb - dist) / edge_map + F32(0.5), F32(0), F32(1))
    shape = {
        "centre_px": [round(cx, 1), round(cy, 1)],
        "radius_px": round(r0, 1),
        "harmonics": [[k, round(a, 3)] for k, a in harmonics],
        "asymmetric": melanoma,
    }
    return alpha, radius_fn, shape


def _network(rng: np.random.Generator, s: int, period: float, irregular: float) -> np.ndarray:
    """A pigment network (0..1, 1 on the lines): a honeycomb-like grid, distorted by ``irregular``."""
    y, x = np.mgrid[:s, :s].astype(F32)
    warp = F32(irregular * period) * smooth_noise(rng, (s, s), period * 2)
    ang = float(rng.uniform(0, math.pi))
    u = (x * F32(math.cos(ang)) + y * F32(math.sin(ang)) + warp) * F32(2 * math.pi / period)
    v = (-x * F32(math.sin(ang)) + y * F32(math.cos(ang)) - warp) * F32(2 * math.pi / period)
    return (np.maximum(np.cos(u), np.cos(v)) * F32(0.5) + F32(0.5)) ** F32(3)


def _naevus_colour(
    rng: np.random.Generator, img: np.ndarray, alpha: np.ndarray, cx: float, cy: float, r0: float
) -> None:
    """One uniform brown with a regular pigment network, slightly darker to the centre."""
    s = img.shape[0]
    brown = np.array([rng.uniform(125, 170), rng.uniform(78, 110), rng.uniform(50, 80)], dtype=F32)
    paint(img, alpha * F32(0.92), tuple(brown))
    net = _network(rng, s, max(2.5, 0.035 * s), 0.05)
    centre = soft_disc((s, s), cx, cy, 0.6 * r0, 0.5 * r0)
    paint(img, alpha * (F32(0.25) * net + F32(0.12) * centre), tuple(brown * F32(0.7)))


def _melanoma_colour(
    rng: np.random.Generator,
    img: np.ndarray,
    alpha: np.ndarray,
    cx: float,
    cy: float,
    r0: float,
    radius_fn: Callable[[np.ndarray], np.ndarray],
) -> None:
    """Variegated colours in irregular zones, an atypical network and dark globules near the rim."""
    s = img.shape[0]
    brown = np.array([rng.uniform(120, 160), rng.uniform(70, 100), rng.uniform(45, 75)], dtype=F32)
    paint(img, alpha * F32(0.9), tuple(brown))
    palette = [
        (float(rng.uniform(40, 70)), float(rng.uniform(25, 40)), float(rng.uniform(20, 35))),  # black-brown
        (
            float(rng.uniform(95, 125)),
            float(rng.uniform(105, 125)),
            float(rng.uniform(130, 160)),
        ),  # blue-grey veil
        (float(rng.uniform(185, 215)), float(rng.uniform(95, 125)), float(rng.uniform(100, 125))),  # pink-red
        (
            float(rng.uniform(205, 230)),
            float(rng.uniform(185, 205)),
            float(rng.uniform(175, 195)),
        ),  # regression
        (float(rng.uniform(85, 110)), float(rng.uniform(50, 65)), float(rng.uniform(35, 50))),  # dark brown
    ]
    order = rng.permutation(len(palette))[: int(rng.integers(3, 6))]
    for i in order:
        zone = smooth_noise(rng, (s, s), max(r0 * 0.5, 2.0))
        weight = np.clip((zone - F32(rng.uniform(0.1, 0.6))) * F32(1.5), F32(0), F32(1))
        paint(img, alpha * weight * F32(rng.uniform(0.6, 0.9)), palette[i])
    net = _network(rng, s, max(2.5, float(rng.uniform(0.03, 0.05)) * s), 0.6)
    patchy = np.clip(smooth_noise(rng, (s, s), max(r0 * 0.4, 2.0)), F32(0), F32(1))
    paint(img, alpha * net * patchy * F32(0.35), palette[0])
    canvas = np.zeros((s, s), dtype=np.uint8)
    for _ in range(int(rng.integers(5, 16))):  # irregular globules and dots, clustered near the rim
        t = float(rng.uniform(0, 2 * math.pi))
        rad = float(radius_fn(np.array([t], dtype=F32))[0]) * float(rng.uniform(0.6, 0.95))
        px, py = cx + rad * math.cos(t), cy + rad * math.sin(t)
        rr = max(1, int(round(float(rng.uniform(0.012, 0.03)) * s)))
        cv2.circle(canvas, (int(round(px)), int(round(py))), rr, 255, -1, cv2.LINE_AA)
    dots = blur(canvas.astype(F32) * F32(1 / 255), 0.5) * alpha
    paint(img, dots * F32(0.85), (45.0, 28.0, 25.0))


def _hairs(rng: np.random.Generator, img: np.ndarray) -> None:
    """Dark curved hairs across the field (either class)."""
    s = img.shape[0]
    canvas = np.zeros((s, s), dtype=np.uint8)
    for _ in range(int(rng.integers(0, 9))):
        p0 = rng.uniform(-0.1, 1.1, 2) * s
        ang = float(rng.uniform(0, 2 * math.pi))
        length = float(rng.uniform(0.3, 0.9)) * s
        p2 = p0 + length * np.array([math.cos(ang), math.sin(ang)])
        p1 = (p0 + p2) / 2 + rng.normal(0, 0.08 * s, 2)
        pts = np.round(curve(tuple(p0), tuple(p1), tuple(p2), 30) * 16).astype(np.int32).reshape(-1, 1, 2)
        width = max(1, int(round(float(rng.uniform(0.003, 0.007)) * s)))
        cv2.polylines(canvas, [pts], False, 255, width, cv2.LINE_AA, shift=4)
    hair = canvas.astype(F32) * F32(1 / 255)
    paint(img, hair * F32(0.85), (45.0, 32.0, 28.0))


def derm_datasets(study: RenderedStudy, ctx: StudyContext) -> list[Dataset]:
    """The DICOM dataset of a rendered dermoscopic photograph (VL Photographic Image IOD, XC)."""
    image = study.images[0]
    series = series_info(ctx, 1, "XC", "Dermoscopy of pigmented skin lesion", "SKIN")
    ds = base_dataset(ctx, series, VLPhotographicImageStorage, 1, dt.timedelta(seconds=15))
    add_vl_image(ds, ["ORIGINAL", "PRIMARY"])
    ds.Laterality = ""  # the lesion's body site is not recorded
    ds.AnatomicRegionSequence = [code_item("39937001", "SCT", "Skin")]
    row_sp, col_sp = image.pixel_spacing
    ds.PixelSpacing = [f"{row_sp:.6f}", f"{col_sp:.6f}"]
    add_colour_pixel(ds, image, jpeg=bool(image.attributes.get("jpeg")))
    return [ds]
