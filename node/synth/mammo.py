"""Screening mammography phantoms: four views (R/L x CC/MLO), breast anatomy, masses and calcifications.

Each view is rendered in a canonical orientation (chest wall at the left edge, nipple pointing
right) as a processed "for presentation" map ``A`` (0 = background, ~0.3 = fat, ~0.7 = dense
tissue), and right-breast views are mirrored at the end. A lesion is placed once in 3-D breast
coordinates (depth from the chest wall, medio-lateral and supero-inferior position) and projected
into both views of its side, so it appears at the same depth in CC and MLO.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import DigitalMammographyXRayImageStorageForPresentation

from .common import StudyContext, add_image_pixel, base_dataset, code_item, series_info
from .labels import normalise_labels
from .rendered import Box, Lesion, RenderedImage, RenderedStudy
from .texture import (
    F32,
    blur_mm,
    clip_patch,
    draw_polyline,
    ellipse_radius,
    fractal_noise,
    gaussian_noise,
    grid_mm,
    mask_box,
    polar_streaks,
    resample,
    rng_stream,
    smooth_noise,
    smoothstep,
    soft_inside,
    to_px,
    to_stored,
)

ROWS, COLS, SPACING = 3328, 2560, 0.07  # a common 24 x 29 cm detector at 70 micrometres
BITS = 14
_WORK_MAX = 1024
VIEWS: tuple[tuple[str, str], ...] = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))
VIEW_CODES = {"CC": ("399162004", "cranio-caudal"), "MLO": ("399368009", "medio-lateral oblique")}
ORIENTATION = {
    ("L", "CC"): ["A", "R"],
    ("R", "CC"): ["P", "L"],
    ("L", "MLO"): ["A", "FR"],
    ("R", "MLO"): ["P", "FL"],
}
#: density categories (BI-RADS a-d) and the glandular threshold that gives them
_DENSITY = {"a": 2.3, "b": 1.7, "c": 1.1, "d": 0.6}


@dataclass(frozen=True)
class BreastShape:
    """Outline of a compressed breast in one view (mm, canonical orientation)."""

    depth: float  # chest wall to nipple
    y_nipple: float
    half_up: float  # extent above the nipple line along the chest wall
    half_down: float
    pect_top: float = 0.0  # MLO: pectoral muscle width at the top edge (0 for CC)
    pect_len: float = 0.0  # MLO: where the pectoral edge meets the chest wall

    def radius(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Normalised radius (1 on the skin line) of canonical points."""
        dy = y - F32(self.y_nipple)
        hy = np.where(dy < 0, F32(self.half_up), F32(self.half_down))
        return np.sqrt((np.maximum(x, 0) / F32(self.depth)) ** 2 + (dy / hy) ** 2)

    def pectoral_x(self, y: float | np.ndarray) -> float | np.ndarray:
        """x of the pectoral muscle edge at height ``y`` (0 below the muscle or for CC)."""
        if self.pect_top <= 0:
            return 0.0 * np.asarray(y)
        t = np.clip(1.0 - np.asarray(y) / self.pect_len, F32(0.0), F32(1.0))
        return self.pect_top * t**0.85


@dataclass(frozen=True)
class _LesionPlan:
    """A lesion in 3-D breast coordinates; rendered in both views of its side."""

    side: str
    type: str
    label: str
    depth: float  # fraction of the chest-wall-to-nipple distance
    lateral: float  # -1 medial .. +1 lateral
    superior: float  # -1 inferior .. +1 superior
    size: float  # mm (radius of a mass, of a calcification cluster)
    seed: int


