"""The faster heatmap output stage (issue 16) gives what the code it replaces gives.

A source-sized map (2140 x 1760 for a 10 MB radiograph) went through two full labellings and
four full-size temporaries in ``find_hotspot`` (~55 ms a label) and through a full-size copy and
clip plus six SC-sized temporaries in ``render_overlay`` (~125 ms). Now the flat top and the
region are flood-filled from the peak and traced in their box, the copy and the clip are skipped
where they change nothing, and the blend runs in place. Each is checked here against the code it
replaces (kept below as the reference), on maps made to be awkward: flat tops, plateaus of patch
maps, regions that touch the edges or have holes, several components, nothing positive.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from node.errors import InferenceError
from node.inference import explain as ex
from node.outputs import sc
from node.types import Geometry, Heatmap, Hotspot, LabelScore
from tests.outputs.fabricate import algorithm


def _reference_hotspot(values: np.ndarray, rel_threshold: float = 0.5) -> Hotspot | None:
    """find_hotspot before issue 16: every step over the whole map."""
    m = np.asarray(values, dtype=np.float32)
    flat = int(np.argmax(m))
    peak = float(m.flat[flat])
    if not np.isfinite(peak) or peak <= 0:
        return None
    r, c = divmod(flat, m.shape[1])
    _, tops = cv2.connectedComponents((m >= peak).astype(np.uint8), connectivity=8)
    ys, xs = np.nonzero(tops == tops[r, c])
    if ys.size > 1:
        k = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
        r, c = int(ys[k]), int(xs[k])
    mask = (m >= rel_threshold * peak).astype(np.uint8)
    _, labels = cv2.connectedComponents(mask, connectivity=8)
    region = (labels == labels[r, c]).astype(np.uint8)
    rows = np.flatnonzero(region.any(axis=1))
    cols = np.flatnonzero(region.any(axis=0))
    box = (int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1]))
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygon: tuple[tuple[float, float], ...] = ()
    if contours:
        largest = max(contours, key=cv2.contourArea)
        polygon = tuple((float(p[0][1]), float(p[0][0])) for p in largest)
    return Hotspot(peak_row=int(r), peak_col=int(c), peak_value=peak, box=box, polygon=polygon)


def _awkward_map(rng: np.random.Generator, kind: int) -> np.ndarray:
    h, w = int(rng.integers(1, 90)), int(rng.integers(1, 90))
    if kind == 0:  # noise: many small components
        return rng.random((h, w)).astype(np.float32)
    if kind == 1:  # a CAM: a coarse grid upsampled, flat where edges are replicated
        return cv2.resize(rng.random((3, 4)).astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    if kind == 2:  # a patch map: constant blocks, flat tops of many pixels
        k = int(rng.integers(1, 8))
        blocks = rng.integers(0, 4, ((h + k - 1) // k, (w + k - 1) // k))
        return np.kron(blocks, np.ones((k, k)))[:h, :w].astype(np.float32)
    if kind == 3:  # mostly negative: few positive pixels, or none
        return (rng.random((h, w)) - rng.choice([0.9, 1.5])).astype(np.float32)
    yy, xx = np.mgrid[:h, :w]  # rings: regions with holes, touching the edges
    d = np.hypot(yy - rng.integers(0, h), xx - rng.integers(0, w))
    return np.cos(d / (1 + rng.random() * 5)).astype(np.float32)


@pytest.mark.parametrize("kind", range(5))
def test_find_hotspot_is_the_whole_map_labelling(kind: int) -> None:
    rng = np.random.default_rng(kind)
    for _ in range(80):
        m = _awkward_map(rng, kind)
        for threshold in (0.5, 1e-6, 0.9, 1.0):
            assert ex.find_hotspot(m, threshold) == _reference_hotspot(m, threshold)


def test_find_hotspot_on_a_source_sized_cam() -> None:
    m = cv2.resize(np.random.default_rng(5).random((7, 7)).astype(np.float32), (1760, 2140))
    before = m.copy()
    spot = ex.find_hotspot(m, 0.5)
    assert spot is not None and spot == _reference_hotspot(m, 0.5)
    assert np.array_equal(m, before)  # the map itself is not written


@pytest.mark.parametrize("method", ["relu_max", "minmax"])
def test_normalize_map_in_place_is_the_same_division(method: str) -> None:
    rng = np.random.default_rng(9)
    for kind in range(5):
        m = _awkward_map(rng, kind) * np.float32(rng.choice([1.0, 37.5, 1e-3]))
        before = m.copy()
        got = ex.normalize_map(m, method)  # type: ignore[arg-type]
        m64 = before.astype(np.float32)
        if method == "relu_max":
            r = np.maximum(m64, 0.0)
            top = float(r.max())
            want = r / top if top > 0 else np.zeros_like(r)
        else:
            lo, hi = float(m64.min()), float(m64.max())
            want = (m64 - lo) / (hi - lo) if hi > lo else np.zeros_like(m64)
        assert got.dtype == np.float32 and np.array_equal(got, want)
        assert np.array_equal(m, before)


@pytest.mark.parametrize("method", ["relu_max", "minmax"])
def test_normalize_map_in_place_writes_the_same_values_into_the_map(method: str) -> None:
    rng = np.random.default_rng(13)
    for kind in range(5):
        m = _awkward_map(rng, kind)
        want = ex.normalize_map(m, method)  # type: ignore[arg-type]
        got = ex.normalize_map(m, method, in_place=True)  # type: ignore[arg-type]
        assert got is m and np.array_equal(got, want)
        doubles = _awkward_map(rng, kind).astype(np.float64)  # converted: a new array, the input kept
        before = doubles.copy()
        assert np.array_equal(
            ex.normalize_map(doubles, method, in_place=True), ex.normalize_map(before, method)
        )  # type: ignore[arg-type]
        assert np.array_equal(doubles, before)


def _old_normalize(values: np.ndarray) -> np.ndarray:
    """normalize_map("relu_max") as it was: a new array for the ReLU, zeros_like for a flat map."""
    m = np.maximum(np.asarray(values, dtype=np.float32), 0.0)
    top = float(m.max()) if m.size else 0.0
    return m / top if top > 0 else np.zeros_like(m)


GEOMETRIES = [
    Geometry(
        (2140, 1760), (224, 224), 224 / 2140, 224 / 2140, 0.0, (224 - 1760 * 224 / 2140) / 2
    ),  # letterbox
    Geometry((512, 512), (128, 128), 0.25, 0.25),
    Geometry((97, 301), (64, 64), 64 / 97, 64 / 301),  # stretched
]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_source_maps_are_the_stacked_maps_of_before(geometry: Geometry) -> None:
    """cam_to_source and the patch and occlusion maps now warp each map into its plane of one
    array and finish it there: the same values as a warp, a new normalised array and np.stack."""
    rng = np.random.default_rng(21)
    cam = (rng.random((3, 7, 7)) - 0.3).astype(np.float32)
    cam[2] = -1.0  # nothing positive: zeros
    for normalize in ("relu_max", "minmax"):
        old = np.stack(
            [
                ex.normalize_map(ex.map_to_source(cam[i], geometry), normalize)  # type: ignore[arg-type]
                for i in (2, 0, 1)
            ]
        )
        got = ex.cam_to_source(cam[np.newaxis], geometry, [2, 0, 1], normalize)  # type: ignore[arg-type]
        assert got.dtype == np.float32 and got.flags.c_contiguous and np.array_equal(got, old)
    relu = np.stack([_old_normalize(ex.map_to_source(cam[i], geometry)) for i in range(3)])
    assert np.array_equal(ex.cam_to_source(cam, geometry, range(3)), relu)
    maps = [rng.random(geometry.model_shape).astype(np.float32) * 1.3 - 0.1 for _ in range(2)]
    clipped = np.stack([np.clip(ex.map_to_source(m, geometry), 0, 1) for m in maps])
    assert np.array_equal(ex._source_maps(maps, geometry, lambda m: np.clip(m, 0, 1, out=m)), clipped)
    # a finish that returns a new array is copied into the plane
    assert np.array_equal(ex._source_maps(maps, geometry, lambda m: np.clip(m, 0, 1)), clipped)


def test_map_to_source_into_a_wrong_array_is_refused() -> None:
    geometry = GEOMETRIES[1]
    ex.map_to_source(np.ones((7, 7), np.float32), geometry, out=np.empty((512, 512), np.float32))
    for out in (
        np.empty((512, 511), np.float32),
        np.empty((512, 512)),
        np.empty((512, 1024), np.float32)[:, ::2],
    ):
        with pytest.raises(InferenceError, match="map_to_source: out must be C-contiguous float32"):
            ex.map_to_source(np.ones((7, 7), np.float32), geometry, out=out)


def _reference_picture(display: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The picture render_overlay blends before the legend and text (its code before issue 16)."""
    grey = display.astype(np.uint8)
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    rows, cols = grey.shape[:2]
    if values.shape != grey.shape[:2]:
        values = cv2.resize(values, (cols, rows), interpolation=cv2.INTER_LINEAR)
    values = np.clip(values, 0.0, 1.0)
    long_side = max(rows, cols)
    scale = 1.0
    if long_side > sc.MAX_SIDE:
        scale = sc.MAX_SIDE / long_side
    elif long_side < sc.MIN_SIDE:
        scale = sc.MIN_SIDE / long_side
    height, width = max(round(rows * scale), 1), max(round(cols * scale), 1)
    if scale != 1.0:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        grey = cv2.resize(grey, (width, height), interpolation=interp)
        values = cv2.resize(values, (width, height), interpolation=interp)
    base = (grey if grey.ndim == 3 else cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)).astype(np.float32)
    bgr = cv2.applyColorMap(np.round(values * 255).astype(np.uint8), sc.COLORMAP)
    colour = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = (sc.ALPHA * np.clip((values - sc.LOW) / (sc.HIGH - sc.LOW), 0.0, 1.0))[..., None]
    return np.clip(base * (1.0 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "shape, colour, span, special",
    [
        ((2140, 1760), False, 1.0, None),  # a radiograph: reduced to 1024
        ((700, 1300), True, 1.0, None),  # a photograph
        ((300, 260), False, 1.4, None),  # enlarged; values above 1 are clipped
        ((900, 800), False, 1.0, "nan"),  # a NaN becomes 0
        ((640, 512), False, 1.0, "inf"),
        ((512, 512), False, 1.0, "coarse"),  # a 9 x 9 map, resized to the display
        ((600, 500), False, 1.0, "negative"),
    ],
)
def test_render_overlay_blends_as_before(shape, colour, span, special) -> None:
    rng = np.random.default_rng(shape[0])
    display = rng.integers(0, 256, (*shape, 3) if colour else shape, dtype=np.uint8)
    size = (9, 9) if special == "coarse" else shape
    values = cv2.resize(rng.random((5, 5)).astype(np.float32), (size[1], size[0])) * np.float32(span)
    if special == "nan":
        values[3, 4] = np.nan
    elif special == "inf":
        values[5, 6] = np.inf
    elif special == "negative":
        values -= np.float32(0.3)
    before = values.copy()
    score = LabelScore(label="x", code=None, probability=0.2, threshold=0.5, positive=False, triage=False)  # type: ignore[arg-type]
    picture, _ = sc.render_overlay(display, Heatmap("x", values, "cam"), score, algorithm())
    want = _reference_picture(display, values)
    assert np.array_equal(picture[: want.shape[0], : want.shape[1]], want)
    assert np.array_equal(values, before, equal_nan=True)  # the heatmap is only read
