"""Colour fundus photograph phantoms (Ophthalmic Photography 8 Bit): retina, vessels, optic disc, macula
and diabetic retinopathy lesions (microaneurysms, dot/blot haemorrhages, hard exudates).

The image is an orange-red disc (the 45-degree field of view) on black: illumination falls off
towards the rim, the optic disc is a bright yellowish disc on the nasal side (the viewer's right for a
right eye), the macula a darker spot temporal to it, and the retinal vessels leave the disc as
superior/inferior temporal arcades curving round the macula plus nasal branches. ``referable_dr``
adds microaneurysms (small dark red dots), dot and blot haemorrhages and clusters of yellow hard
exudates, each a lesion with its own mask id and box; ``normal`` has none. Both classes get light
reflexes and illumination variations, so brightness alone does not tell them apart.
"""

from __future__ import annotations

import datetime as dt
import math

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import OphthalmicPhotography8BitImageStorage

from .common import StudyContext, base_dataset, code_item, series_info
from .labels import normalise_labels
from .photo import add_colour_pixel, add_vl_image, blur, paint, rgb_image, soft_disc, to_rgb8
from .rendered import Box, Lesion, RenderedStudy
from .texture import F32, curve, mask_box, rng_stream, smooth_noise

#: Field of view across the imaged disc (degrees) and its approximate size on the retina (mm).
FIELD_DEGREES = 45.0
FIELD_MM = 12.0
LATERALITY_NAMES = {"R": "right", "L": "left"}
Window = tuple[slice, slice]


def render_fundus(
    seed: int,
    label: str | tuple[str, ...] | list[str] = "normal",
    *,
    size: int = 512,
    laterality: str | None = None,
    jpeg: bool = False,
) -> RenderedStudy:
    """Render one colour fundus photograph in memory.

    ``label``: ``normal`` or ``referable_dr``. ``size``: rows = columns (the field of view disc
    fills 92 % of it). ``laterality`` R or L (random when None). ``jpeg``: write it JPEG baseline
    (YBR_FULL_422) instead of uncompressed RGB. Returns a :class:`RenderedStudy` with one image of
    uint8 RGB pixels (rows, columns, 3).
    """
    labels = normalise_labels("fundus", label)
    if size < 64:
        raise ValueError(f"fundus size must be >= 64, got {size}")
    acq = rng_stream(seed, "fundus/acquisition")
    lat = (laterality or ("R" if acq.random() < 0.5 else "L")).upper()
    if lat not in LATERALITY_NAMES:
        raise ValueError(f"fundus laterality must be R or L, got {laterality!r}")
    side = 1.0 if lat == "R" else -1.0  # the disc lies on the nasal side: image right for a right eye
    s = int(size)
    anat = rng_stream(seed, "fundus/anatomy")
    cx = s / 2 + float(anat.normal(0, 0.008 * s))
    cy = s / 2 + float(anat.normal(0, 0.008 * s))
    radius = 0.46 * s
    img, fov = _retina(anat, s, cx, cy, radius)
    disc = (cx + side * float(anat.uniform(0.34, 0.42)) * radius, cy + float(anat.normal(0, 0.03)) * radius)
    disc_r = float(anat.uniform(0.075, 0.095)) * radius
    macula = (
        disc[0] - side * float(anat.uniform(0.40, 0.46)) * radius,
        disc[1] + float(anat.normal(0.02, 0.02)) * radius,
    )
    _macula(img, macula, radius)
    _vessels(anat, img, disc, macula, side, radius)
    _optic_disc(anat, img, disc, disc_r)
    _reflexes(anat, img, disc, macula, radius, fov)

    les_rng = rng_stream(seed, "fundus/lesions")
    mask = np.zeros((s, s), dtype=np.uint8)
    lesions: list[Lesion] = []
    boxes: list[Box] = []
    if labels == ("referable_dr",):
        for kind, (sy, sx), alpha, colour, desc in _dr_lesions(
            les_rng, s, cx, cy, radius, disc, disc_r, macula
        ):
            alpha *= fov[sy, sx]
            paint(img[sy, sx], alpha, colour)
            lid = len(lesions) + 1
            m = alpha > F32(0.25)
            box = mask_box(m, sx.start, sy.start)
            if box is None:
                continue
            region = mask[sy, sx]
            region[m & (region == 0)] = lid
            lesions.append(Lesion(lid, "referable_dr", kind, desc))
            boxes.append(Box(*box, lesion=lid, label="referable_dr"))

    img *= fov[..., None]
    rgb = to_rgb8(img, rng_stream(seed, "fundus/noise"), noise=1.8)
    image = rgb_image(
        rgb,
        mask,
        boxes,
        labels if boxes else ("normal",),
        FIELD_MM / (2 * radius),
        {
            "laterality": lat,
            "jpeg": bool(jpeg),
            "disc_px": [round(disc[0], 1), round(disc[1], 1)],
            "macula_px": [round(macula[0], 1), round(macula[1], 1)],
            "field_px": [round(cx, 1), round(cy, 1), round(radius, 1)],
        },
    )
    geometry = {"laterality": lat, "field_degrees": FIELD_DEGREES}
    return RenderedStudy("fundus", seed, labels, [image], tuple(lesions), geometry)