def render_mammo(
    seed: int,
    label: str | tuple[str, ...] | list[str] = "normal",
    *,
    scale: float = 1.0,
    rows: int | None = None,
    cols: int | None = None,
    photometric: str = "MONOCHROME2",
) -> RenderedStudy:
    """Render a four-view screening mammogram in memory.

    ``label``: ``normal``, ``benign`` (circumscribed oval mass) or ``malignant`` (spiculated mass,
    clustered microcalcifications, or both). ``scale`` shrinks the 3328 x 2560, 70 um default
    (0.25 gives 832 x 640 at 0.28 mm); ``rows``/``cols`` override the size. Returns a
    :class:`RenderedStudy` whose images are R CC, L CC, R MLO, L MLO (uint16, 14 bits stored).
    """
    labels = normalise_labels("mammo", label)
    rows = int(rows or max(round(ROWS * scale), 64))
    cols = int(cols or max(round(rows * COLS / ROWS), 48))
    spacing = SPACING * ROWS / rows if rows != ROWS else SPACING
    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    fov_w, fov_h = cols * spacing, rows * spacing

    anat = rng_stream(seed, "mammo/anatomy")
    density = "abcd"[int(anat.choice(4, p=[0.1, 0.4, 0.4, 0.1]))]
    shapes: dict[tuple[str, str], BreastShape] = {}
    for side in ("R", "L"):
        depth_cc = float(anat.uniform(80, 125)) * min(1.0, fov_w / 180)
        half = float(anat.uniform(72, 98)) * min(1.0, fov_h / 240)
        yc = fov_h / 2 + float(anat.normal(0, 5))
        shapes[(side, "CC")] = BreastShape(depth_cc, yc, half * 1.04, half * 0.96)
        depth_mlo = min(depth_cc * float(anat.uniform(1.0, 1.1)), 0.92 * fov_w)
        y_n = fov_h * float(anat.uniform(0.5, 0.58))
        pect_top = float(anat.uniform(0.3, 0.55)) * depth_mlo
        pect_len = min(float(anat.uniform(0.45, 0.65)) * fov_h, y_n + 20)
        a_top = min(pect_top + float(anat.uniform(15, 35)), 0.9 * depth_mlo)
        half_up = y_n / math.sqrt(1 - (a_top / depth_mlo) ** 2)
        half_down = min(fov_h - y_n - 4, float(anat.uniform(85, 115)))
        shapes[(side, "MLO")] = BreastShape(depth_mlo, y_n, half_up, half_down, pect_top, pect_len)

    plans = _plan_lesions(rng_stream(seed, "mammo/lesions"), labels[0])
    maxv = float(2**BITS - 1)
    lo, hi = 0.02 * maxv, 0.92 * maxv
    images: list[RenderedImage] = []
    lesions: list[Lesion] = [Lesion(i + 1, p.label, p.type, _plan_desc(p)) for i, p in enumerate(plans)]
    for side, view in VIEWS:
        shape = shapes[(side, view)]
        vrng = rng_stream(seed, f"mammo/anatomy/{side}{view}")
        ws = max(spacing, max(fov_w, fov_h) / _WORK_MAX)
        wshape = (int(math.ceil(fov_h / ws)), int(math.ceil(fov_w / ws)))
        att, breast = _breast(vrng, shape, wshape, ws, _DENSITY[density], view)
        sample = att[::2, ::2][breast[::2, ::2] > 0.5]
        lo_a, hi_a = np.percentile(sample, [0.5, 99.8]) if sample.size else (0.0, 1.0)
        hi_a += 0.08
        full = resample(att, ws, (rows, cols), spacing)
        detail = smooth_noise(vrng, (rows, cols), 0.6 / spacing)
        detail *= F32(0.015)
        detail[full < F32(0.1)] = 0
        full += detail
        del detail
        mask = np.zeros((rows, cols), dtype=np.uint8)
        boxes: list[Box] = []
        for lid, plan in enumerate(plans, start=1):
            if plan.side != side:
                continue
            patch, contrib = _draw_lesion(plan, shape, view, spacing, (rows, cols))
            x0, y0, x1, y1 = patch
            full[y0:y1, x0:x1] += contrib
            m = contrib > F32(0.03)
            mask[y0:y1, x0:x1][m] = lid
            box = mask_box(m, x0, y0)
            if box is not None:
                boxes.append(Box(*box, lesion=lid, label=plan.label))
        noise = rng_stream(seed, f"mammo/noise/{side}{view}")
        quantum = gaussian_noise(noise, (rows, cols))
        level = np.clip(full, F32(0), F32(1))
        level += F32(0.6)
        level *= F32(0.007)
        quantum *= level
        full += quantum
        del quantum, level
        pixels = to_stored(full, hi - lo, lo, maxv)
        wc = lo + (hi - lo) * (lo_a + hi_a) / 2
        ww = (hi - lo) * (hi_a - lo_a)
        if photometric == "MONOCHROME1":
            np.subtract(np.uint16(maxv), pixels, out=pixels)
            wc = maxv - wc
        if side == "R":
            pixels = np.ascontiguousarray(pixels[:, ::-1])
            mask = np.ascontiguousarray(mask[:, ::-1])
            boxes = [Box(cols - b.x1, b.y0, cols - b.x0, b.y1, b.lesion, b.label) for b in boxes]
        labs = tuple(sorted({b.label for b in boxes})) or ("normal",)
        images.append(
            RenderedImage(
                pixels=pixels,
                mask=mask,
                boxes=tuple(boxes),
                labels=labs,
                photometric=photometric,
                bits_stored=BITS,
                rescale_slope=1.0,
                rescale_intercept=0.0,
                window_center=round(float(wc), 1),
                window_width=round(float(ww), 1),
                pixel_spacing=(spacing, spacing),
                attributes={
                    "laterality": side,
                    "view": view,
                    "patient_orientation": ORIENTATION[(side, view)],
                    "compressed_thickness_mm": round(float(anat.uniform(35, 70)), 0),
                },
            )
        )
    geometry = {"pixel_spacing_mm": spacing, "density": density, "rows": rows, "columns": cols}
    return RenderedStudy("mammo", seed, labels, images, tuple(lesions), geometry)


