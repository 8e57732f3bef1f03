"""Abdominal CT phantoms (portal venous phase): body wall, liver, spleen, kidneys, spine, vessels, bowel,
and liver lesions (water-density cysts, or irregular hypo/hyper-enhancing masses).

The volume is built in Hounsfield units as a 3-D array (slices, rows, cols) by painting organs
(ellipsoids perturbed by smooth 3-D noise, with partial-volume edges) in order, then adding
correlated noise. Stored values are ``HU + 1024`` as int16 (Rescale Slope 1, Intercept -1024).
Patient coordinates follow DICOM (x to the patient's left, y posterior, z to the head); instance 1
is the most cranial slice.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from .common import StudyContext, add_frame_of_reference, add_image_pixel, base_dataset, series_info
from .labels import normalise_labels
from .rendered import Box, Lesion, RenderedImage, RenderedStudy
from .texture import F32, gaussian_noise, mask_box, rng_stream, smooth_noise_3d
from .volume import Blob, Grid, Painter

INTERCEPT = -1024.0
THICKNESSES = (2.5, 3.0, 5.0)


def render_ct(
    seed: int,
    label: str | tuple[str, ...] | list[str] = "normal",
    *,
    slices: int = 40,
    size: int = 512,
    slice_thickness: float | None = None,
    region: str = "abdomen",
    body_part: bool = True,
) -> RenderedStudy:
    """Render an abdominal CT series in memory.

    ``label``: ``normal``, ``benign`` (1-2 liver cysts, 0-20 HU, sharp edge) or ``malignant``
    (1-3 irregular hypo- or hyper-enhancing liver masses). ``slices`` and ``size`` (rows = cols) set
    the volume; pixel spacing scales with ``size`` so the field of view stays ~350-420 mm. Lesions
    are at least 1.5 slice thicknesses in radius, so each spans several slices. Returns a
    :class:`RenderedStudy` with one int16 image per slice (stored = HU + 1024), cranial first.

    ``region`` ``head``, ``chest`` or ``pelvis`` renders that region instead (no lesions; see
    :mod:`node.synth.regions`). ``body_part=False`` makes the files carry no BodyPartExamined and
    no description naming the region (as many real files): ``geometry["region_header"]`` is False.
    The default abdomen with ``body_part`` is exactly the phantom the bundled model was trained on.
    """
    if region.lower() != "abdomen":
        from .regions import render_ct_region

        study = render_ct_region(
            seed, region, label, slices=slices, size=size, slice_thickness=slice_thickness
        )
        if not body_part:
            study.geometry["region_header"] = False
        return study
    labels = normalise_labels("ct", label)
    if slices < 1 or size < 32:
        raise ValueError(f"need slices >= 1 and size >= 32, got {slices}, {size}")
    acq = rng_stream(seed, "ct/acquisition")
    thickness = float(slice_thickness or THICKNESSES[int(acq.choice(3, p=[0.3, 0.2, 0.5]))])
    spacing = float(acq.uniform(0.68, 0.82)) * 512.0 / size
    z_dome = float(acq.uniform(-140.0, -60.0))
    kernel_sigma = float(acq.uniform(0.5, 0.8))
    noise_hu = float(acq.uniform(9.0, 14.0))

    coverage = slices * thickness
    d_start = -float(acq.uniform(8, 20)) if coverage >= 215 else float(acq.uniform(60, 90)) - coverage / 2
    depths = d_start + (np.arange(slices, dtype=F32) + F32(0.5)) * F32(thickness)
    coords = (np.arange(size, dtype=F32) + F32(0.5)) * F32(spacing) - F32(size * spacing / 2)
    grid = Grid(coords, coords, depths)

    anat = rng_stream(seed, "ct/anatomy")
    hu = np.full((slices, size, size), -1000.0, dtype=F32)
    wobble = smooth_noise_3d(anat, hu.shape, 30.0 / spacing, 30.0 / thickness)
    painter = Painter(hu, grid, max(spacing, 0.8), wobble)
    liver, body_info = _anatomy(anat, painter, grid)

    lesions, lesion_blobs = _liver_lesions(
        rng_stream(seed, "ct/lesions"), labels[0], liver, depths, thickness
    )
    mask = np.zeros(hu.shape, dtype=np.uint8)
    if lesion_blobs:
        liver_occ = np.zeros(hu.shape, dtype=F32)
        for blob in liver:
            got = painter.occupancy(blob, 0.06)
            if got is not None:
                sl, occ = got
                np.maximum(liver_occ[sl], occ, out=liver_occ[sl])
        lrng = rng_stream(seed, "ct/lesion-texture")
        for les, (blob, value, irregular, edge) in zip(lesions, lesion_blobs, strict=True):
            got = painter.occupancy(blob, irregular, edge)
            if got is None:
                continue
            sl, occ = got
            occ = occ * np.clip(liver_occ[sl] * F32(1.5), F32(0), F32(1))
            target = F32(value) + F32(18.0 if les.label == "malignant" else 2.0) * lrng.standard_normal(
                occ.shape, dtype=F32
            )
            hu[sl] += (target - hu[sl]) * occ
            mask[sl][occ > F32(0.5)] = les.id

    _add_noise(rng_stream(seed, "ct/noise"), hu, noise_hu, kernel_sigma)
    stored = np.clip(np.rint(hu - F32(INTERCEPT)), F32(0), F32(4095)).astype(np.int16)

    images = []
    x0 = float(coords[0])
    for k in range(slices):
        m = mask[k]
        boxes = []
        for les in lesions:
            box = mask_box(m == les.id)
            if box is not None:
                boxes.append(Box(*box, lesion=les.id, label=les.label))
        z = z_dome - float(depths[k])
        images.append(
            RenderedImage(
                pixels=stored[k],
                mask=m,
                boxes=tuple(boxes),
                labels=tuple(sorted({b.label for b in boxes})) or ("normal",),
                photometric="MONOCHROME2",
                bits_stored=16,
                rescale_slope=1.0,
                rescale_intercept=INTERCEPT,
                window_center=40.0,
                window_width=400.0,
                pixel_spacing=(spacing, spacing),
                attributes={"image_position": [x0, x0, round(z, 3)], "slice_location": round(z, 3)},
            )
        )
    geometry = ct_geometry(size, slices, spacing, thickness, z_dome - float(depths[0]), body_info)
    if not body_part:
        geometry["region_header"] = False
    return RenderedStudy("ct", seed, labels, images, tuple(lesions), geometry)


def _add_noise(rng: np.random.Generator, hu: np.ndarray, sigma_hu: float, kernel_sigma: float) -> None:
    """Correlated quantum noise (white noise through a reconstruction-kernel-like blur), in place."""
    gain = F32(sigma_hu * 2.0 * math.sqrt(math.pi) * kernel_sigma)  # keeps the std near sigma_hu
    for k in range(hu.shape[0]):
        n = gaussian_noise(rng, hu.shape[1:])
        n = cv2.GaussianBlur(n, (0, 0), kernel_sigma)
        air = hu[k] < F32(-900)
        n[air] *= F32(0.4)
        hu[k] += gain * n


# ---------------------------------------------------------------------------------------------- anatomy


def _anatomy(rng: np.random.Generator, p: Painter, g: Grid) -> tuple[list[Blob], list[float]]:
    """Paint the body and organs; returns the liver's blobs and the body half axes."""
    a, b = float(rng.uniform(140, 175)), float(rng.uniform(100, 128))
    sx, sy = a / 160.0, b / 115.0
    yc = float(rng.uniform(-5, 10))
    d = g.d[:, None, None]
    x = g.x[None, None, :]
    y = g.y[None, :, None]
    # body cross-section: superellipse, slightly flattened posteriorly; fat, muscle wall, cavity fat
    breathe = F32(1.0) + F32(0.04) * np.sin(d / F32(90.0))  # (slices, 1, 1); scales the cross-section
    fat = float(rng.uniform(12, 30))
    muscle = float(rng.uniform(8, 14))
    yy = y - F32(yc)
    cavity = None
    layers = (
        (a, b, -100.0),
        (a - fat, b - fat * 0.7, 45.0),
        (a - fat - muscle, b - fat * 0.7 - muscle, -95.0),
    )
    for half_a, half_b, value in layers:
        r0 = (np.abs(x / F32(half_a)) ** F32(2.3) + np.abs(yy / F32(half_b)) ** F32(2.3)) ** F32(1 / 2.3)
        occ = np.clip((F32(1.0) - r0 / breathe) * F32(min(half_a, half_b) / 0.8) + F32(0.5), F32(0), F32(1))
        p.vol += (F32(value) - p.vol) * occ
        cavity = occ
    assert cavity is not None
    cavity = np.broadcast_to(cavity, p.vol.shape)

    def X(v: float) -> float:
        return v * sx

    def Y(v: float) -> float:
        return yc + v * sy

    j = rng.normal
    # paraspinal and psoas muscles
    for side in (-1, 1):
        p.paint(Blob(X(34 * side), Y(74), 100, 24 * sx, 18 * sy, 400), 50.0)
        p.paint(Blob(X(40 * side), Y(42), 230, 20 * sx, 16 * sy, 110), 48.0)
    # liver: right lobe + left lobe, with enhancing vessels
    liver = [
        Blob(X(-68 + j(0, 4)), Y(-2 + j(0, 4)), 75, 72 * sx, 82 * sy, 85, 0.2),
        Blob(X(5 + j(0, 4)), Y(-55 + j(0, 3)), 45, 62 * sx, 30 * sy, 45, -0.25),
    ]
    liver_hu = float(rng.uniform(95, 115))
    for blob in liver:
        p.paint(blob, liver_hu, irregular=0.06, within=cavity)
    _liver_vessels(rng, p, liver)
    # spleen, stomach, pancreas
    p.paint(
        Blob(X(88), Y(40), 70, 32 * sx, 58 * sy, 55, 0.6),
        float(rng.uniform(100, 120)),
        irregular=0.05,
        within=cavity,
    )
    stomach = Blob(X(50), Y(-38), 55, 42 * sx, 32 * sy, 45, -0.3)
    p.paint(stomach, 65.0, irregular=0.04, within=cavity)
    got = p.paint(
        Blob(
            stomach.cx, stomach.cy, stomach.dc, stomach.rx - 3, stomach.ry - 3, stomach.rz - 3, stomach.angle
        ),
        20.0,
        0.04,
    )
    if got is not None:
        sl, occ = got
        gas = (g.y[sl[1]][None, :, None] < F32(stomach.cy - stomach.ry * 0.35)).astype(F32)
        p.vol[sl] += (F32(-1000.0) - p.vol[sl]) * occ * gas
    p.paint(Blob(X(18), Y(12), 88, 55 * sx, 11 * sy, 22, -0.25), 95.0, irregular=0.08, within=cavity)
    # kidneys: cortex, medulla, sinus fat
    for side, dc in ((-1, 150.0 + j(0, 5)), (1, 136.0 + j(0, 5))):
        k = Blob(X(66 * side), Y(45), dc, 27 * sx, 34 * sy, 55, 0.5 * side)
        p.paint(k, float(rng.uniform(160, 190)), within=cavity)
        p.paint(Blob(k.cx, k.cy, k.dc, k.rx * 0.72, k.ry * 0.72, k.rz * 0.75, k.angle), 135.0)
        p.paint(
            Blob(k.cx - 9 * side * sx, k.cy - 6 * sy, k.dc, k.rx * 0.35, k.ry * 0.3, k.rz * 0.4, k.angle),
            -60.0,
        )
    # bowel loops in the lower abdomen
    for _ in range(int(rng.integers(10, 18))):
        bx, by = float(rng.uniform(-0.65, 0.65)) * a, yc + float(rng.uniform(-0.75, 0.15)) * b
        bd = float(rng.uniform(110, 260))
        r = float(rng.uniform(8, 16))
        loop = Blob(
            bx,
            by,
            bd,
            r,
            r * float(rng.uniform(0.7, 1.0)),
            float(rng.uniform(15, 40)),
            float(rng.uniform(0, 3)),
        )
        got = p.paint(loop, 55.0, within=cavity, only_below=-50.0)
        if got is None:
            continue
        sl, wall = got
        content = -950.0 if rng.random() < 0.35 else float(rng.uniform(5, 35))
        inner = p.occupancy(
            Blob(loop.cx, loop.cy, loop.dc, loop.rx - 2.5, loop.ry - 2.5, loop.rz - 2.5, loop.angle)
        )
        if inner is not None:
            sl2, occ2 = inner
            keep = wall[
                tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl2, sl, strict=True))
            ]
            p.vol[sl2] += (F32(content) - p.vol[sl2]) * occ2 * np.clip(keep * F32(2.0), F32(0), F32(1))
    # vessels: aorta and IVC
    p.paint(Blob(X(14), Y(18), 100, 11.5, 11.0, 1000), float(rng.uniform(150, 190)))
    p.paint(Blob(X(-24), Y(18), 80, 14.0, 9.5, 120), float(rng.uniform(110, 135)))
    _spine(rng, p, g, X, Y)
    _ribs(rng, p, g, a, b, yc, fat, muscle)
    # table under the patient
    table_y = yc + b + float(rng.uniform(8, 20))
    t = np.clip(F32(1.0) - np.abs(y - F32(table_y) + F32(0.0008) * x * x) / F32(4.0), F32(0), F32(1))
    t = t * (np.abs(x) < F32(220))
    p.vol += (F32(120.0) - p.vol) * t * (p.vol < F32(-900))
    return liver, [round(a, 1), round(b, 1)]