# ---------------------------------------------------------------------------------------------- anatomy


def _retina(
    rng: np.random.Generator, s: int, cx: float, cy: float, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """The lit retina (float RGB 0..255) and the field-of-view weight (soft disc)."""
    fov = soft_disc((s, s), cx, cy, radius, max(1.5, 0.006 * s))
    y, x = np.ogrid[:s, :s]
    rr = ((x - F32(cx)) ** 2 + (y - F32(cy)) ** 2) / F32(radius * radius)
    base = np.array(
        [rng.uniform(190, 225), rng.uniform(70, 100), rng.uniform(28, 48)], dtype=F32
    )  # orange-red fundus, pigmentation varies between eyes
    shade = F32(1.0) - F32(rng.uniform(0.25, 0.4)) * np.minimum(rr, F32(1.2))
    shade = shade + F32(0.06) * smooth_noise(rng, (s, s), s / 4)
    texture = F32(0.025) * smooth_noise(rng, (s, s), max(s / 90, 1.6))  # choroidal mottling
    img = (shade + texture)[..., None] * base[None, None, :]
    return img.astype(F32), fov


def _macula(img: np.ndarray, macula: tuple[float, float], radius: float) -> None:
    """Darker, browner macula with a small fovea."""
    s = img.shape[0]
    y, x = np.ogrid[:s, :s]
    d2 = (x - F32(macula[0])) ** 2 + (y - F32(macula[1])) ** 2
    m = np.exp(-d2 / F32(2 * (0.09 * radius) ** 2)).astype(F32)
    f = np.exp(-d2 / F32(2 * (0.022 * radius) ** 2)).astype(F32)
    img *= F32(1.0) - m[..., None] * np.array([0.22, 0.32, 0.3], F32) - f[..., None] * F32(0.12)


def _vessels(
    rng: np.random.Generator,
    img: np.ndarray,
    disc: tuple[float, float],
    macula: tuple[float, float],
    side: float,
    radius: float,
) -> None:
    """Arcades and branches from the disc, darker red than the retina, tapering."""
    s = img.shape[0]
    canvas = np.zeros((s, s), dtype=np.uint8)
    dx, dy = disc
    mx, my = macula
    width0 = max(1.0, 0.022 * radius)
    trunks = []
    for up in (-1.0, 1.0):
        # temporal arcade: out of the disc, round the macula, towards the temporal periphery
        ctrl = (mx + side * 0.05 * radius, my + up * float(rng.uniform(0.5, 0.62)) * radius)
        end = (
            mx - side * float(rng.uniform(0.5, 0.65)) * radius,
            my + up * float(rng.uniform(0.2, 0.35)) * radius,
        )
        trunks.append(curve(disc, ctrl, end, 40))
        # nasal branch
        ctrl = (dx + side * 0.2 * radius, dy + up * 0.25 * radius)
        end = (
            dx + side * float(rng.uniform(0.4, 0.55)) * radius,
            dy + up * float(rng.uniform(0.45, 0.7)) * radius,
        )
        trunks.append(curve(disc, ctrl, end, 30))
    for pts in trunks:
        _draw_tapered(canvas, pts, width0, 200)
        for _ in range(int(rng.integers(2, 5))):
            i = int(rng.integers(len(pts) // 5, 4 * len(pts) // 5))
            p0 = pts[i]
            heading = pts[min(i + 1, len(pts) - 1)] - pts[max(i - 1, 0)]
            ang = math.atan2(heading[1], heading[0]) + float(rng.choice([-1, 1])) * float(
                rng.uniform(0.5, 1.1)
            )
            length = float(rng.uniform(0.15, 0.35)) * radius
            p2 = p0 + length * np.array([math.cos(ang), math.sin(ang)])
            p1 = (p0 + p2) / 2 + rng.normal(0, 0.04 * radius, 2)
            _draw_tapered(canvas, curve(tuple(p0), tuple(p1), tuple(p2), 20), width0 * 0.6, 160)
    v = blur(canvas.astype(F32) * F32(1 / 255), max(0.4, 0.003 * s))
    img *= F32(1.0) - v[..., None] * np.array([0.3, 0.55, 0.5], F32)


def _draw_tapered(canvas: np.ndarray, pts: np.ndarray, width: float, value: int) -> None:
    """A polyline whose thickness falls from ``width`` to a third of it along its length."""
    n = len(pts)
    for i in range(n - 1):
        w = width * (1.0 - 0.65 * i / max(n - 2, 1))
        seg = np.round(pts[i : i + 2] * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [seg], False, int(value), max(int(round(w)), 1), cv2.LINE_AA, shift=4)


def _optic_disc(rng: np.random.Generator, img: np.ndarray, disc: tuple[float, float], disc_r: float) -> None:
    """Bright yellowish-pink disc with a paler cup, drawn over the vessel roots."""
    s = img.shape[0]
    edge = max(1.0, 0.15 * disc_r)
    a = soft_disc((s, s), disc[0], disc[1], disc_r, edge)
    paint(
        img,
        a * F32(0.9),
        (float(rng.uniform(235, 252)), float(rng.uniform(175, 205)), float(rng.uniform(110, 140))),
    )
    cup = soft_disc(
        (s, s),
        disc[0] + float(rng.normal(0, 0.1)) * disc_r,
        disc[1],
        disc_r * float(rng.uniform(0.3, 0.5)),
        edge,
    )
    paint(img, cup * F32(0.8), (252.0, 232.0, 190.0))


def _reflexes(
    rng: np.random.Generator,
    img: np.ndarray,
    disc: tuple[float, float],
    macula: tuple[float, float],
    radius: float,
    fov: np.ndarray,
) -> None:
    """Soft whitish light reflexes (young retinas, camera): in either class, so brightness is no cue."""
    s = img.shape[0]
    for _ in range(int(rng.integers(0, 4))):
        ang = float(rng.uniform(0, 2 * math.pi))
        dist = float(rng.uniform(0.3, 0.7)) * radius
        px, py = macula[0] + dist * math.cos(ang), macula[1] + dist * math.sin(ang)
        a = soft_disc((s, s), px, py, float(rng.uniform(0.05, 0.12)) * radius, 0.06 * radius)
        paint(img, a * F32(rng.uniform(0.08, 0.18)) * fov, (235.0, 200.0, 170.0))


# ---------------------------------------------------------------------------------------------- lesions


def _dr_lesions(
    rng: np.random.Generator,
    s: int,
    cx: float,
    cy: float,
    radius: float,
    disc: tuple[float, float],
    disc_r: float,
    macula: tuple[float, float],
) -> list[tuple[str, Window, np.ndarray, tuple[float, float, float], dict]]:
    """Microaneurysms, dot/blot haemorrhages and hard exudate clusters: (type, (rows, columns)
    window, alpha on the window, colour, shape)."""
    out: list[tuple[str, Window, np.ndarray, tuple[float, float, float], dict]] = []

    def place(near: tuple[float, float] | None, spread: float) -> tuple[float, float]:
        for _ in range(50):
            if near is None:
                ang, dist = (
                    float(rng.uniform(0, 2 * math.pi)),
                    radius * math.sqrt(float(rng.uniform(0.0, 0.6))),
                )
                p = (cx + dist * math.cos(ang), cy + dist * math.sin(ang))
            else:
                p = (near[0] + float(rng.normal(0, spread)), near[1] + float(rng.normal(0, spread)))
            if (p[0] - cx) ** 2 + (p[1] - cy) ** 2 > (0.85 * radius) ** 2:
                continue
            if (p[0] - disc[0]) ** 2 + (p[1] - disc[1]) ** 2 < (1.6 * disc_r) ** 2:
                continue
            return p
        return macula[0] + 0.1 * radius, macula[1] + 0.1 * radius

    def blob(p: tuple[float, float], r: float, elong: float, edge: float) -> tuple[Window, np.ndarray]:
        reach = r * elong + 2.0
        x0, x1 = max(int(p[0] - reach), 0), min(int(p[0] + reach) + 2, s)
        y0, y1 = max(int(p[1] - reach), 0), min(int(p[1] + reach) + 2, s)
        y, x = np.ogrid[y0:y1, x0:x1]
        ang = float(rng.uniform(0, math.pi))
        c, sn = math.cos(ang), math.sin(ang)
        u = ((x - F32(p[0])) * F32(c) + (y - F32(p[1])) * F32(sn)) / F32(r * elong)
        v = (-(x - F32(p[0])) * F32(sn) + (y - F32(p[1])) * F32(c)) / F32(r)
        rr = np.sqrt(u * u + v * v)
        alpha = np.clip((F32(1) - rr) * F32(r / max(edge, 0.3)) + F32(0.5), F32(0), F32(1))
        return (slice(y0, y1), slice(x0, x1)), alpha

    def desc(p: tuple[float, float], r: float) -> dict:
        return {"centre_px": [round(p[0], 1), round(p[1], 1)], "radius_px": round(r, 2)}

    for _ in range(int(rng.integers(4, 12))):
        p, r = place(None, 0.0), float(rng.uniform(0.011, 0.017)) * radius
        colour = (float(rng.uniform(95, 130)), float(rng.uniform(12, 25)), float(rng.uniform(10, 22)))
        win, alpha = blob(p, r, 1.0, 0.6)
        out.append(("microaneurysm", win, alpha * F32(0.95), colour, desc(p, r)))
    for _ in range(int(rng.integers(2, 7))):
        p, r = place(None, 0.0), float(rng.uniform(0.022, 0.045)) * radius
        colour = (float(rng.uniform(105, 140)), float(rng.uniform(15, 30)), float(rng.uniform(12, 25)))
        win, alpha = blob(p, r, float(rng.uniform(1.0, 1.6)), 0.3 * r)
        out.append(("haemorrhage", win, alpha * F32(rng.uniform(0.75, 0.95)), colour, desc(p, r)))
    n_clusters = int(rng.integers(1, 4))
    for _ in range(n_clusters):
        centre = place(macula, 0.25 * radius)
        for _ in range(int(rng.integers(3, 9))):
            p, r = place(centre, 0.05 * radius), float(rng.uniform(0.012, 0.03)) * radius
            colour = (float(rng.uniform(235, 252)), float(rng.uniform(205, 230)), float(rng.uniform(80, 120)))
            win, alpha = blob(p, r, float(rng.uniform(1.0, 1.8)), 0.4)
            out.append(("hard_exudate", win, alpha * F32(0.92), colour, desc(p, r)))
    return out


# ---------------------------------------------------------------------------------------------- DICOM


def fundus_datasets(study: RenderedStudy, ctx: StudyContext) -> list[Dataset]:
    """The DICOM dataset of a rendered fundus photograph (Ophthalmic Photography 8 Bit Image IOD)."""
    image = study.images[0]
    lat = image.attributes["laterality"]
    series = series_info(ctx, 1, "OP", f"Colour fundus photograph {LATERALITY_NAMES[lat]} eye", "EYE")
    ds = base_dataset(ctx, series, OphthalmicPhotography8BitImageStorage, 1, dt.timedelta(seconds=20))
    add_vl_image(ds, ["ORIGINAL", "PRIMARY"])
    ds.ImageLaterality = lat
    ds.AnatomicRegionSequence = [code_item("5665001", "SCT", "Retina")]
    ds.PatientEyeMovementCommanded = "NO"
    ds.HorizontalFieldOfView = float(FIELD_DEGREES)
    ds.PupilDilated = "YES"
    ds.MydriaticAgentSequence = []
    ds.DegreeOfDilation = None
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.RefractiveStateSequence = []
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 0.0
    ds.SynchronizationFrameOfReferenceUID = ctx.uids("synchronization")
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.AcquisitionDeviceTypeCodeSequence = [code_item("409898007", "SCT", "Fundus Camera")]
    ds.IlluminationTypeCodeSequence = []
    ds.LightPathFilterTypeStackCodeSequence = []
    ds.ImagePathFilterTypeStackCodeSequence = []
    ds.LensesCodeSequence = []
    ds.DetectorType = "CCD"
    row_sp, col_sp = image.pixel_spacing
    ds.PixelSpacing = [f"{row_sp:.6f}", f"{col_sp:.6f}"]
    add_colour_pixel(ds, image, jpeg=bool(image.attributes.get("jpeg")))
    return [ds]