# ---------------------------------------------------------------------------------------------- anatomy


def _breast(
    rng: np.random.Generator,
    shape: BreastShape,
    wshape: tuple[int, int],
    ws: float,
    threshold: float,
    view: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation map and breast mask (working grid) of one view in canonical orientation."""
    x, y = grid_mm(wshape, ws)
    r = shape.radius(x, y)
    r = r * (F32(1.0) + F32(0.012) * smooth_noise(rng, wshape, 25.0 / ws))
    size = min(shape.depth, shape.half_up, shape.half_down)
    d = (F32(1.0) - r) * F32(size)  # approximate depth under the skin (mm)
    breast = np.clip(d / F32(ws) + F32(0.5), F32(0.0), F32(1.0))

    att = F32(0.015) + breast * (F32(0.24) + F32(0.08) * np.sqrt(np.clip(d / F32(12.0), F32(0.0), F32(1.0))))
    att += F32(0.10) * breast * (d < F32(1.6)) * smoothstep(-0.5, 0.6, d)  # skin line

    # fibroglandular tissue: 1/f^3 texture plus ducts converging on the nipple, concentrated
    # centrally behind the nipple and absent from the subcutaneous fat
    tex = fractal_noise(rng, wshape, (48.0 / ws, 24.0 / ws, 12.0 / ws, 6.0 / ws, 3.0 / ws))
    ducts = polar_streaks(
        rng, x, y, shape.depth, shape.y_nipple, facing=math.pi, n_theta=360, radial_cell=60.0
    )
    env = np.exp(
        -(((x - F32(0.42 * shape.depth)) / F32(0.5 * shape.depth)) ** 2)
        - (
            (y - F32(shape.y_nipple))
            / F32(0.6 * max(shape.half_up if view == "CC" else 0.8 * shape.half_down, 1))
        )
        ** 2
    )
    env *= smoothstep(4.0, 14.0, d)
    g = F32(0.9) * tex + F32(0.22) * ducts + F32(2.4) * env - F32(threshold)
    gland = F32(1.0) / (F32(1.0) + np.exp(-g / F32(0.45)))
    gland *= breast * smoothstep(2.0, 8.0, d)
    att += F32(0.36) * gland

    # Cooper's ligaments: thin curved ridges in the fat
    n = smooth_noise(rng, wshape, 7.0 / ws)
    ridges = np.clip(F32(1.0) - np.abs(n), F32(0), F32(1)) ** 10
    att += F32(0.03) * ridges * breast * (F32(1.0) - gland) * smoothstep(1.5, 5.0, d)

    if view == "MLO":
        px = shape.pectoral_x(y)
        muscle = np.clip((F32(px) - x) / F32(1.2) + F32(0.5), F32(0.0), F32(1.0))
        grad = F32(0.46) + F32(0.08) * np.clip(F32(1.0) - x / F32(max(shape.pect_top, 1.0)), F32(0), F32(1))
        att = att * (F32(1.0) - muscle) + (grad + F32(0.02) * n) * muscle
        breast = np.maximum(breast, muscle)
    return att, breast


# ---------------------------------------------------------------------------------------------- lesions


def _plan_lesions(rng: np.random.Generator, label: str) -> list[_LesionPlan]:
    if label == "normal":
        return []
    side = "L" if rng.random() < 0.5 else "R"
    depth, lateral, superior = (
        float(rng.uniform(0.3, 0.75)),
        float(rng.uniform(-0.6, 0.6)),
        float(rng.uniform(-0.6, 0.6)),
    )
    if label == "benign":
        return [
            _LesionPlan(
                side,
                "circumscribed_mass",
                "benign",
                depth,
                lateral,
                superior,
                float(rng.uniform(5, 12)),
                int(rng.integers(2**31)),
            )
        ]
    pick = rng.random()
    plans = []
    if pick < 0.8:
        plans.append(
            _LesionPlan(
                side,
                "spiculated_mass",
                "malignant",
                depth,
                lateral,
                superior,
                float(rng.uniform(4, 9)),
                int(rng.integers(2**31)),
            )
        )
    if pick >= 0.5:
        dd = 0.0 if pick < 0.8 else float(rng.uniform(-0.1, 0.1))
        plans.append(
            _LesionPlan(
                side,
                "calcification_cluster",
                "malignant",
                depth + dd,
                lateral + dd,
                superior - dd,
                float(rng.uniform(2.5, 6)),
                int(rng.integers(2**31)),
            )
        )
    return plans


def _plan_desc(p: _LesionPlan) -> dict:
    return {
        "side": p.side,
        "depth_fraction": round(p.depth, 3),
        "lateral": round(p.lateral, 3),
        "superior": round(p.superior, 3),
        "radius_mm": round(p.size, 2),
    }


def _lesion_centre(plan: _LesionPlan, shape: BreastShape, view: str) -> tuple[float, float]:
    """Canonical (x, y) mm of the lesion centre in ``view``; keeps it inside breast tissue."""
    x = plan.depth * shape.depth
    room = math.sqrt(max(1 - plan.depth**2, 0.05)) * 0.8
    if view == "CC":
        offset = plan.lateral  # lateral is up on CC views
        half = shape.half_up if offset > 0 else shape.half_down
    else:
        offset = 0.6 * plan.superior + 0.4 * plan.lateral
        half = shape.half_up if offset > 0 else shape.half_down
        half = min(half, 110.0)
    y = shape.y_nipple - offset * half * room
    margin = plan.size + 4.0
    px = float(shape.pectoral_x(y))
    if x < px + margin:
        x = px + margin
    x = min(x, shape.depth * 0.9 - margin)
    return x, y


def _draw_lesion(
    plan: _LesionPlan, shape: BreastShape, view: str, spacing: float, out_shape: tuple[int, int]
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """Full-resolution patch and additive contribution of one lesion in one view (canonical)."""
    rng = np.random.default_rng([plan.seed, 1 if view == "CC" else 2])
    cx, cy = _lesion_centre(plan, shape, view)
    extent = plan.size * (3.6 if plan.type == "spiculated_mass" else 1.6) + 2.0
    patch = clip_patch(cx / spacing - 0.5, cy / spacing - 0.5, extent / spacing, out_shape)
    x0, y0, x1, y1 = patch
    x, y = grid_mm((y1 - y0, x1 - x0), spacing, x0 * spacing, y0 * spacing)
    if plan.type == "circumscribed_mass":
        a = plan.size
        b = a * float(rng.uniform(0.65, 0.95))
        r = ellipse_radius(x, y, cx, cy, a, b, float(rng.uniform(0, math.pi)))
        body = soft_inside(r, b, 0.3)
        halo = soft_inside(r / F32(1.0 + 0.7 / b), b + 0.7, 0.3) - body
        tex = smooth_noise(rng, body.shape, 2.0 / spacing)
        return patch, F32(0.15) * body * (F32(1.0) + F32(0.06) * tex) - F32(0.03) * halo
    if plan.type == "spiculated_mass":
        return patch, _spiculated(rng, x, y, cx, cy, plan.size, spacing, patch)
    return patch, _calcifications(rng, x, y, cx, cy, plan.size, spacing)


def _spiculated(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    spacing: float,
    patch: tuple[int, int, int, int],
) -> np.ndarray:
    theta = np.arctan2(y - F32(cy), x - F32(cx))
    dist = np.sqrt((x - F32(cx)) ** 2 + (y - F32(cy)) ** 2)
    wobble = np.zeros_like(theta)
    for k in range(2, 7):
        wobble += F32(rng.normal(0, 0.12 / k**0.5)) * np.cos(
            F32(k) * theta + F32(rng.uniform(0, 2 * math.pi))
        )
    core = soft_inside(dist / (F32(radius) * (F32(1.0) + wobble)), radius, 0.8)
    canvas = np.zeros(core.shape, dtype=np.uint8)
    n = int(rng.integers(10, 22))
    for ang in rng.uniform(0, 2 * math.pi, n):
        length = radius * float(rng.uniform(1.2, 2.6))
        a = float(ang)
        pts = [np.array([cx, cy])]
        for k in range(1, 6):
            a += float(rng.normal(0, 0.04))
            pts.append(
                np.array([cx, cy]) + (radius * 0.6 + length * k / 5) * np.array([math.cos(a), math.sin(a)])
            )
        pts_px = to_px(np.stack(pts), spacing) - np.array([patch[0], patch[1]])
        for k in range(len(pts_px) - 1):
            width = max((0.5 - 0.08 * k) / spacing, 1.0)
            draw_polyline(canvas, pts_px[k : k + 2], width, 255 - 35 * k)
    spicules = blur_mm(canvas.astype(F32) * F32(1 / 255), 0.12, spacing)
    return F32(0.17) * core + F32(0.1) * spicules * (F32(1.0) - core)


def _calcifications(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    radius: float,
    spacing: float,
) -> np.ndarray:
    out = np.zeros((y.shape[0], x.shape[1]), dtype=F32)
    n = int(rng.integers(6, 20))
    for _ in range(n):
        px, py = np.array([cx, cy]) + rng.normal(0, radius / 2.2, 2)
        size = float(rng.uniform(0.1, 0.3))
        sx = max(size, 0.5 * spacing)
        sy = max(size * float(rng.uniform(0.4, 1.0)), 0.5 * spacing)
        r = ellipse_radius(x, y, px, py, sx, sy, float(rng.uniform(0, math.pi)))
        out = np.maximum(out, F32(rng.uniform(0.3, 0.55)) * np.exp(-F32(1.5) * r * r))
    return out


# ---------------------------------------------------------------------------------------------- DICOM


def mammo_datasets(study: RenderedStudy, ctx: StudyContext) -> list[Dataset]:
    """DICOM datasets (Digital Mammography X-Ray Image, For Presentation) of the four views."""
    series = series_info(ctx, 1, "MG", "Screening mammography", "BREAST")
    out = []
    for number, image in enumerate(study.images, start=1):
        side, view = image.attributes["laterality"], image.attributes["view"]
        ds = base_dataset(
            ctx,
            series,
            DigitalMammographyXRayImageStorageForPresentation,
            number,
            dt.timedelta(minutes=number),
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PatientOrientation = image.attributes["patient_orientation"]
        ds.ImageLaterality = side
        ds.ViewPosition = view
        code, meaning = VIEW_CODES[view]
        ds.ViewCodeSequence = [code_item(code, "SCT", meaning)]
        ds.ViewCodeSequence[0].ViewModifierCodeSequence = []
        ds.AnatomicRegionSequence = [code_item("76752008", "SCT", "Breast")]
        ds.BreastImplantPresent = "NO"
        ds.PartialView = "NO"
        ds.OrganExposed = "BREAST"
        ds.PositionerType = "MAMMOGRAPHIC"
        ds.PositionerPrimaryAngle = "0" if view == "CC" else ("45" if side == "R" else "-45")
        ds.BodyPartThickness = f"{image.attributes['compressed_thickness_mm']:.0f}"
        ds.CompressionForce = "110"
        ds.KVP = "29"
        ds.ExposureTime = "1200"
        ds.XRayTubeCurrent = "100"
        ds.Exposure = "120"
        ds.AnodeTargetMaterial = "TUNGSTEN"
        ds.FilterMaterial = ["RHODIUM"]
        ds.FocalSpots = ["0.3"]
        ds.Grid = ["RECIPROCATING", "FOCUSED"]
        ds.DistanceSourceToDetector = "660"
        ds.DistanceSourceToPatient = "640"
        ds.EstimatedRadiographicMagnificationFactor = "1.03125"  # 660 / 640
        row_sp, col_sp = image.pixel_spacing
        ds.ImagerPixelSpacing = [f"{row_sp:.6f}", f"{col_sp:.6f}"]
        ds.DetectorType = "DIRECT"
        ds.DetectorConfiguration = "AREA"
        ds.DetectorID = "SYNTHMG"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if image.photometric == "MONOCHROME1" else -1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if image.photometric == "MONOCHROME1" else "IDENTITY"
        ds.AcquisitionContextSequence = []
        add_image_pixel(ds, image)
        ds.WindowCenterWidthExplanation = "BREAST"
        out.append(ds)
    return out
