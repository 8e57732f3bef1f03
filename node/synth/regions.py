"""Body-region phantoms beside the abdominal CT and brain MR: head, chest and pelvis CT, abdomen and
pelvis MR. They carry no lesions (label ``normal`` only): they exist so that routing can be checked
on every body region (a head CT must not reach the liver model, a body MR not the brain model).

Built like :mod:`node.synth.ct` and :mod:`node.synth.mr` (ellipsoids painted into a 3-D volume with
partial-volume edges, smooth 3-D irregularity, correlated noise), from their own seeded streams, so
the existing kinds' output is unchanged. Slices are axial; instance 1 is the most cranial (CT) or
the most inferior (MR), as in those modules.
"""

from __future__ import annotations

import math

import numpy as np

from .labels import normalise_labels
from .rendered import RenderedImage, RenderedStudy
from .texture import F32, gaussian_noise, rng_stream, smooth_noise_3d
from .volume import Blob, Grid, Painter

CT_REGIONS: tuple[str, ...] = ("abdomen", "head", "chest", "pelvis")
MR_REGIONS: tuple[str, ...] = ("head", "abdomen", "pelvis")
_INTERCEPT = -1024.0


def _labels(kind: str, label: str | tuple[str, ...] | list[str], region: str) -> tuple[str, ...]:
    labels = normalise_labels(kind, label)
    if labels != ("normal",):
        raise ValueError(f"{kind} {region} phantoms carry no lesions: use label 'normal', got {label!r}")
    return labels


def _superellipse(x: np.ndarray, y: np.ndarray, a: float, b: float, p: float = 2.3) -> np.ndarray:
    return (np.abs(x / F32(a)) ** F32(p) + np.abs(y / F32(b)) ** F32(p)) ** F32(1 / p)


def _soft(r: np.ndarray, size: float, edge: float) -> np.ndarray:
    return np.clip((F32(1.0) - r) * F32(size / edge) + F32(0.5), F32(0), F32(1))


def render_ct_region(
    seed: int,
    region: str,
    label: str | tuple[str, ...] | list[str] = "normal",
    *,
    slices: int = 40,
    size: int = 512,
    slice_thickness: float | None = None,
) -> RenderedStudy:
    """Render a head, chest or pelvis CT series (no lesions) in memory; stored = HU + 1024, int16.

    The field of view is ~240 mm for the head and ~400-460 mm for the trunk; ``slices`` and ``size``
    as in :func:`node.synth.ct.render_ct`. The region is recorded in ``geometry["region"]``.
    """
    from .ct import _add_noise, ct_geometry  # the same reconstruction-like noise as the abdominal phantom

    region = region.lower()
    if region not in ("head", "chest", "pelvis"):
        raise ValueError(f"CT region must be one of {CT_REGIONS}, got {region!r}")
    labels = _labels("ct", label, region)
    if slices < 1 or size < 32:
        raise ValueError(f"need slices >= 1 and size >= 32, got {slices}, {size}")
    acq = rng_stream(seed, f"ct-{region}/acquisition")
    thickness = float(slice_thickness or (5.0 if acq.random() < 0.6 else 2.5))
    fov = float(acq.uniform(220, 260)) if region == "head" else float(acq.uniform(400, 460))
    spacing = fov / size
    coverage = slices * thickness
    depths = (np.arange(slices, dtype=F32) + F32(0.5)) * F32(thickness) - F32(coverage / 2)
    coords = (np.arange(size, dtype=F32) + F32(0.5)) * F32(spacing) - F32(size * spacing / 2)
    grid = Grid(coords, coords, depths)
    anat = rng_stream(seed, f"ct-{region}/anatomy")
    hu = np.full((slices, size, size), -1000.0, dtype=F32)
    wobble = smooth_noise_3d(anat, hu.shape, 30.0 / spacing, 30.0 / thickness)
    painter = Painter(hu, grid, max(spacing, 0.8), wobble)
    paint = {"head": _ct_head, "chest": _ct_chest, "pelvis": _ct_pelvis}[region]
    half_axes = paint(anat, painter, grid)
    _table(anat, painter, grid, half_axes)
    _add_noise(rng_stream(seed, f"ct-{region}/noise"), hu, float(acq.uniform(6.0, 12.0)), 0.6)
    stored = np.clip(np.rint(hu - F32(_INTERCEPT)), F32(0), F32(4095)).astype(np.int16)
    window = {"head": (40.0, 80.0), "chest": (-600.0, 1500.0), "pelvis": (40.0, 400.0)}[region]
    z_top = float(acq.uniform(-20, 20))
    images = []
    x0 = float(coords[0])
    for k in range(slices):
        z = z_top - float(depths[k])
        images.append(
            RenderedImage(
                pixels=stored[k],
                mask=np.zeros((size, size), dtype=np.uint8),
                boxes=(),
                labels=("normal",),
                photometric="MONOCHROME2",
                bits_stored=16,
                rescale_slope=1.0,
                rescale_intercept=_INTERCEPT,
                window_center=window[0],
                window_width=window[1],
                pixel_spacing=(spacing, spacing),
                attributes={"image_position": [x0, x0, round(z, 3)], "slice_location": round(z, 3)},
            )
        )
    geometry = {
        **ct_geometry(size, slices, spacing, thickness, z_top - float(depths[0]), half_axes),
        "region": region,
    }
    return RenderedStudy("ct", seed, labels, images, (), geometry)