def _liver_vessels(rng: np.random.Generator, p: Painter, liver: list[Blob]) -> None:
    """Portal/hepatic veins: tubes where two smooth 3-D noise fields both cross zero."""
    for blob in liver:
        got = p.occupancy(blob, 0.06)
        if got is None:
            continue
        sl, occ = got
        shape = occ.shape
        cell = 16.0 / float(abs(p.grid.x[1] - p.grid.x[0]))
        dz = float(abs(p.grid.d[1] - p.grid.d[0])) if p.grid.d.size > 1 else 5.0
        n1 = smooth_noise_3d(rng, shape, cell, 16.0 / dz)
        n2 = smooth_noise_3d(rng, shape, cell, 16.0 / dz)
        tubes = np.clip(F32(1.0) - (np.abs(n1) + np.abs(n2)) / F32(0.22), F32(0), F32(1))
        core = np.clip((occ - F32(0.9)) * F32(10.0), F32(0), F32(1))
        p.vol[sl] += F32(55.0) * tubes * core


def _spine(
    rng: np.random.Generator, p: Painter, g: Grid, X: Callable[[float], float], Y: Callable[[float], float]
) -> None:
    period = float(rng.uniform(30, 36))
    phase = float(rng.uniform(0, period))
    disc = ((g.d + F32(phase)) % F32(period)) < F32(7.0)
    body = Blob(X(0), Y(48), 100, 21.0, 17.0, 1000)
    got = p.occupancy(body)
    if got is not None:
        sl, occ = got
        inner = Blob(body.cx, body.cy, body.dc, body.rx - 2.0, body.ry - 2.0, 1000)
        got_in = p.occupancy(inner)
        value = np.where(disc[sl[0]][:, None, None], F32(85.0), F32(650.0)).astype(F32)
        p.vol[sl] += (value - p.vol[sl]) * occ
        if got_in is not None:
            sl2, occ2 = got_in
            value2 = np.where(disc[sl2[0]][:, None, None], F32(85.0), F32(230.0)).astype(F32)
            p.vol[sl2] += (value2 - p.vol[sl2]) * occ2
    for blob, hu in (
        (Blob(X(0), Y(80), 100, 13.0, 9.0, 1000), 500.0),  # neural arch
        (Blob(X(0), Y(94), 100, 4.0, 10.0, 1000), 550.0),  # spinous process
        (Blob(X(-27), Y(66), 100, 13.0, 4.0, 1000, -0.3), 450.0),
        (Blob(X(27), Y(66), 100, 13.0, 4.0, 1000, 0.3), 450.0),
    ):
        got = p.occupancy(blob)
        if got is not None:
            sl, occ = got
            keep = (~disc[sl[0]])[:, None, None].astype(F32)
            p.vol[sl] += (F32(hu) - p.vol[sl]) * occ * keep
    p.paint(Blob(X(0), Y(76), 100, 8.5, 7.5, 1000), 15.0)  # spinal canal


