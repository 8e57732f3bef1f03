"""In-memory rendering: reproducibility, geometry, bit depth, labels and lesion boxes."""

from __future__ import annotations

import numpy as np
import pytest

from node.synth import render_ct, render_cxr, render_mammo, render_mr, render_study

from .conftest import KINDS, NEGATIVE, POSITIVE, SMALL


def _check_boxes(study):
    for image in study.images:
        ids = set(np.unique(image.mask)) - {0}
        assert {b.lesion for b in image.boxes} == ids
        for box in image.boxes:
            ys, xs = np.nonzero(image.mask == box.lesion)
            # the box holds every pixel of its lesion; where lesions overlap the mask shows the later one
            assert box.x0 <= xs.min() and box.y0 <= ys.min() and xs.max() < box.x1 and ys.max() < box.y1
            inside = image.mask[box.y0 : box.y1, box.x0 : box.x1] > 0
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert box.label in study.labels
            assert 0 <= box.x0 < box.x1 <= image.pixels.shape[1]
            assert 0 <= box.y0 < box.y1 <= image.pixels.shape[0]


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_pixels(kind):
    a = render_study(kind, 7, POSITIVE[kind], **SMALL[kind])
    b = render_study(kind, 7, POSITIVE[kind], **SMALL[kind])
    assert len(a.images) == len(b.images)
    for ia, ib in zip(a.images, b.images, strict=True):
        assert np.array_equal(ia.pixels, ib.pixels)
        assert np.array_equal(ia.mask, ib.mask)
        assert ia.boxes == ib.boxes
    c = render_study(kind, 8, POSITIVE[kind], **SMALL[kind])
    assert not all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a.images, c.images, strict=False))


@pytest.mark.parametrize("kind", KINDS)
def test_lesions_change_pixels_inside_their_boxes(kind):
    """The same seed with and without lesions shares anatomy and noise; only lesion areas differ."""
    pos = render_study(kind, 11, POSITIVE[kind], **SMALL[kind])
    neg = render_study(kind, 11, NEGATIVE[kind], **SMALL[kind])
    _check_boxes(pos)
    assert not pos.lesions or pos.lesions[0].label in pos.labels
    assert all(not im.boxes and not im.mask.any() for im in neg.images)
    assert any(im.boxes for im in pos.images)
    inside_changed = []
    for p, n in zip(pos.images, neg.images, strict=True):
        changed = p.pixels != n.pixels
        near = np.zeros(changed.shape, dtype=bool)
        for b in p.boxes:
            pad_x, pad_y = (b.x1 - b.x0) // 2 + 4, (b.y1 - b.y0) // 2 + 4
            near[max(b.y0 - pad_y, 0) : b.y1 + pad_y, max(b.x0 - pad_x, 0) : b.x1 + pad_x] = True
            lesion = p.mask == b.lesion
            diff = np.abs(p.modality_values()[lesion] - n.modality_values()[lesion])
            inside_changed.append(float(diff.mean()) / n.window_width)  # contrast relative to the window
        # outside the (padded) boxes the images are the same, up to lesion partial volume at slice ends
        assert changed[~near].mean() < 0.002
    assert max(inside_changed) > 0.08


def test_cxr_geometry_and_photometric():
    for seed in range(4):
        s = render_cxr(seed, "tuberculosis", scale=0.2)
        im = s.images[0]
        assert im.pixels.dtype == np.uint16
        assert im.photometric in ("MONOCHROME1", "MONOCHROME2")
        assert im.attributes["modality"] in ("CR", "DX")
        assert im.attributes["view_position"] in ("PA", "AP")
        assert 12 <= im.bits_stored <= 16
        assert int(im.pixels.max()) < 2**im.bits_stored
        assert im.window_width > 0
    full = render_cxr(3, (), modality="DX", bits_stored=16, rows=2000, cols=2500)
    assert full.images[0].pixels.shape == (2000, 2500)
    assert abs(full.images[0].pixel_spacing[0] - 0.172) < 0.01
    m1 = render_cxr(5, (), scale=0.2, photometric="MONOCHROME1", bits_stored=12).images[0]
    m2 = render_cxr(5, (), scale=0.2, photometric="MONOCHROME2", bits_stored=12).images[0]
    assert np.array_equal(m1.pixels.astype(np.int32) + m2.pixels, np.full(m1.pixels.shape, 4095))
    assert abs(m1.window_center + m2.window_center - 4095) < 0.2