def _table(rng: np.random.Generator, p: Painter, g: Grid, half_axes: list[float]) -> None:
    """The couch (or head holder) under the patient."""
    x = g.x[None, None, :]
    y = g.y[None, :, None]
    table_y = half_axes[1] + float(rng.uniform(6, 16))
    t = np.clip(F32(1.0) - np.abs(y - F32(table_y) + F32(0.0008) * x * x) / F32(3.0), F32(0), F32(1))
    t = t * (np.abs(x) < F32(half_axes[0] * 1.3))
    p.vol += (F32(120.0) - p.vol) * t * (p.vol < F32(-900))


def _ct_head(rng: np.random.Generator, p: Painter, g: Grid) -> list[float]:
    """Scalp, skull (outer table, diploe, inner table), brain (grey/white), ventricles, falx."""
    s = float(rng.uniform(0.9, 1.06))
    ax, ay, az = 72.0 * s, 92.0 * s, 400.0
    yc = float(rng.normal(0, 3))
    for da, value, irregular in (
        (6.0, 35.0, 0.01),  # scalp
        (0.0, 1200.0, 0.005),  # outer table
        (-2.0, 550.0, 0.005),  # diploe
        (-4.5, 1150.0, 0.005),  # inner table
        (-6.5, 38.0, 0.0),  # grey matter
        (-14.0, 28.0, 0.02),  # white matter
    ):
        p.paint(Blob(0.0, yc, 0.0, ax + da, ay + da, az + da), value, irregular)
    for side in (-1, 1):
        p.paint(Blob(9.0 * side, yc - 4.0, 0.0, 6.0, 26.0, 400, -0.1 * side), 6.0, 0.05)  # lateral ventricles
        p.paint(Blob(18.0 * side, yc + 6.0, 0.0, 9.0, 18.0, 400, 0.25 * side), 36.0)  # basal ganglia
    p.paint(Blob(0.0, yc - ay * 0.55, 0.0, 1.2, ay * 0.4, 400), 75.0)  # falx, anterior
    p.paint(Blob(0.0, yc + ay * 0.6, 0.0, 1.2, ay * 0.32, 400), 75.0)  # falx, posterior
    return [round(ax + 6.0, 1), round(ay + 6.0 + yc, 1)]


def _body_wall(rng: np.random.Generator, p: Painter, g: Grid, a: float, b: float, yc: float) -> np.ndarray:
    """Fat, muscle wall and cavity fat of a trunk cross-section; returns the cavity occupancy."""
    x = g.x[None, None, :]
    y = g.y[None, :, None] - F32(yc)
    fat = float(rng.uniform(10, 28))
    muscle = float(rng.uniform(8, 16))
    cavity = None
    for half_a, half_b, value in (
        (a, b, -100.0),
        (a - fat, b - fat * 0.7, 45.0),
        (a - fat - muscle, b - fat * 0.7 - muscle, -90.0),
    ):
        occ = _soft(_superellipse(x, y, half_a, half_b), min(half_a, half_b), 0.8)
        p.vol += (F32(value) - p.vol) * occ
        cavity = occ
    assert cavity is not None
    return np.broadcast_to(cavity, p.vol.shape)