def _ribs(
    rng: np.random.Generator, p: Painter, g: Grid, a: float, b: float, yc: float, fat: float, muscle: float
) -> None:
    """Rib sections along the body wall in the upper slices (appearing and disappearing with z)."""
    ra, rb = a - fat - muscle * 0.5, b - fat * 0.7 - muscle * 0.5
    for ang in np.linspace(-2.6, 2.6, 11):
        if abs(ang) < 0.5:
            continue  # no ribs anteriorly in the midline
        cx, cy = ra * math.sin(ang), yc - rb * math.cos(ang)
        phase = float(rng.uniform(0, 28))
        present = np.sin((g.d + F32(phase)) * F32(2 * math.pi / 28)) > F32(0.2)
        present &= g.d < F32(120)
        got = p.occupancy(Blob(cx, cy, 60, 7.0, 5.0, 1000, ang))
        if got is None:
            continue
        sl, occ = got
        p.vol[sl] += (F32(420.0) - p.vol[sl]) * occ * present[sl[0]][:, None, None].astype(F32)


# ---------------------------------------------------------------------------------------------- lesions


def _liver_lesions(
    rng: np.random.Generator, label: str, liver: list[Blob], depths: np.ndarray, thickness: float
) -> tuple[list[Lesion], list[tuple[Blob, float, float, float]]]:
    """Lesions (inside the right lobe, within the scanned range) and how to paint them."""
    if label == "normal":
        return [], []
    lobe = liver[0]
    d_lo, d_hi = float(depths[0]), float(depths[-1])
    out: list[Lesion] = []
    blobs: list[tuple[Blob, float, float, float]] = []
    count = int(rng.integers(1, 3)) if label == "benign" else int(rng.integers(1, 4))
    phase = "hypoenhancing" if rng.random() < 0.6 else "hyperenhancing"
    placed: list[tuple[float, float, float, float]] = []
    for i in range(count):
        radius = float(rng.uniform(6, 18) if label == "benign" else rng.uniform(9, 24))
        radius = max(radius, 1.6 * thickness)
        found = False
        for _ in range(60):
            u, v, w = rng.uniform(-0.5, 0.5, 3)
            cx = float(lobe.cx + u * lobe.rx * 0.8)
            cy = float(lobe.cy + v * lobe.ry * 0.8)
            dc = float(lobe.dc + w * lobe.rz * 0.9)
            if (d_hi - d_lo) / 2 < radius:
                dc = (d_lo + d_hi) / 2
            elif not d_lo + radius * 0.6 <= dc <= d_hi - radius * 0.6:
                continue
            if any(math.dist((cx, cy, dc), p[:3]) < (radius + p[3]) * 1.1 for p in placed):
                continue  # keep lesions apart
            found = True
            break
        if not found:
            if placed:
                break  # the first lesion always exists; extra ones only where they fit
            dc = min(max(dc, d_lo + radius * 0.6), d_hi - radius * 0.6)
        placed.append((cx, cy, dc, radius))
        lid = i + 1
        if label == "benign":
            blob = Blob(
                cx,
                cy,
                dc,
                radius,
                radius * float(rng.uniform(0.8, 1.0)),
                radius * float(rng.uniform(0.85, 1.0)),
                float(rng.uniform(0, 3)),
            )
            value, irregular, edge, kind = float(rng.uniform(0, 18)), 0.0, 0.6, "cyst"
        else:
            blob = Blob(
                cx,
                cy,
                dc,
                radius,
                radius * float(rng.uniform(0.7, 1.0)),
                radius * float(rng.uniform(0.75, 1.0)),
                float(rng.uniform(0, 3)),
            )
            value = float(rng.uniform(40, 70)) if phase == "hypoenhancing" else float(rng.uniform(150, 185))
            irregular, edge, kind = 0.22, 3.0, f"{phase}_mass"
        out.append(
            Lesion(
                lid,
                label,
                kind,
                {
                    "centre_mm": [round(cx, 1), round(cy, 1)],
                    "depth_below_dome_mm": round(dc, 1),
                    "radii_mm": [round(blob.rx, 1), round(blob.ry, 1), round(blob.rz, 1)],
                    "hu": round(value, 1),
                },
            )
        )
        blobs.append((blob, value, irregular, edge))
    return out, blobs


