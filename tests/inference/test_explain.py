"""Heatmaps (CAM through a letterbox, patch, occlusion), hotspots, aggregation, activations."""

from __future__ import annotations

import numpy as np
import pytest

from node.errors import InferenceError
from node.inference import explain as ex
from node.inference.manifest import parse_manifest
from node.inference.postprocess import activate, label_scores, probabilities, sigmoid, softmax
from node.inference.preprocess import run_steps
from node.inference.runtime import ModelSession, RuntimeConfig, open_session
from node.types import Geometry, ModelInput

from .conftest import example_manifest_dict, make_cam_model
from .conftest import make_header as header


def test_normalize_map():
    np.testing.assert_allclose(ex.normalize_map(np.array([-2.0, 0.0, 1.0, 4.0])), [0, 0, 0.25, 1])
    np.testing.assert_allclose(ex.normalize_map(np.array([-2.0, 0.0, 2.0]), "minmax"), [0, 0.5, 1])
    assert not ex.normalize_map(np.full(3, -1.0)).any()
    assert not ex.normalize_map(np.full(3, 5.0), "minmax").any()


def test_map_to_source_identity():
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(ex.map_to_source(m, Geometry.identity((3, 4))), m)


def test_map_to_source_undoes_letterbox_exactly_for_linear_maps():
    # source 40x80 -> letterbox 32x32: scale 0.4, pad_top 8
    g = Geometry.identity((40, 80)).then(0.4, 0.4, 8, 0, (32, 32))
    mr, mc = np.mgrid[0:32, 0:32].astype(np.float32)
    # each model pixel holds the source column / row it comes from: (m + 0.5 - offset) / scale - 0.5
    back_c = ex.map_to_source((mc + 0.5) / 0.4 - 0.5, g)
    back_r = ex.map_to_source((mr + 0.5 - 8) / 0.4 - 0.5, g)
    src_r, src_c = np.mgrid[0:40, 0:80]
    inner = (slice(2, -2), slice(2, -2))  # bilinear is exact inside; edges are replicated
    np.testing.assert_allclose(back_c[inner], src_c[inner], atol=1e-3)
    np.testing.assert_allclose(back_r[inner], src_r[inner], atol=1e-3)


def _blob_image(rows=40, cols=80, center=(10, 60), radius=5) -> np.ndarray:
    r, c = np.mgrid[0:rows, 0:cols]
    img = np.full((rows, cols), 100, dtype=np.uint16)
    img[(r - center[0]) ** 2 + (c - center[1]) ** 2 <= radius**2] = 1000
    return img


@pytest.fixture(scope="module")
def cam_manifest():
    d = example_manifest_dict()
    d["preprocessing"] = [
        {"op": "window", "source": "explicit", "center": 550, "width": 901},
        {"op": "letterbox", "size": [32, 32], "interpolation": "area"},
        {"op": "replicate_channels", "channels": 3},
    ]
    return parse_manifest(d)


@pytest.fixture(scope="module")
def cam_session():
    sess = open_session(make_cam_model(), RuntimeConfig(intra_op_threads=1), "cam")
    return ModelSession(sess, name="cam", input_name="image", output_names=["logits", "cam"], max_batch=4)


def test_cam_through_letterbox_puts_the_peak_on_the_blob(cam_manifest, cam_session):
    img = _blob_image()
    mi = run_steps(img, header(rows=40, cols=80), cam_manifest.preprocessing, expected_hw=(32, 32))
    assert (mi.geometry.offset_y, mi.geometry.scale_y) == (8, pytest.approx(0.4))
    outputs = cam_session.run(mi.tensor)
    maps = ex.cam_to_source(outputs["cam"], mi.geometry, [0, 1])
    assert maps.shape == (2, 40, 80)
    assert maps[0].max() == pytest.approx(1.0)
    spot = ex.find_hotspot(maps[0])
    assert spot is not None
    # one CAM cell is 4 model px = 10 source px: the peak lands within half a cell of the blob
    assert abs(spot.peak_row - 10) <= 5 and abs(spot.peak_col - 60) <= 5
    r0, c0, r1, c1 = spot.box
    assert r0 <= 10 <= r1 and c0 <= 60 <= c1
    assert maps[0][30:, :40].max() < 0.2  # far from the blob
    assert not maps[1].any()  # label 1 sees channel 1 - channel 2 = 0

    hms = ex.heatmaps(cam_manifest, mi, {k: v[:1] for k, v in outputs.items()})
    assert [h.label for h in hms] == ["nodule", "effusion"]
    assert hms[0].method == "cam" and hms[0].values.shape == (40, 80)
    assert hms[0].hotspot == spot and hms[1].hotspot is None