def _vertebra(p: Painter, cy: float) -> None:
    p.paint(Blob(0.0, cy, 0.0, 20.0, 16.0, 1000), 600.0)
    p.paint(Blob(0.0, cy, 0.0, 18.0, 14.0, 1000), 230.0)
    p.paint(Blob(0.0, cy + 30.0, 0.0, 12.0, 9.0, 1000), 500.0)  # neural arch
    p.paint(Blob(0.0, cy + 27.0, 0.0, 7.5, 7.0, 1000), 15.0)  # spinal canal


def _ct_chest(rng: np.random.Generator, p: Painter, g: Grid) -> list[float]:
    """Body wall, two lungs with vessels, heart and great vessels, spine, rib ring, scapulae."""
    a, b = float(rng.uniform(145, 180)), float(rng.uniform(100, 125))
    yc = float(rng.uniform(-5, 8))
    cavity = _body_wall(rng, p, g, a, b, yc)
    inner_a, inner_b = a - 35.0, b - 30.0
    lungs = []
    for side in (-1, 1):
        lung = Blob(
            side * inner_a * 0.5, yc + float(rng.normal(0, 3)), 0.0, inner_a * 0.46, inner_b * 0.85, 300
        )
        got = p.paint(lung, float(rng.uniform(-880, -820)), irregular=0.04, within=cavity)
        if got is not None:
            lungs.append(got)
    for sl, occ in lungs:  # pulmonary vessels: sparse bright dots and branches
        n = smooth_noise_3d(rng, occ.shape, 6.0 / float(abs(g.x[1] - g.x[0])), 2.0)
        vessels = np.clip((n - F32(1.6)) * F32(3.0), F32(0), F32(1)) * (occ > F32(0.9))
        p.vol[sl] += (F32(40.0) - p.vol[sl]) * vessels
    p.paint(
        Blob(inner_a * 0.12, yc - inner_b * 0.2, 0.0, inner_a * 0.36, inner_b * 0.45, 300, 0.4), 40.0
    )  # heart
    p.paint(Blob(inner_a * 0.05, yc + inner_b * 0.35, 0.0, 12.0, 12.0, 1000), 45.0)  # descending aorta
    _vertebra(p, yc + b * 0.62)
    ra, rb = a - 22.0, b - 18.0
    for ang in np.linspace(-2.7, 2.7, 13):  # rib sections all around the chest wall
        if abs(ang) < 0.35:
            continue
        p.paint(Blob(ra * math.sin(ang), yc - rb * math.cos(ang), 0.0, 7.0, 4.5, 1000, ang), 450.0)
    for side in (-1, 1):
        p.paint(Blob(side * a * 0.55, yc + b * 0.72, 0.0, 40.0, 5.0, 1000, side * 0.5), 500.0)  # scapulae
    return [round(a, 1), round(b + yc, 1)]


def _ct_pelvis(rng: np.random.Generator, p: Painter, g: Grid) -> list[float]:
    """Body wall, iliac wings with iliacus and gluteal muscles, sacrum, bladder, rectum, bowel."""
    a, b = float(rng.uniform(155, 185)), float(rng.uniform(100, 125))
    yc = float(rng.uniform(-5, 8))
    cavity = _body_wall(rng, p, g, a, b, yc)
    for side in (-1, 1):
        wing = Blob(side * a * 0.5, yc + b * 0.2, 0.0, 9.0, 52.0, 1000, -side * 0.55)
        p.paint(Blob(wing.cx, wing.cy + 8.0, 0.0, 30.0, 55.0, 1000, wing.angle), 50.0)  # gluteal muscles
        p.paint(
            Blob(wing.cx - side * 18.0, wing.cy - 6.0, 0.0, 16.0, 40.0, 1000, wing.angle), 48.0
        )  # iliacus
        p.paint(wing, 650.0)
        p.paint(Blob(wing.cx, wing.cy, 0.0, 5.0, 47.0, 1000, wing.angle), 260.0)  # marrow
    p.paint(Blob(0.0, yc + b * 0.62, 0.0, 42.0, 16.0, 1000), 420.0)  # sacrum
    p.paint(
        Blob(0.0, yc - b * 0.35, 0.0, float(rng.uniform(35, 55)), float(rng.uniform(25, 40)), 300),
        8.0,
        within=cavity,
    )  # bladder
    p.paint(Blob(0.0, yc + b * 0.3, 0.0, 14.0, 12.0, 300), 40.0, within=cavity)  # rectum
    for _ in range(int(rng.integers(4, 9))):
        r = float(rng.uniform(8, 14))
        loop = Blob(
            float(rng.uniform(-0.5, 0.5)) * a,
            yc + float(rng.uniform(-0.6, 0.1)) * b,
            float(rng.uniform(-40, 40)),
            r,
            r,
            float(rng.uniform(15, 40)),
        )
        p.paint(loop, 50.0, within=cavity, only_below=-50.0)
    return [round(a, 1), round(b + yc, 1)]


