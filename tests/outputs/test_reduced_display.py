"""The display is reduced where it is made (issue 16 item 1: preparation cost), and what is drawn
from it is bit for bit what was drawn from the full display.

The preparation keeps a display whose long side is over ``MAX_SIDE`` at its drawn size
(``drawn_display``: the renderer's own ``cv2.INTER_AREA`` resize, done once in the child) with the
full (rows, cols) beside it; ``render_overlay`` given the full size skips that resize and resizes
the heatmap as before. The reference is the renderer as it was (kept below) on the full display:
chest radiographs (MONOCHROME2 and MONOCHROME1, odd sizes, landscape), mammograms, a colour
photograph, an image under ``MIN_SIDE`` (enlarged) and one between the bounds (not resized);
heatmaps at the source's size and at a model's feature size; through ``build_heatmap_scs``, the
preparation pool (``PreparePool``: display and full size back from the child, a ``DisplaySpec``
too) and a whole analysis of the chest model.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.display_size import MAX_SIDE, MIN_SIDE, drawn_size, reduce_display
from node.inference.decode import decode
from node.inference.isolate import PreparePool
from node.inference.prepared import DisplaySpec, PrepareSpec, display_image, drawn_display, prepare_items
from node.inference.registry import load_registry
from node.inference.runtime import CPU, RuntimeConfig, create_session
from node.outputs import OutputError
from node.outputs import sc as sc_module
from node.outputs.sc import build_heatmap_scs, render_overlay
from node.runner.analyse import Stopwatch, analyse
from node.synth import generate_study
from node.types import AlgorithmIdentity, AnalysisResult, Code, Heatmap, LabelScore
from tests.colour import colour_dataset, picture
from tests.outputs.fabricate import IDENTITY, Spot, make_result, score

REPO = Path(__file__).resolve().parents[2]
FINDING = Code("233604007", "SCT", "Pneumonia")


def old_render_overlay(
    display: np.ndarray, heatmap: Heatmap, score: LabelScore | None, algorithm: AlgorithmIdentity
) -> tuple[np.ndarray, float]:
    """``render_overlay`` before the display was reduced in the preparation: the reference."""
    grey = np.asarray(display).astype(np.uint8, copy=False)
    values: np.ndarray = np.nan_to_num(np.asarray(heatmap.values, dtype=np.float32), nan=0.0)
    rows, cols = grey.shape[:2]
    if values.shape != grey.shape[:2]:
        values = cv2.resize(values, (cols, rows), interpolation=cv2.INTER_LINEAR)
    values = np.clip(values, 0.0, 1.0)
    long_side = max(rows, cols)
    scale = 1.0
    if long_side > 1024:
        scale = 1024 / long_side
    elif long_side < 512:
        scale = 512 / long_side
    height, width = max(round(rows * scale), 1), max(round(cols * scale), 1)
    if scale != 1.0:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        grey = cv2.resize(grey, (width, height), interpolation=interp)
        values = cv2.resize(values, (width, height), interpolation=interp)
    base = (grey if grey.ndim == 3 else cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)).astype(np.float32)
    colour = sc_module._colormap(values)
    alpha = (
        sc_module.ALPHA * np.clip((values - sc_module.LOW) / (sc_module.HIGH - sc_module.LOW), 0.0, 1.0)
    )[..., None]
    picture = np.clip(base * (1.0 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)
    if (
        score is not None
        and score.positive
        and heatmap.hotspot is not None
        and len(heatmap.hotspot.polygon) >= 3
    ):
        pts = np.array([[(c + 0.5) * scale, (r + 0.5) * scale] for r, c in heatmap.hotspot.polygon])
        thickness = max(1, round(width / 400))
        cv2.polylines(picture, [np.round(pts).astype(np.int32)], True, (0, 255, 255), thickness, cv2.LINE_AA)
    picture = sc_module._add_legend(picture)
    return sc_module._add_text_band(picture, heatmap, score, algorithm), scale


def _first(kind: str, out: Path, count: int = 1, **options: object) -> list[Dataset]:
    generate_study(kind, out, seed=2, write_masks=False, **options)
    return [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))[:count]]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Dataset]]:
    tmp = tmp_path_factory.mktemp("reduced-display")
    photo = cv2.resize(picture("fundus"), (1501, 1237), interpolation=cv2.INTER_LINEAR)
    return {
        "cxr": _first("cxr", tmp / "cxr", photometric="MONOCHROME2"),
        "cxr-mono1": _first("cxr", tmp / "cxr1", photometric="MONOCHROME1"),
        "cxr-odd": _first("cxr", tmp / "odd", rows=2141, cols=1759),
        "cxr-landscape": _first("cxr", tmp / "land", rows=1203, cols=1907),
        "mammo": _first("mammo", tmp / "mammo", 2, scale=0.5),
        "mammo-mono1": _first("mammo", tmp / "mammo1", 1, scale=0.4, photometric="MONOCHROME1"),
        "colour": [colour_dataset("fundus", pixels=photo)],
        "small": _first("cxr", tmp / "small", rows=431, cols=353),  # enlarged to 512
        "between": _first("cxr", tmp / "between", rows=860, cols=707),  # drawn as it is
    }


def _result(ds: Dataset, kept: np.ndarray, shape: tuple[int, int] | None) -> AnalysisResult:
    """A positive finding on ``ds`` with two heatmaps (one at the source's size with a hotspot,
    one at a 7 x 7 feature size), drawn on ``kept`` (full size ``shape``)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    spot = Spot(0, "pneumonia", rows // 3, cols // 2, max(rows, cols) / 12)
    result = make_result([ds], [score("pneumonia", FINDING, 0.8)], [spot])
    image = result.images[0]
    coarse = np.random.default_rng(4).random((7, 7)).astype(np.float32)
    full_map = image.heatmaps[0]
    small_map = Heatmap("pneumonia", coarse, "gradcam", full_map.hotspot)
    image = dataclasses.replace(image, display=kept, display_shape=shape, heatmaps=(full_map, small_map))
    return dataclasses.replace(result, images=(image,))


NAMES = ["cxr", "cxr-mono1", "cxr-odd", "cxr-landscape", "mammo", "mammo-mono1", "colour", "small", "between"]


@pytest.mark.parametrize("name", NAMES)
def test_drawn_from_the_reduced_display_is_what_the_full_one_gave(
    sources: dict[str, list[Dataset]], name: str
) -> None:
    for ds in sources[name]:
        full = display_image(decode(ds))
        kept, shape = drawn_display(decode(ds))
        rows, cols = full.shape[:2]
        assert shape == (rows, cols) == (int(ds.Rows), int(ds.Columns))
        scale, height, width = drawn_size(rows, cols)
        if max(rows, cols) > MAX_SIDE:
            assert kept.shape[:2] == (height, width) and kept.shape[2:] == full.shape[2:]
            assert kept.nbytes < full.nbytes
        else:
            assert kept is full or np.array_equal(kept, full), "not reduced"
            assert kept.shape == full.shape
        if name == "colour":
            assert kept.ndim == 3
        if name == "small":
            assert scale == MIN_SIDE / max(rows, cols)
        if name == "between":
            assert scale == 1.0
        result = _result(ds, kept, shape)
        image = result.images[0]
        for heatmap in image.heatmaps:
            s = image.scores[0]
            assert s.positive
            want, want_scale = old_render_overlay(full, heatmap, s, result.algorithm)
            got, got_scale = render_overlay(kept, heatmap, s, result.algorithm, full_shape=shape)
            assert got_scale == want_scale
            assert got.dtype == want.dtype and got.shape == want.shape
            assert np.array_equal(got, want), f"{name}: {np.count_nonzero(got != want)} pixels differ"
            # the full display, with or without its size, draws what it drew
            same, _ = render_overlay(full, heatmap, s, result.algorithm, full_shape=shape)
            assert np.array_equal(same, want)
            assert np.array_equal(render_overlay(full, heatmap, s, result.algorithm)[0], want)
        # and the secondary captures: the same pixel data and derivation as from the full display
        source = {str(ds.SOPInstanceUID): ds}
        new = build_heatmap_scs(result, source, IDENTITY)
        old_result = dataclasses.replace(
            result, images=(dataclasses.replace(image, display=full, display_shape=None),)
        )
        old = build_heatmap_scs(old_result, source, IDENTITY)
        assert len(new) == len(old) == len(image.heatmaps) == 2  # both maps of a positive label
        for a, b, heatmap in zip(new, old, image.heatmaps, strict=True):
            assert a.PixelData == b.PixelData
            assert (a.Rows, a.Columns) == (b.Rows, b.Columns)
            assert a.DerivationDescription == b.DerivationDescription
            want, _ = old_render_overlay(full, heatmap, image.scores[0], result.algorithm)
            assert a.PixelData == want.tobytes()


def test_a_display_neither_full_nor_drawn_is_refused(sources: dict[str, list[Dataset]]) -> None:
    (ds,) = sources["cxr"]
    full = display_image(decode(ds))
    result = _result(ds, full, full.shape[:2])
    image = result.images[0]
    half = full[::2, ::2]
    with pytest.raises(OutputError, match="neither its full size"):
        render_overlay(half, image.heatmaps[0], image.scores[0], result.algorithm, full_shape=full.shape[:2])
    (small,) = sources["small"]
    shown = display_image(decode(small))
    enlarged = cv2.resize(shown, (512, 419))
    with pytest.raises(OutputError):  # a small display is enlarged only when drawn
        render_overlay(enlarged, image.heatmaps[0], None, result.algorithm, full_shape=shown.shape[:2])


def test_reduce_display_keeps_what_is_not_over_the_bound() -> None:
    edge = np.zeros((MAX_SIDE, 700), np.uint8)
    assert reduce_display(edge) is edge
    over = np.zeros((MAX_SIDE + 1, 700, 3), np.uint8)
    assert reduce_display(over).shape == (MAX_SIDE, round(700 * MAX_SIDE / (MAX_SIDE + 1)), 3)


@pytest.fixture(scope="module")
def chest_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("reduced-pool")
    generate_study("cxr", tmp / "a", seed=5, write_masks=False, photometric="MONOCHROME1")
    generate_study("cxr", tmp / "b", seed=6, write_masks=False, rows=2141, cols=1759)
    generate_study("cxr", tmp / "c", seed=7, write_masks=False, rows=860, cols=707)
    return sorted(tmp.rglob("*.dcm"))


@pytest.fixture(scope="module")
def registry():  # noqa: ANN201
    return load_registry(REPO / "models" / "onnx")


@pytest.fixture(scope="module")
def pool():  # noqa: ANN201
    out = PreparePool(2, 1024, 120)
    yield out
    out.close()


def test_the_pool_hands_back_the_reduced_display_and_the_full_size(pool, registry, chest_files) -> None:  # noqa: ANN001
    manifest = registry.get("cxr").manifest
    frames = pool.submit(chest_files, PrepareSpec(manifest))
    here = prepare_items(chest_files, PrepareSpec(manifest))
    assert len(frames) == len(here) == len(chest_files)
    for path, a, b in zip(chest_files, frames, here, strict=True):
        want, shape = drawn_display(decode(pydicom.dcmread(path)))
        assert a.display_shape == b.display_shape == shape == (a.header.rows, a.header.cols)
        assert a.display is not None and np.array_equal(a.display, want) and np.array_equal(b.display, want)
        assert a.display.shape[:2] == (drawn_size(*shape)[1:] if max(shape) > MAX_SIDE else shape)
    lean = pool.submit(chest_files, PrepareSpec(manifest, keep_display=False))
    assert all(f.display is None and f.display_shape is None for f in lean)
    again = pool.submit(chest_files, DisplaySpec(tuple((0,) for _ in chest_files)))
    for a, b in zip(again, frames, strict=True):
        assert a.display_shape == b.display_shape and np.array_equal(a.display, b.display)
        assert a.model_input is None


def test_an_analysis_draws_what_the_full_display_drew(pool, registry, chest_files) -> None:  # noqa: ANN001
    model = registry.get("cxr")
    session = create_session(model, RuntimeConfig(providers=(CPU,), max_batch=4))
    files = chest_files[:2]  # both over MAX_SIDE
    watch = Stopwatch(deadline=time.monotonic() + 600)
    result, sources = analyse(model, session, files, level="study", uid_seed="x", watch=watch, preparer=pool)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    full_by_uid = {}
    for path in files:
        ds = pydicom.dcmread(path)
        full_by_uid[str(ds.SOPInstanceUID)] = display_image(decode(ds))
    assert len(result.images) == len(files)
    for image in result.images:
        full = full_by_uid[image.sop_instance_uid]
        assert image.display_shape == full.shape[:2]
        assert image.display is not None and image.display.shape[:2] == drawn_size(*full.shape[:2])[1:]
    new = build_heatmap_scs(result, by_uid, IDENTITY)
    old_images = tuple(
        dataclasses.replace(im, display=full_by_uid[im.sop_instance_uid], display_shape=None)
        for im in result.images
    )
    old = build_heatmap_scs(dataclasses.replace(result, images=old_images), by_uid, IDENTITY)
    assert new and len(new) == len(old)
    for a, b in zip(new, old, strict=True):
        assert a.PixelData == b.PixelData
        assert a.DerivationDescription == b.DerivationDescription
    for sc in new:  # each equal to the renderer as it was, on the full display
        uid = str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
        image = next(im for im in result.images if im.sop_instance_uid == uid)
        heatmap = next(h for h in image.heatmaps if f"AI heatmap for {h.label} " in sc.ImageComments)
        s = next(
            (x for x in (*image.scores, *result.findings) if x.label == heatmap.label),
            None,
        )
        want, _ = old_render_overlay(full_by_uid[uid], heatmap, s, result.algorithm)
        assert sc.PixelData == want.tobytes()