def test_patch_heatmap_hand_computed():
    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    x[0, 0, :2, :2] = 1.0

    def predict(batch):  # (N, 1, 2, 2) -> [mean, 1 - mean]
        m = batch.reshape(batch.shape[0], -1).mean(axis=1)
        return np.stack([m, 1 - m], axis=1)

    maps = ex.patch_heatmap(x, predict, (2, 2), (2, 2), batch_size=3)
    assert maps.shape == (2, 4, 4)
    expected = np.zeros((4, 4))
    expected[:2, :2] = 1
    np.testing.assert_array_equal(maps[0], expected)
    np.testing.assert_array_equal(maps[1], 1 - expected)
    # overlapping stride: pixel (1, 1) is covered by patches (0,0),(0,1),(1,0),(1,1) with means 1, .5, .5, .25
    over = ex.patch_heatmap(x, predict, (2, 2), (1, 1))
    assert over[0, 1, 1] == pytest.approx((1 + 0.5 + 0.5 + 0.25) / 4)


def test_occlusion_heatmap_hand_computed():
    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    x[0, 0, 1, 1] = 4.0  # image mean 0.25

    def predict(batch):  # the score is the value at (1, 1)
        return batch[:, 0, 1, 1][:, None]

    maps = ex.occlusion_heatmap(x, predict, (2, 2), (2, 2), batch_size=2)
    expected = np.zeros((4, 4))
    expected[:2, :2] = 4.0 - 0.25  # only the window over (1, 1) drops the score
    np.testing.assert_allclose(maps[0], expected)


def test_heatmaps_patch_and_occlusion_methods_map_to_source():
    d = example_manifest_dict()
    d["outputs"]["cam"] = None
    d["preprocessing"] = [{"op": "resize", "size": [8, 8], "interpolation": "nearest"}]
    d["input"]["shape"] = [None, 1, 8, 8]
    d["heatmap"] = {"method": "occlusion", "window": [4, 4], "stride": [4, 4], "batch_size": 2}
    m = parse_manifest(d)
    src = np.zeros((16, 16), dtype=np.uint16)
    src[12:, 12:] = 100  # bottom-right quadrant drives label 0
    mi = run_steps(src, header(rows=16, cols=16), m.preprocessing)

    def predict(batch):
        s = batch[:, 0, 4:, 4:].mean(axis=(1, 2)) / 100
        return np.stack([s, np.zeros_like(s)], axis=1)

    hms = ex.heatmaps(m, mi, {}, predict)
    assert hms[0].values.shape == (16, 16)
    assert hms[0].values[12:, 12:].min() == pytest.approx(1.0)
    assert hms[0].values[:6, :6].max() == 0
    assert hms[0].hotspot.box == (8, 8, 15, 15)  # the whole occluded window
    assert hms[1].hotspot is None

    d["heatmap"] = {"method": "patch", "patch_size": [8, 8], "stride": [4, 4]}
    with pytest.raises(InferenceError, match="needs a predict function"):
        ex.heatmaps(parse_manifest(d), mi, {})
    d["heatmap"] = {"method": "none"}
    assert ex.heatmaps(parse_manifest(d), mi, {}) == []


def test_find_hotspot_box_and_polygon():
    m = np.zeros((10, 12), dtype=np.float32)
    m[2:5, 3:8] = 0.6
    m[3, 5] = 1.0
    m[8, 10] = 0.9  # a separate blob: not in the region around the peak
    spot = ex.find_hotspot(m, rel_threshold=0.5)
    assert (spot.peak_row, spot.peak_col, spot.peak_value) == (3, 5, 1.0)
    assert spot.box == (2, 3, 4, 7)
    assert set(spot.polygon) == {(2.0, 3.0), (4.0, 3.0), (4.0, 7.0), (2.0, 7.0)}
    tight = ex.find_hotspot(m, rel_threshold=0.95)
    assert tight.box == (3, 5, 3, 5)
    assert ex.find_hotspot(np.zeros((3, 3))) is None