# -------------------------------------------------------------------------------------------------- MR

_MR_SIGNAL: dict[str, dict[str, float]] = {  # relative signal per tissue; T1C reads as fat-bright T1
    "T2": dict(
        fat=0.75,
        muscle=0.22,
        liver=0.28,
        spleen=0.55,
        kidney=0.6,
        fluid=1.0,
        bone=0.03,
        marrow=0.45,
        bowel=0.4,
    ),
    "FLAIR": dict(
        fat=0.65, muscle=0.25, liver=0.3, spleen=0.5, kidney=0.5, fluid=0.1, bone=0.03, marrow=0.4, bowel=0.35
    ),
    "T1C": dict(
        fat=0.9,
        muscle=0.35,
        liver=0.6,
        spleen=0.5,
        kidney=0.7,
        fluid=0.12,
        bone=0.03,
        marrow=0.75,
        bowel=0.45,
    ),
}


def render_mr_body(
    seed: int,
    region: str,
    label: str | tuple[str, ...] | list[str] = "normal",
    *,
    slices: int = 24,
    size: int = 256,
    sequence: str | None = None,
) -> RenderedStudy:
    """Render an axial abdomen or pelvis MR series (no lesions): body wall, organs, spine or pelvic
    bones, coil bias and Rician noise; uint16 images, inferior first; ~400-440 mm field of view."""
    from .mr import SEQUENCES, SLICE_GAP, mr_geometry

    region = region.lower()
    if region not in ("abdomen", "pelvis"):
        raise ValueError(f"MR region must be one of {MR_REGIONS}, got {region!r}")
    labels = _labels("mr", label, region)
    if slices < 1 or size < 32:
        raise ValueError(f"need slices >= 1 and size >= 32, got {slices}, {size}")
    acq = rng_stream(seed, f"mr-{region}/acquisition")
    choice = SEQUENCES[int(acq.integers(len(SEQUENCES)))]
    sequence = (sequence or choice).upper()
    if sequence not in _MR_SIGNAL:
        raise ValueError(f"sequence must be one of {SEQUENCES}, got {sequence!r}")
    sig = _MR_SIGNAL[sequence]
    spacing = float(acq.uniform(400, 440)) / size
    thickness, step = 5.0, 5.0 + SLICE_GAP
    gain = float(acq.uniform(1800, 3200))
    noise_sigma = float(acq.uniform(0.012, 0.025))
    z = (np.arange(slices, dtype=F32) - F32((slices - 1) / 2)) * F32(step)
    coords = (np.arange(size, dtype=F32) + F32(0.5)) * F32(spacing) - F32(size * spacing / 2)
    grid = Grid(coords, coords, z)
    shape = (slices, size, size)
    anat = rng_stream(seed, f"mr-{region}/anatomy")
    vol = np.zeros(shape, dtype=F32)
    p = Painter(vol, grid, spacing * 0.8, smooth_noise_3d(anat, shape, 30.0 / spacing, 30.0 / step))
    a, b = float(anat.uniform(150, 185)), float(anat.uniform(100, 125))
    yc = float(anat.uniform(-5, 8))
    x = grid.x[None, None, :]
    y = grid.y[None, :, None] - F32(yc)
    fat = float(anat.uniform(10, 28))
    for half_a, half_b, name in (
        (a, b, "fat"),
        (a - fat, b - fat * 0.7, "muscle"),
        (a - fat - 12, b - fat * 0.7 - 12, "fat"),
    ):
        occ = _soft(_superellipse(x, y, half_a, half_b), min(half_a, half_b), spacing)
        vol += (F32(sig[name]) - vol) * occ
    if region == "abdomen":
        p.paint(Blob(-a * 0.42, yc - 5.0, 0.0, a * 0.42, b * 0.6, 300, 0.2), sig["liver"], 0.05)
        p.paint(Blob(a * 0.55, yc + b * 0.3, 0.0, 25.0, 45.0, 300, 0.6), sig["spleen"], 0.05)
        for side in (-1, 1):
            p.paint(Blob(side * a * 0.4, yc + b * 0.4, 0.0, 22.0, 30.0, 300, 0.5 * side), sig["kidney"])
        _mr_vertebra(p, sig, yc + b * 0.55)
    else:
        for side in (-1, 1):
            wing = Blob(side * a * 0.5, yc + b * 0.2, 0.0, 9.0, 52.0, 1000, -side * 0.55)
            p.paint(Blob(wing.cx, wing.cy + 8.0, 0.0, 30.0, 55.0, 1000, wing.angle), sig["muscle"])
            p.paint(wing, sig["bone"])
            p.paint(Blob(wing.cx, wing.cy, 0.0, 5.0, 47.0, 1000, wing.angle), sig["marrow"])
        p.paint(Blob(0.0, yc + b * 0.62, 0.0, 42.0, 16.0, 1000), sig["marrow"])
        p.paint(Blob(0.0, yc - b * 0.35, 0.0, 45.0, 32.0, 300), sig["fluid"])  # bladder
    for _ in range(int(anat.integers(4, 9))):
        r = float(anat.uniform(8, 14))
        p.paint(
            Blob(
                float(anat.uniform(-0.4, 0.4)) * a,
                yc + float(anat.uniform(-0.6, 0.0)) * b,
                float(anat.uniform(-40, 40)),
                r,
                r,
                30.0,
            ),
            sig["bowel"],
        )
    bias = F32(1.0) + F32(0.12) * smooth_noise_3d(anat, shape, 120.0 / spacing, 90.0 / step)
    vol *= bias
    noise = rng_stream(seed, f"mr-{region}/noise")
    n1, n2 = gaussian_noise(noise, shape), gaussian_noise(noise, shape)
    vol = np.sqrt((vol + F32(noise_sigma) * n1) ** 2 + (F32(noise_sigma) * n2) ** 2)
    stored = np.clip(np.rint(vol * F32(gain)), F32(0), F32(65535)).astype(np.uint16)
    hi = float(np.percentile(stored[:, ::4, ::4], 99.5))
    images = []
    x0 = float(coords[0])
    for k in range(slices):
        images.append(
            RenderedImage(
                pixels=stored[k],
                mask=np.zeros((size, size), dtype=np.uint8),
                boxes=(),
                labels=("normal",),
                photometric="MONOCHROME2",
                bits_stored=16,
                rescale_slope=1.0,
                rescale_intercept=0.0,
                window_center=round(hi / 2, 1),
                window_width=round(max(hi, 1.0), 1),
                pixel_spacing=(spacing, spacing),
                attributes={
                    "image_position": [x0, x0, round(float(z[k]), 3)],
                    "slice_location": round(float(z[k]), 3),
                },
            )
        )
    geometry = {**mr_geometry(size, slices, spacing, thickness, step, sequence), "region": region}
    return RenderedStudy("mr", seed, labels, images, (), geometry)


def _mr_vertebra(p: Painter, sig: dict[str, float], cy: float) -> None:
    p.paint(Blob(0.0, cy, 0.0, 20.0, 16.0, 1000), sig["bone"])
    p.paint(Blob(0.0, cy, 0.0, 18.0, 14.0, 1000), sig["marrow"])
    p.paint(Blob(0.0, cy + 27.0, 0.0, 7.5, 7.0, 1000), sig["fluid"])  # spinal canal (CSF)
