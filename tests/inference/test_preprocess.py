"""Preprocessing ops against hand-computed values, and the executor."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from node.errors import PreprocessError
from node.inference import preprocess as pp
from node.inference.decode import decode
from node.inference.manifest import (
    ClaheStep,
    InvertMonochrome1Step,
    LetterboxStep,
    ModalityLutStep,
    NormalizeStep,
    ReplicateChannelsStep,
    ResizeStep,
    To8BitStep,
    WindowStep,
    parse_manifest,
)
from node.types import Geometry

from .conftest import example_manifest_dict
from .conftest import make_header as header

# ------------------------------------------------------------------------------------------------
# Intensity


def test_modality_lut():
    x = np.array([[0, 1000], [2000, -1]], dtype=np.int16)
    np.testing.assert_array_equal(pp.modality_lut(x, 1.0, -1024.0), [[-1024, -24], [976, -1025]])
    np.testing.assert_allclose(pp.modality_lut(x, 0.5, 10.0), [[10, 510], [1010, 9.5]])
    assert pp.modality_lut(x, 1, 0).dtype == np.float32


def test_window_dicom_linear_formula():
    # c=40, w=80: x <= 0 -> 0; x > 79 -> 255; else ((x - 39.5) / 79 + 0.5) * 255
    x = np.array([-100, 0, 1, 20, 39.5, 79, 80])
    expected = [0, 0, 3.2278481, 64.556962, 127.5, 255, 255]
    np.testing.assert_allclose(pp.window(x, 40, 80), expected, rtol=1e-6)
    np.testing.assert_allclose(pp.window(x, 40, 80, out_min=-1, out_max=1)[[0, 4, 6]], [-1, 0, 1])


def test_window_equals_the_piecewise_definition_bit_for_bit():
    """The in-place clipped ramp gives exactly what PS3.3's three cases give (the models were
    trained on that), for stored integers, HU floats and values on the boundaries."""

    def piecewise(x, c, w, lo=0.0, hi=255.0):
        x = x.astype(np.float64)
        c, w = c - 0.5, w - 1.0
        y = ((x - c) / w + 0.5) * (hi - lo) + lo
        return np.where(x <= c - w / 2, lo, np.where(x > c + w / 2, hi, y)).astype(np.float32)

    rng = np.random.default_rng(7)
    stored = rng.integers(0, 4096, size=20000).astype(np.uint16)
    hu = rng.uniform(-1200, 3000, size=20000)
    for c, w in ((2048, 4096), (40, 400), (1000.5, 2.0), (80, 200), (-600, 1500)):
        edges = np.array([c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2, c - 0.5, c - 1, c + 1])
        for x in (stored, hu, edges):
            np.testing.assert_array_equal(pp.window(x, c, w), piecewise(x, c, w))
        np.testing.assert_array_equal(pp.window(hu, c, w, -1.0, 1.0), piecewise(hu, c, w, -1.0, 1.0))


def test_window_width_one_is_a_threshold():
    np.testing.assert_array_equal(pp.window(np.array([9, 9.5, 9.6, 10]), 10, 1), [0, 0, 255, 255])
    with pytest.raises(PreprocessError, match="width must be >= 1"):
        pp.window(np.zeros(2), 0, 0.5)


def test_presets():
    assert pp.window_preset("lung") == (-600.0, 1500.0)
    assert pp.window_preset("brain") == (40.0, 80.0)
    assert pp.window_preset("liver") == (30.0, 150.0)
    assert pp.window_preset("mediastinum") == (50.0, 350.0)
    assert pp.window_preset("bone") == (400.0, 1800.0)
    assert pp.window_preset("abdomen") == (50.0, 400.0)
    with pytest.raises(PreprocessError, match="unknown window preset 'spleen'"):
        pp.window_preset("spleen")


def test_invert():
    np.testing.assert_array_equal(pp.invert(np.array([0, 55, 255]), 0, 255), [255, 200, 0])
    np.testing.assert_array_equal(pp.invert(np.array([-10, 0, 5]), -10, 5), [5, -5, -10])


def test_to_8bit_naive_uses_bit_depth():
    x = np.array([0, 1000, 2048, 4095])  # 12-bit unsigned: [0, 4095] -> [0, 255], round half up
    np.testing.assert_array_equal(pp.to_8bit_naive(x, (0, 4095)), [0, 62, 128, 255])
    # 16-bit signed: 0 -> 32768 / 65535 * 255 = 127.50 -> 128
    np.testing.assert_array_equal(
        pp.to_8bit_naive(np.array([-32768, 0, 32767]), (-32768, 32767)), [0, 128, 255]
    )


def test_to_8bit_global_bounds():
    x = np.array([-1500, -1000, 0, 500, 1000, 3000])
    np.testing.assert_array_equal(pp.to_8bit_global(x, -1000, 1000), [0, 0, 128, 191, 255, 255])


def test_to_8bit_image_percentile():
    x = np.array([0, 10, 20, 30, 40], dtype=float)  # p25 = 10, p75 = 30
    np.testing.assert_array_equal(pp.to_8bit_image_percentile(x, 25, 75), [0, 0, 128, 255, 255])
    # defaults 0.01 / 99.99 on 0..9999: bounds 0.9999 and 9998.0001
    y = np.arange(10000, dtype=float)
    out = pp.to_8bit_image_percentile(y)
    assert out[0] == 0 and out[9999] == 255
    assert out[2500] == 64  # (2500 - 0.9999) / 9997.0002 * 255 = 63.74 -> 64
    np.testing.assert_array_equal(pp.to_8bit_image_percentile(np.full(4, 7.0)), np.zeros(4))


def test_to_8bit_mix_stacks_the_three():
    x = np.array([[0, 1000], [2048, 4095]])
    mix = pp.to_8bit_mix(x, (0, 4095), 0, 2048, 25, 75)
    assert mix.shape == (2, 2, 3)
    np.testing.assert_array_equal(mix[..., 0], pp.to_8bit_naive(x, (0, 4095)))
    np.testing.assert_array_equal(mix[..., 1], [[0, 125], [255, 255]])  # 1000/2048*255 = 124.5 -> 125
    np.testing.assert_array_equal(mix[..., 2], pp.to_8bit_image_percentile(x, 25, 75))


# ------------------------------------------------------------------------------------------------
# Filters


def test_clahe_single_tile_without_clipping_is_histogram_equalisation():
    # 8x8: 16 px at 10, 32 at 100, 16 at 200 -> cdf 0.25, 0.75, 1.0 -> 64, 191, 255
    img = np.full((8, 8), 100.0)
    img[:2] = 10
    img[6:] = 200
    out = pp.clahe(img, clip_limit=1000, tile_grid=(1, 1))
    assert set(np.unique(out[:2])) == {64.0}
    assert set(np.unique(out[2:6])) == {191.0}
    assert set(np.unique(out[6:])) == {255.0}
    rgb = pp.clahe(np.stack([img, img], axis=-1), clip_limit=1000, tile_grid=(1, 1))
    np.testing.assert_array_equal(rgb[..., 1], out)


def test_median():
    img = np.array([[1, 2, 3], [4, 100, 6], [7, 8, 9]], dtype=np.float32)
    out = pp.median(img, 3)
    assert out[1, 1] == 6  # median of {1,2,3,4,6,7,8,9,100}
    assert out[0, 0] == 2  # replicated border: {1,1,2,1,1,2,4,4,100}
    big = pp.median(np.full((9, 9), 3.0), 7)
    assert np.all(big == 3)
    with pytest.raises(PreprocessError, match="needs an 8-bit image"):
        pp.median(np.full((9, 9), 1000.0), 7)
    with pytest.raises(PreprocessError, match="odd"):
        pp.median(img, 4)


def test_gaussian_impulse_response():
    img = np.zeros((7, 7), dtype=np.float32)
    img[3, 3] = 1
    out = pp.gaussian(img, sigma=1.0, ksize=5)
    # 1-D kernel exp(-x^2/2), x=-2..2, normalised: g0 = 1/2.483732 = 0.402620, g1 = 0.244201
    assert out[3, 3] == pytest.approx(0.402620**2, rel=1e-4)
    assert out[3, 4] == pytest.approx(0.402620 * 0.244201, rel=1e-4)
    assert out.sum() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(pp.gaussian(np.full((6, 6), 5.0), sigma=2.0), 5.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Geometry


def test_resize_nearest_and_area():
    x = np.array([[1, 2], [3, 4]], dtype=np.float32)
    np.testing.assert_array_equal(
        pp.resize(x, (4, 4), "nearest"), [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    )
    y = np.arange(16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(pp.resize(y, (2, 2), "area"), [[2.5, 4.5], [10.5, 12.5]])
    assert pp.resize(np.zeros((4, 4, 1)), (2, 2)).shape == (2, 2, 1)


def test_letterbox_pads_and_reports_geometry():
    x = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.float32)
    out, lb = pp.letterbox(x, (4, 4), pad_value=-1, interpolation="nearest")
    np.testing.assert_array_equal(out, [[-1] * 4, [1, 2, 3, 4], [5, 6, 7, 8], [-1] * 4])
    assert (lb.pad_top, lb.pad_left, lb.scale_y, lb.scale_x) == (1, 0, 1.0, 1.0)
    lb2 = pp.letterbox_params((100, 200), (64, 64))
    assert lb2.inner_shape == (32, 64) and lb2.pad_top == 16 and lb2.pad_left == 0
    assert lb2.scale_y == pytest.approx(0.32)
    assert pp.letterbox_params((100, 200), (64, 64), align="top_left").pad_top == 0


def test_geometry_round_trip():
    g = Geometry.identity((100, 200)).then(0.32, 0.32, 16, 0, (64, 64))
    assert g.to_model(0, 0) == pytest.approx((0.5 * 0.32 + 16 - 0.5, 0.5 * 0.32 - 0.5))
    assert g.to_source(*g.to_model(37.0, 150.0)) == pytest.approx((37.0, 150.0))
    # composing two resizes: x2 then x0.5 with an offset of 3 -> scale 1, offset 3
    h = Geometry.identity((10, 10)).then(2, 2, 0, 0, (20, 20)).then(0.5, 0.5, 3, 3, (16, 16))
    assert (h.scale_y, h.offset_y) == (1.0, 3.0)


# ------------------------------------------------------------------------------------------------
# Channels


def test_normalize():
    np.testing.assert_allclose(pp.normalize(np.array([[0, 255]]), [0.5], [0.5]), [[-1, 1]])
    px = np.array([[[255, 0, 127.5]]])
    out = pp.normalize(px, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    np.testing.assert_allclose(out[0, 0], [2.248908, -2.035714, 0.417778], rtol=1e-5)
    with pytest.raises(PreprocessError, match="2 mean / 2 std values for an image with 3"):
        pp.normalize(px, [0, 0], [1, 1])


def test_replicate_channels():
    out = pp.replicate_channels(np.array([[1, 2], [3, 4]]), 3)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 2], [[1, 2], [3, 4]])
    with pytest.raises(PreprocessError):
        pp.replicate_channels(np.zeros((2, 2, 3)))


# ------------------------------------------------------------------------------------------------
# Tiling and stitching


def test_tile_origins_cover_the_far_edge():
    assert pp.tile_origins((5, 5), (3, 3), (2, 2)) == [(0, 0), (0, 2), (2, 0), (2, 2)]
    assert pp.tile_origins((6, 4), (4, 4), (3, 3)) == [(0, 0), (2, 0)]
    assert pp.tile_origins((2, 2), (4, 4), (1, 1)) == [(0, 0)]


def test_tile_and_stitch_scores_average_overlaps():
    img = np.arange(25, dtype=np.float32).reshape(5, 5)
    patches, origins = pp.tile(img, (3, 3), (2, 2))
    assert patches.shape == (4, 3, 3)
    np.testing.assert_array_equal(patches[3], img[2:5, 2:5])
    m = pp.stitch(np.array([1, 2, 3, 4]), origins, (3, 3), (5, 5))
    assert m[0, 0] == 1 and m[0, 4] == 2 and m[4, 0] == 3 and m[4, 4] == 4
    assert m[2, 2] == 2.5  # all four overlap
    assert m[0, 2] == 1.5  # patches 1 and 2


def test_stitch_maps_reassembles_the_image():
    img = np.arange(36, dtype=np.float32).reshape(6, 6)
    patches, origins = pp.tile(img, (4, 4), (2, 2))
    np.testing.assert_allclose(pp.stitch(patches, origins, (4, 4), (6, 6)), img)
    small, o2 = pp.tile(np.ones((2, 3)), (4, 4), (4, 4))  # padded
    assert small.shape == (1, 4, 4) and small[0, 3, 3] == 0 and o2 == [(0, 0)]


# ------------------------------------------------------------------------------------------------
# Executor


def test_run_steps_hand_computed():
    img = np.array([[0, 1024], [2048, 4095]], dtype=np.uint16)
    h = header(rescale_intercept=-1024.0)
    steps = [
        ModalityLutStep(op="modality_lut"),  # [[-1024, 0], [1024, 3071]]
        WindowStep(op="window", source="explicit", center=0.5, width=2049),  # [[0, 127.5], [255, 255]]
        ReplicateChannelsStep(op="replicate_channels", channels=3),
        NormalizeStep(op="normalize", mean=[0.5], std=[0.5]),  # [[-1, 0], [1, 1]]
    ]
    out = pp.run_steps(img, h, steps, layout="NCHW")
    assert out.tensor.shape == (1, 3, 2, 2) and out.tensor.dtype == np.float32
    np.testing.assert_allclose(out.tensor[0, 1], [[-1, 0], [1, 1]])
    assert out.geometry == Geometry.identity((2, 2))
    nhwc = pp.run_steps(img, h, steps, layout="NHWC")
    assert nhwc.tensor.shape == (1, 2, 2, 3)


def test_run_steps_monochrome1_and_to_8bit():
    img = np.array([[0, 4095]], dtype=np.uint16)
    steps = [To8BitStep(op="to_8bit", method="naive"), InvertMonochrome1Step(op="invert_monochrome1")]
    out = pp.run_steps(img, header(photometric_interpretation="MONOCHROME1"), steps, dtype="uint8")
    np.testing.assert_array_equal(out.tensor[0, 0], [[255, 0]])
    assert out.tensor.dtype == np.uint8
    same = pp.run_steps(img, header(), steps, dtype="uint8")  # MONOCHROME2: untouched
    np.testing.assert_array_equal(same.tensor[0, 0], [[0, 255]])
    mix = pp.run_steps(img, header(), [To8BitStep(op="to_8bit", method="mix", low=0, high=2048)])
    assert mix.tensor.shape == (1, 3, 1, 2)


def test_run_steps_geometry_and_size_check():
    img = np.zeros((100, 200), dtype=np.uint16)
    out = pp.run_steps(
        img,
        header(rows=100, cols=200),
        [LetterboxStep(op="letterbox", size=(64, 64))],
        expected_hw=(64, 64),
        expected_channels=1,
    )
    g = out.geometry
    assert (g.source_shape, g.model_shape, g.offset_y, g.offset_x) == ((100, 200), (64, 64), 16, 0)
    assert g.scale_y == pytest.approx(0.32) and g.scale_x == pytest.approx(0.32)
    with pytest.raises(PreprocessError, match="produced 100x200; the model input needs 64x64"):
        pp.run_steps(img, header(), [], expected_hw=(64, 64))
    with pytest.raises(PreprocessError, match="1 channel\\(s\\); the model input needs 3"):
        pp.run_steps(img, header(), [ResizeStep(op="resize", size=(8, 8))], expected_channels=3)


def test_run_steps_refusals_name_the_step():
    img = np.zeros((8, 8), dtype=np.uint16)
    with pytest.raises(PreprocessError, match="step 0 \\(clahe\\): clahe needs an 8-bit image"):
        pp.run_steps(img, header(), [ClaheStep(op="clahe")])
    with pytest.raises(PreprocessError, match="step 1 \\(window\\): instance 1.2.3 has no WindowCenter"):
        pp.run_steps(img, header(), [ModalityLutStep(op="modality_lut"), WindowStep(op="window")])
    ramp = np.array([[5, 6, 10]], dtype=np.uint16)  # min/max window: [5, 10] -> [0, 255]
    fallback = pp.run_steps(ramp, header(), [WindowStep(op="window", fallback="minmax")])
    np.testing.assert_allclose(fallback.tensor[0, 0], [[0, 51, 255]])


def test_prepare_with_the_example_manifest_on_ct_small():
    manifest = parse_manifest(example_manifest_dict())
    img = decode(get_testdata_file("CT_small.dcm", download=False))
    out = pp.prepare(img, manifest)
    assert out.tensor.shape == (1, 3, 32, 32) and out.tensor.dtype == np.float32
    assert out.geometry.scale_y == pytest.approx(0.25)
    # header without a window -> minmax fallback; MONOCHROME1 inverts
    mono1 = replace(img, header=replace(img.header, photometric_interpretation="MONOCHROME1"))
    inv = pp.prepare(mono1, manifest)
    assert not np.allclose(inv.tensor, out.tensor)