def test_aggregate_and_top_slices():
    s = np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4]])
    np.testing.assert_allclose(ex.aggregate(s, "max"), [0.5, 0.9])
    np.testing.assert_allclose(ex.aggregate(s, "mean"), [0.3, 0.5])
    np.testing.assert_allclose(ex.aggregate(s, "top_k_mean", 2), [0.4, 0.65])
    np.testing.assert_allclose(ex.aggregate(s, "top_k_mean", 10), [0.3, 0.5])
    assert ex.aggregate(np.array([0.2, 0.7]), "max") == pytest.approx(0.7)
    with pytest.raises(InferenceError):
        ex.aggregate(s, "top_k_mean")
    with pytest.raises(InferenceError):
        ex.aggregate(np.zeros((0, 2)))
    assert ex.top_slices([0.2, 0.9, 0.5, 0.9], 3) == [1, 3, 2]
    assert ex.top_slices([0.2], 5) == [0]


def test_activations_and_label_scores():
    assert sigmoid(np.array([0.0]))[0] == pytest.approx(0.5)
    assert sigmoid(np.array([-1000.0, 1000.0])).tolist() == [0.0, 1.0]
    np.testing.assert_allclose(softmax(np.array([[0.0, np.log(3.0)]])), [[0.25, 0.75]])
    np.testing.assert_allclose(activate(np.array([[0.3]]), "none"), [[0.3]])
    m = parse_manifest(example_manifest_dict())  # nodule (0.5, triage), effusion (0.6)
    probs = probabilities(m, np.array([[0.0, 2.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.8807971]], rtol=1e-6)
    scores = label_scores(m, probs[0])
    assert [(s.label, s.positive, s.triage) for s in scores] == [
        ("nodule", True, True),
        ("effusion", True, False),
    ]
    assert scores[0].code.value == "27925004"
    with pytest.raises(InferenceError, match="expected \\(N, >= 2\\)"):
        probabilities(m, np.zeros((1, 1)))


def test_model_input_layout_nhwc_patch():
    x = np.zeros((1, 4, 4, 1), dtype=np.float32)
    x[0, 2:, 2:, 0] = 1
    maps = ex.patch_heatmap(
        x, lambda b: b.reshape(len(b), -1).mean(axis=1, keepdims=True), (2, 2), (2, 2), layout="NHWC"
    )
    assert maps[0, 3, 3] == 1 and maps[0, 0, 0] == 0
    assert isinstance(ModelInput(tensor=x, geometry=Geometry.identity((4, 4)), layout="NHWC"), ModelInput)


def test_heatmaps_patch_method_keeps_probabilities():
    d = example_manifest_dict()
    d["outputs"]["cam"] = None
    d["preprocessing"] = []
    d["input"]["shape"] = [None, 1, 8, 8]
    d["heatmap"] = {"method": "patch", "patch_size": [8, 8], "stride": [8, 8], "batch_size": 3}
    m = parse_manifest(d)
    src = np.zeros((16, 24), dtype=np.uint16)
    src[8:, 16:] = 1  # the bottom-right patch
    mi = run_steps(src, header(rows=16, cols=24), m.preprocessing)  # full image, no resize

    def predict(batch):  # probability 0.8 where the patch has signal, 0.1 elsewhere
        s = np.where(batch.reshape(len(batch), -1).max(axis=1) > 0, 0.8, 0.1)
        return np.stack([s, np.full_like(s, 0.05)], axis=1)

    scores, origins = ex.patch_scores(mi.tensor, predict, (8, 8), (8, 8), batch_size=3)
    assert scores.shape == (6, 2) and origins[-1] == (8, 16)
    assert scores[:, 0].max() == pytest.approx(0.8)  # image-level score of a patch model
    hms = ex.heatmaps(m, mi, {}, predict)
    np.testing.assert_allclose(hms[0].values[8:, 16:], 0.8)
    np.testing.assert_allclose(hms[0].values[:8, :16], 0.1)
    np.testing.assert_allclose(hms[1].values, 0.05)  # absolute, not rescaled to 1
    assert hms[0].hotspot.box == (8, 16, 15, 23)
    reused = ex.heatmaps(m, mi, {}, None, patch_result=(scores, origins))
    np.testing.assert_array_equal(reused[0].values, hms[0].values)


def test_hotspot_of_a_flat_top_is_its_centre():
    """Patch maps are constant over stride-sized blocks: the peak is the block's centre, not its
    top-left corner."""
    from node.inference.explain import find_hotspot

    m = np.zeros((64, 64), dtype=np.float32)
    m[16:32, 32:48] = 1.0
    spot = find_hotspot(m)
    assert spot is not None
    assert abs(spot.peak_row - 23.5) <= 0.5 and abs(spot.peak_col - 39.5) <= 0.5
    assert spot.box == (16, 32, 31, 47)