# ---------------------------------------------------------------------------------------------- DICOM


def ct_datasets(study: RenderedStudy, ctx: StudyContext) -> list[Dataset]:
    """DICOM datasets (CT Image IOD) of the slices, most cranial first."""
    geo = study.geometry
    region = geo.get("region", "abdomen")
    named = geo.get("region_header", True)
    description = {
        "abdomen": "Abdomen portal venous",
        "head": "Head without contrast",
        "chest": "Chest with contrast",
        "pelvis": "Pelvis with contrast",
    }[region]
    if not named:
        description = "Axial"
    series = series_info(
        ctx,
        2,
        "CT",
        f"{description} 5mm" if geo["slice_thickness_mm"] == 5.0 else description,
        region.upper(),
    )
    out = []
    fov = geo["pixel_spacing_mm"] * geo["columns"]
    for k, image in enumerate(study.images):
        ds = base_dataset(ctx, series, CTImageStorage, k + 1, dt.timedelta(seconds=20 + k // 16))
        add_frame_of_reference(ds, ctx)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientPosition = "FFS"
        ds.ContrastBolusAgent = "Iodinated contrast"
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = "100"
        ds.AcquisitionNumber = 1
        ds.ScanOptions = "HELICAL MODE"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = f"{fov:.2f}"
        ds.DistanceSourceToDetector = "1085.6"
        ds.DistanceSourceToPatient = "595"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "220"
        ds.Exposure = "110"
        ds.FilterType = "BODY FILTER"
        ds.ConvolutionKernel = "STANDARD"
        ds.RevolutionTime = 0.5
        ds.SingleCollimationWidth = 0.625
        ds.TotalCollimationWidth = 40.0
        ds.SpiralPitchFactor = 0.984
        ds.SliceThickness = f"{geo['slice_thickness_mm']:g}"
        ds.SpacingBetweenSlices = f"{geo['slice_thickness_mm']:g}"
        ds.PixelSpacing = [f"{image.pixel_spacing[0]:.6f}", f"{image.pixel_spacing[1]:.6f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in image.attributes["image_position"]]
        ds.SliceLocation = f"{image.attributes['slice_location']:.3f}"
        ds.RescaleIntercept = f"{image.rescale_intercept:g}"
        ds.RescaleSlope = f"{image.rescale_slope:g}"
        ds.RescaleType = "HU"
        add_image_pixel(ds, image)
        ds.WindowCenterWidthExplanation = region.upper() if named else "WINDOW"
        if not named:
            del ds.BodyPartExamined
        if region == "head":
            del ds.ContrastBolusAgent, ds.ContrastBolusRoute, ds.ContrastBolusVolume
            ds.FilterType, ds.ConvolutionKernel = "HEAD FILTER", "SOFT"
        out.append(ds)
    return out


def ct_geometry(
    size: int, slices: int, spacing: float, thickness: float, first_z: float, half_axes: object
) -> dict:
    """The ``geometry`` record of an axial CT phantom series (shared by the abdominal phantom and
    the body-region phantoms)."""
    return {
        "rows": size,
        "columns": size,
        "slices": slices,
        "pixel_spacing_mm": spacing,
        "slice_thickness_mm": thickness,
        "image_orientation": [1, 0, 0, 0, 1, 0],
        "first_slice_z_mm": first_z,
        "body_half_axes_mm": half_axes,
    }
