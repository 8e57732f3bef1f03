"""Brain MR phantoms (axial T2, FLAIR or post-contrast T1): scalp, skull, CSF, grey/white matter,
deep nuclei, ventricles, orbits, and optionally a tumour with surrounding oedema.

The head is built as a 3-D tissue-class map (slices, rows, cols) from ellipsoids and smooth 3-D
noise, converted to signal through a per-sequence intensity table, multiplied by a smooth coil
bias field, given Rician noise, and scaled to unsigned 16-bit stored values. Slices run from
inferior to superior; patient coordinates follow DICOM (x left, y posterior, z superior).
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from .common import StudyContext, add_frame_of_reference, add_image_pixel, base_dataset, series_info
from .labels import normalise_labels
from .rendered import Box, Lesion, RenderedImage, RenderedStudy
from .texture import F32, gaussian_noise, mask_box, rng_stream, smooth_noise_3d
from .volume import Blob, Grid, Painter

SEQUENCES = ("T2", "FLAIR", "T1C")
#: relative signal per tissue and sequence
_SIGNAL: dict[str, dict[str, float]] = {
    "T2": dict(
        fat=0.70,
        muscle=0.25,
        bone=0.03,
        marrow=0.45,
        csf=1.00,
        gm=0.56,
        wm=0.40,
        deep=0.50,
        vitreous=0.95,
        lens=0.15,
        oedema=0.82,
        tumour=0.62,
        necrosis=0.92,
        rim=0.62,
    ),
    "FLAIR": dict(
        fat=0.60,
        muscle=0.25,
        bone=0.03,
        marrow=0.40,
        csf=0.07,
        gm=0.56,
        wm=0.42,
        deep=0.50,
        vitreous=0.08,
        lens=0.15,
        oedema=0.88,
        tumour=0.72,
        necrosis=0.25,
        rim=0.72,
    ),
    "T1C": dict(
        fat=0.90,
        muscle=0.35,
        bone=0.03,
        marrow=0.75,
        csf=0.12,
        gm=0.45,
        wm=0.60,
        deep=0.50,
        vitreous=0.10,
        lens=0.40,
        oedema=0.38,
        tumour=0.45,
        necrosis=0.15,
        rim=0.95,
    ),
}
_TIMING = {  # TR, TE, TI (ms), scanning sequence, sequence variant
    "T2": (4500.0, 95.0, None, "SE", "SK"),
    "FLAIR": (9000.0, 120.0, 2500.0, ["SE", "IR"], "SK"),
    "T1C": (550.0, 12.0, None, "SE", "SK"),
}
SLICE_GAP = 1.0  # mm between 5 mm slices


def render_mr(
    seed: int,
    label: str | tuple[str, ...] | list[str] = "normal",
    *,
    slices: int = 24,
    size: int = 256,
    sequence: str | None = None,
    region: str = "head",
    body_part: bool = True,
) -> RenderedStudy:
    """Render an axial brain MR series in memory.

    ``label``: ``normal`` or ``tumour`` (an irregular mass, necrotic when large, with surrounding
    oedema in the white matter; the lesion mask and boxes cover tumour and oedema, the radii of each
    are in the lesion shape). ``slices`` (5 mm thick, 6 mm apart) and ``size`` (rows = cols, ~230 mm field
    of view); ``sequence`` T2, FLAIR or T1C (post-contrast T1, rim-enhancing tumour), random when
    None. Returns a :class:`RenderedStudy` with one uint16 image per slice, inferior first.

    ``region`` ``abdomen`` or ``pelvis`` renders a body MR instead (no lesions; see
    :mod:`node.synth.regions`). ``body_part=False``: no BodyPartExamined and no description naming
    the region in the files (``geometry["region_header"]`` False). The default is unchanged.
    """
    if region.lower() != "head":
        from .regions import render_mr_body

        study = render_mr_body(seed, region, label, slices=slices, size=size, sequence=sequence)
        if not body_part:
            study.geometry["region_header"] = False
        return study
    labels = normalise_labels("mr", label)
    if slices < 1 or size < 32:
        raise ValueError(f"need slices >= 1 and size >= 32, got {slices}, {size}")
    acq = rng_stream(seed, "mr/acquisition")
    seq_choice = SEQUENCES[int(acq.integers(len(SEQUENCES)))]
    sequence = (sequence or seq_choice).upper()
    if sequence not in _SIGNAL:
        raise ValueError(f"sequence must be one of {SEQUENCES}, got {sequence!r}")
    spacing = float(acq.uniform(0.86, 0.94)) * 256.0 / size
    thickness, step = 5.0, 5.0 + SLICE_GAP
    gain = float(acq.uniform(1800, 3200))
    noise_sigma = float(acq.uniform(0.012, 0.025))
    coverage = slices * step
    z_start = -62.0 if coverage >= 140 else float(acq.uniform(5, 25)) - coverage / 2
    z = z_start + np.arange(slices, dtype=F32) * F32(step)
    coords = (np.arange(size, dtype=F32) + F32(0.5)) * F32(spacing) - F32(size * spacing / 2)
    grid = Grid(coords, coords, z)
    shape = (slices, size, size)

    anat = rng_stream(seed, "mr/anatomy")
    sig = _SIGNAL[sequence]
    vol = np.zeros(shape, dtype=F32)
    brain_depth, wm = _head(anat, grid, vol, sig, spacing, step)

    lesions: list[Lesion] = []
    mask = np.zeros(shape, dtype=np.uint8)
    if labels[0] == "tumour":
        les = rng_stream(seed, "mr/lesions")
        lesion, extent = _tumour(les, grid, vol, brain_depth, wm, sig, spacing, step)
        lesions.append(lesion)
        mask[extent > F32(0.5)] = 1

    bias = F32(1.0) + F32(0.08) * smooth_noise_3d(anat, shape, 90.0 / spacing, 90.0 / step)
    vol *= bias
    noise = rng_stream(seed, "mr/noise")
    n1 = gaussian_noise(noise, shape)
    n2 = gaussian_noise(noise, shape)
    vol = np.sqrt((vol + F32(noise_sigma) * n1) ** 2 + (F32(noise_sigma) * n2) ** 2)  # Rician magnitude
    stored = np.clip(np.rint(vol * F32(gain)), F32(0), F32(65535)).astype(np.uint16)

    brain = brain_depth > F32(0)
    sample = vol[brain] if brain.any() else vol.ravel()
    hi = float(np.percentile(sample[:: max(sample.size // 200_000, 1)], 99.5)) * gain
    lo = 0.0
    images = []
    x0 = float(coords[0])
    for k in range(slices):
        m = mask[k]
        box = mask_box(m == 1) if lesions else None
        boxes = (Box(*box, lesion=1, label="tumour"),) if box else ()
        images.append(
            RenderedImage(
                pixels=stored[k],
                mask=m,
                boxes=boxes,
                labels=("tumour",) if boxes else ("normal",),
                photometric="MONOCHROME2",
                bits_stored=16,
                rescale_slope=1.0,
                rescale_intercept=0.0,
                window_center=round(float((lo + hi) / 2), 1),
                window_width=round(float(max(hi - lo, 1.0)), 1),
                pixel_spacing=(spacing, spacing),
                attributes={
                    "image_position": [x0, x0, round(float(z[k]), 3)],
                    "slice_location": round(float(z[k]), 3),
                },
            )
        )
    geometry = mr_geometry(size, slices, spacing, thickness, step, sequence)
    if not body_part:
        geometry["region_header"] = False
    return RenderedStudy("mr", seed, labels, images, tuple(lesions), geometry)


# ---------------------------------------------------------------------------------------------- anatomy


def _head(
    rng: np.random.Generator, g: Grid, vol: np.ndarray, sig: dict[str, float], spacing: float, step: float
) -> tuple[np.ndarray, np.ndarray]:
    """Paint the head's tissues into ``vol`` (signal per ``sig``); return the depth inside the brain
    surface (mm, 0 outside) and the white-matter occupancy."""
    shape = vol.shape

    def paint(name: str, occ: np.ndarray, sl: tuple[slice, ...] = (slice(None),)) -> None:
        region = vol[sl]
        region += (F32(sig[name]) - region) * occ

    s = float(rng.uniform(0.93, 1.05))
    ax, ay = 74.0 * s, 94.0 * s
    az_up, az_down = 88.0 * s, 78.0 * s
    x = g.x[None, None, :]
    y = g.y[None, :, None] - F32(rng.normal(0, 2))
    z = g.d[:, None, None]
    az = np.where(z > 0, F32(az_up), F32(az_down))
    wob = smooth_noise_3d(rng, shape, 40.0 / spacing, 40.0 / step)
    rh = np.sqrt((x / F32(ax)) ** 2 + (y / F32(ay)) ** 2 + (z / az) ** 2) * (F32(1.0) + F32(0.01) * wob)
    norm = np.sqrt(x * x + y * y + z * z)
    depth = norm * (F32(1.0) - rh) / np.maximum(rh, F32(1e-3))  # mm inside the scalp surface (approx.)
    vox = F32(spacing * 0.7)

    def band(lo: float, hi: float) -> np.ndarray:
        return np.clip((depth - F32(lo)) / vox + F32(0.5), F32(0), F32(1)) * np.clip(
            (F32(hi) - depth) / vox + F32(0.5), F32(0), F32(1)
        )

    scalp, skull_out, diploe, skull_in, csf = 5.5, 7.5, 10.5, 12.5, 14.5
    for name, lo, hi in (
        ("muscle", 0.0, 1.5),
        ("fat", 1.5, scalp),
        ("bone", scalp, skull_out),
        ("marrow", skull_out, diploe),
        ("bone", diploe, skull_in),
        ("csf", skull_in, 1e9),
    ):
        paint(name, band(lo, hi))
    bd = depth - F32(csf)  # depth inside the brain surface
    # cortex with sulci: CSF clefts where a ridged noise field peaks near the surface
    n = smooth_noise_3d(rng, shape, 9.0 / spacing, 9.0 / step)
    sulci = np.clip(F32(1.0) - np.abs(n) / F32(0.18), F32(0), F32(1)) * (bd < F32(14.0))
    brain = np.clip(bd / vox + F32(0.5), F32(0), F32(1))
    paint("gm", brain * (F32(1.0) - sulci))
    wm_depth = F32(3.5) + F32(2.5) * np.abs(smooth_noise_3d(rng, shape, 14.0 / spacing, 14.0 / step))
    wm = np.clip((bd - wm_depth) / vox + F32(0.5), F32(0), F32(1)) * (F32(1.0) - sulci)
    # interhemispheric fissure (above the corpus callosum level, or anywhere anterior/posterior)
    fissure = np.clip(F32(1.0) - np.abs(x - F32(rng.normal(0, 1))) / F32(1.6), F32(0), F32(1))
    fissure = fissure * ((z > F32(25)) | (np.abs(y) > F32(45)))
    wm = wm * (F32(1.0) - fissure)
    paint("wm", wm)
    paint("csf", fissure * brain)

    p = Painter(vol, g, spacing * 0.8, wob)
    for side in (-1, 1):
        for blob, name in (
            (Blob(16.0 * side, 2.0, 2.0, 10.0, 20.0, 13.0, 0.25 * side), "deep"),  # basal ganglia
            (Blob(10.0 * side, 20.0, 4.0, 9.0, 13.0, 10.0), "deep"),  # thalamus
            (Blob(9.0 * side, -16.0, 16.0, 5.0, 15.0, 9.0, -0.35 * side), "csf"),  # frontal horn
            (Blob(11.0 * side, 8.0, 22.0, 6.0, 24.0, 6.0, -0.1 * side), "csf"),  # body
            (Blob(16.0 * side, 34.0, 12.0, 5.0, 11.0, 6.0, 0.3 * side), "csf"),  # occipital horn
        ):
            got = p.occupancy(blob, 0.05)
            if got is not None:
                sl, occ = got
                paint(name, occ * brain[sl], sl)
    got = p.occupancy(Blob(0.0, 10.0, 2.0, 2.2, 12.0, 8.0))  # third ventricle
    if got is not None:
        paint("csf", got[1], got[0])
    # eyes: vitreous globe, lens, orbital fat (lowest slices only)
    for side in (-1, 1):
        eye = Blob(31.0 * side * s, -66.0 * s, -38.0, 12.0, 12.0, 12.0)
        for blob, name in (
            (Blob(eye.cx, eye.cy + 2, eye.dc, 17.0, 16.0, 15.0), "fat"),
            (eye, "vitreous"),
            (Blob(eye.cx, eye.cy - 10.0, eye.dc, 4.0, 1.8, 4.0), "lens"),
        ):
            got = p.occupancy(blob)
            if got is not None:
                paint(name, got[1], got[0])
    return bd * (bd > F32(0)), wm


# ---------------------------------------------------------------------------------------------- lesions


def _tumour(
    rng: np.random.Generator,
    g: Grid,
    vol: np.ndarray,
    brain_depth: np.ndarray,
    wm: np.ndarray,
    sig: dict[str, float],
    spacing: float,
    step: float,
) -> tuple[Lesion, np.ndarray]:
    """Paint a tumour (necrotic when large) and its oedema into ``vol``; return it and the occupancy
    of the whole abnormal region (tumour and oedema), which becomes its mask."""
    radius = float(rng.uniform(10, 22))
    z_lo, z_hi = float(g.d[0]), float(g.d[-1])
    for _ in range(200):
        cx = float(rng.choice([-1, 1]) * rng.uniform(18, 42))
        cy = float(rng.uniform(-50, 45))
        cz = (
            float(rng.uniform(max(z_lo + radius * 0.5, -10), min(z_hi - radius * 0.5, 55)))
            if z_hi - z_lo > radius
            else (z_lo + z_hi) / 2
        )
        ix = int(np.argmin(np.abs(g.x - cx)))
        iy = int(np.argmin(np.abs(g.y - cy)))
        iz = int(np.argmin(np.abs(g.d - cz)))
        if brain_depth[iz, iy, ix] > radius * 0.8 + 6:
            break
    shape = vol.shape
    wob = smooth_noise_3d(rng, shape, 12.0 / spacing, 12.0 / step)
    p = Painter(vol, g, spacing * 0.8, wob)
    oedema_r = radius + float(rng.uniform(6, 16))
    extent = np.zeros(shape, dtype=F32)  # the abnormal region: oedema and tumour
    got = p.occupancy(
        Blob(cx, cy, cz, oedema_r, oedema_r * 1.1, oedema_r * 0.9, float(rng.uniform(0, 3))), 0.3, edge=4.0
    )
    if got is not None:
        sl, occ = got
        occ = occ * np.clip(wm[sl] * F32(1.3), F32(0), F32(1))
        vol[sl] += (F32(sig["oedema"]) - vol[sl]) * occ
        extent[sl] = occ
    tumour = Blob(
        cx,
        cy,
        cz,
        radius,
        radius * float(rng.uniform(0.8, 1.0)),
        radius * float(rng.uniform(0.8, 1.0)),
        float(rng.uniform(0, 3)),
    )
    got = p.occupancy(tumour, 0.15, edge=1.0)
    necrotic = radius > 13.0
    if got is not None:
        sl, occ = got
        occ = occ * (brain_depth[sl] > 0)
        np.maximum(extent[sl], occ, out=extent[sl])
        texture = F32(0.05) * wob[sl]
        vol[sl] += (F32(sig["rim"]) + texture - vol[sl]) * occ
        inner = Blob(cx, cy, cz, radius * 0.8, tumour.ry * 0.8, tumour.rz * 0.8, tumour.angle)
        got_in = p.occupancy(inner, 0.15, edge=1.5)
        if got_in is not None:
            sl2, occ2 = got_in
            value = sig["necrosis"] if necrotic else sig["tumour"]
            vol[sl2] += (F32(value) + F32(0.04) * wob[sl2] - vol[sl2]) * occ2 * (brain_depth[sl2] > 0)
    lesion = Lesion(
        1,
        "tumour",
        "necrotic_tumour_with_oedema" if necrotic else "tumour_with_oedema",
        {
            "centre_mm": [round(cx, 1), round(cy, 1), round(cz, 1)],
            "radius_mm": round(radius, 1),
            "oedema_radius_mm": round(oedema_r, 1),
            "side": "left" if cx > 0 else "right",
            "mask": "tumour and surrounding oedema",
        },
    )
    return lesion, extent


# ---------------------------------------------------------------------------------------------- DICOM


def mr_datasets(study: RenderedStudy, ctx: StudyContext) -> list[Dataset]:
    """DICOM datasets (MR Image IOD) of the slices, inferior first."""
    geo = study.geometry
    seq = geo["sequence"]
    description = {"T2": "AX T2 FSE", "FLAIR": "AX T2 FLAIR", "T1C": "AX T1 SE +C"}[seq]
    region = geo.get("region", "head")
    named = geo.get("region_header", True)
    series = series_info(ctx, 3, "MR", description, region.upper())
    out = []
    for k, image in enumerate(study.images):
        ds = base_dataset(ctx, series, MRImageStorage, k + 1, dt.timedelta(seconds=40 + k))
        add_frame_of_reference(ds, ctx)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.PatientPosition = "HFS"
        ds.ScanningSequence = geo["scanning_sequence"]
        ds.SequenceVariant = geo["sequence_variant"]
        ds.ScanOptions = ["FS"] if seq == "T1C" else ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = description.replace(" ", "_")
        ds.RepetitionTime = f"{geo['repetition_time_ms']:g}"
        ds.EchoTime = f"{geo['echo_time_ms']:g}"
        if geo["inversion_time_ms"] is not None:
            ds.InversionTime = f"{geo['inversion_time_ms']:g}"
        ds.EchoTrainLength = 1 if seq == "T1C" else 16
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = "63.87"
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = "1.5"
        ds.SpacingBetweenSlices = f"{geo['spacing_between_slices_mm']:g}"
        ds.FlipAngle = "90"
        ds.ReceiveCoilName = "HEAD" if region == "head" else "BODY"
        ds.TransmitCoilName = "BODY"
        ds.AcquisitionMatrix = [0, geo["columns"], geo["rows"], 0]
        ds.InPlanePhaseEncodingDirection = "ROW"
        ds.PatientPosition = "HFS"
        if seq == "T1C":
            ds.ContrastBolusAgent = "Gadolinium"
            ds.ContrastBolusRoute = "IV"
        ds.AcquisitionNumber = 1
        ds.SliceThickness = f"{geo['slice_thickness_mm']:g}"
        ds.PixelSpacing = [f"{image.pixel_spacing[0]:.6f}", f"{image.pixel_spacing[1]:.6f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in image.attributes["image_position"]]
        ds.SliceLocation = f"{image.attributes['slice_location']:.3f}"
        add_image_pixel(ds, image)
        if not named:
            del ds.BodyPartExamined
        out.append(ds)
    return out


def mr_geometry(size: int, slices: int, spacing: float, thickness: float, step: float, sequence: str) -> dict:
    """The ``geometry`` record of an axial MR phantom series: matrix, spacing and the sequence's
    timing (shared by the brain phantom and the body-region phantoms)."""
    tr, te, ti, scanning, variant = _TIMING[sequence]
    return {
        "rows": size,
        "columns": size,
        "slices": slices,
        "pixel_spacing_mm": spacing,
        "slice_thickness_mm": thickness,
        "spacing_between_slices_mm": step,
        "image_orientation": [1, 0, 0, 0, 1, 0],
        "sequence": sequence,
        "repetition_time_ms": tr,
        "echo_time_ms": te,
        "inversion_time_ms": ti,
        "scanning_sequence": scanning,
        "sequence_variant": variant,
    }