def test_cxr_lesion_zones():
    for seed in range(3):
        s = render_cxr(seed, "tuberculosis", scale=0.2)
        rows = s.images[0].pixels.shape[0]
        for box in s.images[0].boxes:
            assert (box.y0 + box.y1) / 2 < rows * 0.55  # upper zones


def test_mammo_views_and_lesion_in_both_views_of_one_side():
    s = render_mammo(3, "malignant", scale=0.12)
    views = [(im.attributes["laterality"], im.attributes["view"]) for im in s.images]
    assert views == [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]
    for im in s.images:
        assert im.pixels.shape == (399, 307)
        assert im.bits_stored == 14 and int(im.pixels.max()) < 2**14
        assert im.pixels.dtype == np.uint16
    sides = {im.attributes["laterality"] for im in s.images if im.boxes}
    assert len(sides) == 1
    side = sides.pop()
    affected = [im for im in s.images if im.attributes["laterality"] == side]
    assert all(im.boxes and im.labels == ("malignant",) for im in affected)
    assert all(im.labels == ("normal",) and not im.boxes for im in s.images if im not in affected)
    cols = affected[0].pixels.shape[1]
    depths = []
    for im in affected:
        b = im.boxes[0]
        cx = (b.x0 + b.x1) / 2
        depths.append(cx if side == "L" else cols - cx)  # distance from the chest wall
    assert abs(depths[0] - depths[1]) < 0.35 * max(depths)


def test_mammo_breast_on_chest_wall_side():
    s = render_mammo(4, "normal", scale=0.12)
    for im in s.images:
        px = im.pixels.astype(float)
        left, right = px[:, :20].mean(), px[:, -20:].mean()
        assert (left > right) if im.attributes["laterality"] == "L" else (right > left)


def test_mammo_default_size_without_rendering_pixels():
    from node.synth.mammo import COLS, ROWS, SPACING

    assert (ROWS, COLS, SPACING) == (3328, 2560, 0.07)


def test_ct_geometry_and_hu():
    s = render_ct(5, "benign", slices=10, size=128, slice_thickness=5.0)
    geo = s.geometry
    assert geo["slice_thickness_mm"] == 5.0
    zs = [im.attributes["image_position"][2] for im in s.images]
    assert np.allclose(np.diff(zs), -5.0)
    hu = np.stack([im.modality_values() for im in s.images])
    assert s.images[0].pixels.dtype == np.int16
    assert s.images[0].rescale_intercept == -1024.0 and s.images[0].rescale_slope == 1.0
    assert hu[:, :4, :4].mean() < -900  # air in the corners
    mask = np.stack([im.mask for im in s.images])
    lesion_slices = {k for k in range(mask.shape[0]) if mask[k].any()}
    assert len(lesion_slices) >= 2
    cyst = hu[mask > 0]
    assert -15 < float(np.median(cyst)) < 35  # water density
    assert all(
        im.labels == (("benign",) if k in lesion_slices else ("normal",)) for k, im in enumerate(s.images)
    )


def test_ct_malignant_differs_from_liver():
    pos = render_ct(9, "malignant", slices=8, size=128)
    neg = render_ct(9, "normal", slices=8, size=128)
    mask = np.stack([im.mask for im in pos.images]) > 0
    hp = np.stack([im.modality_values() for im in pos.images])[mask]
    hn = np.stack([im.modality_values() for im in neg.images])[mask]
    assert abs(float(np.median(hp)) - float(np.median(hn))) > 25
    assert pos.lesions[0].type in ("hypoenhancing_mass", "hyperenhancing_mass")


@pytest.mark.parametrize("sequence", ["T2", "FLAIR", "T1C"])
def test_mr_geometry_and_tumour(sequence):
    s = render_mr(2, "tumour", slices=10, size=96, sequence=sequence)
    assert s.geometry["sequence"] == sequence
    assert all(im.pixels.dtype == np.uint16 and im.bits_stored == 16 for im in s.images)
    zs = [im.attributes["image_position"][2] for im in s.images]
    assert np.allclose(np.diff(zs), 6.0)
    assert sum(1 for im in s.images if im.boxes) >= 2
    _check_boxes(s)


def test_render_options_are_validated():
    with pytest.raises(ValueError):
        render_cxr(1, (), modality="MG", scale=0.2)
    with pytest.raises(ValueError):
        render_mr(1, "normal", sequence="DWI", slices=2, size=64)
    with pytest.raises(ValueError):
        render_study("ct", 1, "tumour")
    with pytest.raises(ValueError):
        render_study("cxr", -1, "none")
