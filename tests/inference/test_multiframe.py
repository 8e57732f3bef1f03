"""Multi-frame images: per-frame functional group values (geometry, rescale, window) against the
datasets' own items and pydicom's pixel functions, frame-by-frame decoding, spatial order of
frames, and the analysis of every frame (aggregated like slices, top-k kept, ``ImageResult.frame``).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence

from node.inference import preprocess as pp
from node.inference.decode import decode, decode_frame, header_from_dataset, iter_frames, slice_order
from node.inference.manifest import ModalityLutStep, WindowStep, parse_manifest
from node.inference.registry import load_model
from node.inference.runtime import CPU, RuntimeConfig, create_session
from node.runner.analyse import Stopwatch, analyse, display_image

from .conftest import example_manifest_dict

STEPS = [ModalityLutStep(op="modality_lut"), WindowStep(op="window", source="header")]


def real_path(name: str) -> str:
    path = get_testdata_file(name, download=False)  # never reach for the network
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return str(path)


def item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


#: per frame of the derived enhanced MR: (intercept, slope, center, width, function, z)
FUNCTIONS = ("LINEAR", "SIGMOID", "LINEAR_EXACT")
FRAMES = [
    (-10.0 * k, 1.0 + 0.25 * (k % 3), 100.0 + 10 * k, 200.0 + 20 * k, FUNCTIONS[k % 3], z)
    for k, z in enumerate([40.0, 10.0, 70.0, 0.0, 30.0, 90.0, 20.0, 60.0, 50.0, 80.0])
]


def enhanced_mr() -> Dataset:
    """emri_small.dcm (a real enhanced MR, 10 frames, which carries no functional groups) with
    per-frame rescale, window (all three VOI LUT functions) and positions, shared spacing and
    orientation."""
    ds = pydicom.dcmread(real_path("emri_small.dcm"))
    ds.SharedFunctionalGroupsSequence = Sequence(
        [
            item(
                PixelMeasuresSequence=Sequence([item(PixelSpacing=[0.5, 0.75], SliceThickness=5)]),
                PlaneOrientationSequence=Sequence([item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])]),
            )
        ]
    )
    groups = []
    for intercept, slope, center, width, function, z in FRAMES:
        groups.append(
            item(
                PixelValueTransformationSequence=Sequence(
                    [item(RescaleIntercept=intercept, RescaleSlope=slope, RescaleType="US")]
                ),
                FrameVOILUTSequence=Sequence(
                    [item(WindowCenter=center, WindowWidth=width, VOILUTFunction=function)]
                ),
                PlanePositionSequence=Sequence([item(ImagePositionPatient=[-60.0, -60.0, z])]),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    return ds


def classic_frame(ds: Dataset, index: int) -> Dataset:
    """Frame ``index`` of the derived enhanced MR as a classic single-frame dataset (top level)."""
    intercept, slope, center, width, function, _ = FRAMES[index]
    one = copy.deepcopy(ds)
    del one.PerFrameFunctionalGroupsSequence, one.SharedFunctionalGroupsSequence
    one.RescaleIntercept, one.RescaleSlope = intercept, slope
    one.WindowCenter, one.WindowWidth, one.VOILUTFunction = center, width, function
    return one


# ------------------------------------------------------------------------------------------------
# Per-frame values


def test_enhanced_ct_frames_take_their_own_functional_group_values():
    ds = pydicom.dcmread(real_path("eCT_Supplemental.dcm"))
    header = header_from_dataset(ds)
    assert header.number_of_frames == 2 and len(header.frame_values) == 2
    for index, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        frame = header.for_frame(index)
        shared = ds.SharedFunctionalGroupsSequence[0]
        voi = (group.get("FrameVOILUTSequence") or shared.FrameVOILUTSequence)[0]
        pvt = (group.get("PixelValueTransformationSequence") or shared.PixelValueTransformationSequence)[0]
        measures = (group.get("PixelMeasuresSequence") or shared.PixelMeasuresSequence)[0]
        assert frame.frame_number == index + 1
        assert frame.image_position_patient == tuple(
            float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient
        )
        assert frame.pixel_spacing == tuple(float(v) for v in measures.PixelSpacing)
        assert (frame.window_center, frame.window_width) == (float(voi.WindowCenter), float(voi.WindowWidth))
        assert (frame.rescale_slope, frame.rescale_intercept) == (
            float(pvt.RescaleSlope),
            float(pvt.RescaleIntercept),
        )
    # frame 1 lies at z = -159, frame 2 at z = -149; the slice normal of this orientation is -z
    assert slice_order([header.for_frame(i) for i in range(2)]) == [1, 0]


def test_per_frame_values_of_an_enhanced_mr_match_pydicom_frame_by_frame():
    ds = enhanced_mr()
    frames = list(iter_frames(ds))
    assert [f.header.frame_number for f in frames] == list(range(1, 11))
    for index, decoded in enumerate(frames):
        intercept, slope, center, width, function, z = FRAMES[index]
        h = decoded.header
        assert (h.rescale_intercept, h.rescale_slope, h.window_center, h.window_width) == (
            intercept,
            slope,
            center,
            width,
        )
        assert h.voi_lut_function == function
        assert h.image_position_patient == (-60.0, -60.0, z)
        assert h.pixel_spacing == (0.5, 0.75)  # shared
        ours = pp.run_steps(decoded.frame(0), h, STEPS).tensor[0, 0]
        one = classic_frame(ds, index)
        stored = ds.pixel_array[index]
        np.testing.assert_array_equal(decoded.frame(0), stored)
        p = apply_voi_lut(apply_modality_lut(stored, one), one).astype(np.float64)
        y_min, y_max = intercept, 4095 * slope + intercept  # 12 bits stored, unsigned
        np.testing.assert_allclose(ours, (p - y_min) / (y_max - y_min) * 255.0, atol=1e-3)
    # prepare() on the whole decoded image resolves the frame's values too
    every = decode(ds)
    manifest = parse_manifest(example_manifest_dict())
    for index in (0, 4, 9):
        np.testing.assert_array_equal(
            pp.prepare(every, manifest, frame=index).tensor, pp.prepare(frames[index], manifest).tensor
        )
    # the windows differ from frame to frame, so the frames' outputs differ as well
    assert len({pp.run_steps(f.frame(0), f.header, STEPS).tensor.tobytes() for f in frames}) == 10


@pytest.mark.parametrize(
    "name",
    [
        "emri_small.dcm",
        "emri_small_big_endian.dcm",
        "emri_small_RLE.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
    ],
)
def test_frame_by_frame_decoding_equals_decoding_all(name):
    path = real_path(name)
    every = decode(path).pixels
    frames = list(iter_frames(path))
    assert len(frames) == 10
    np.testing.assert_array_equal(np.concatenate([f.pixels for f in frames]), every)
    np.testing.assert_array_equal(decode_frame(path, 7).pixels[0], every[7])


@pytest.mark.parametrize("name", ["OBXXXX1A_2frame.dcm", "SC_rgb_2frame.dcm", "color3d_jpeg_baseline.dcm"])
def test_colour_frames_decode_one_by_one(name):
    path = real_path(name)
    every = decode(path).pixels
    for index, frame in enumerate(iter_frames(path)):
        assert frame.header.frame_number == index + 1
        np.testing.assert_array_equal(frame.pixels[0], every[index])
    assert index + 1 == every.shape[0]


def test_a_single_frame_header_is_unchanged_by_for_frame():
    header = header_from_dataset(pydicom.dcmread(real_path("CT_small.dcm")))
    assert header.for_frame(0) == header and header.frame_number is None


# ------------------------------------------------------------------------------------------------
# Analysis of every frame


@pytest.fixture
def mr_file(tmp_path: Path) -> Path:
    path = tmp_path / "emr.dcm"
    enhanced_mr().save_as(path, enforce_file_format=True)
    return path


def _model(make_model_dir, level: str, keep: int):
    def edit(data: dict) -> None:
        data["aggregation"] = {"level": level, "method": "max", "keep_top_slices": keep}

    model = load_model(make_model_dir(edit=edit))
    session = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    return model, session


def _run(model, session, files: list[Path], level: str):
    watch = Stopwatch(deadline=time.monotonic() + 120)
    return analyse(model, session, files, level=level, uid_seed="t", watch=watch)


def test_every_frame_is_analysed_and_the_top_k_are_kept(make_model_dir, mr_file):
    model, session = _model(make_model_dir, "series", keep=3)
    result, sources = _run(model, session, [mr_file], "series")
    assert len(sources) == 1  # one instance, however many frames
    # the reference: each frame prepared and scored on its own, in spatial order (z ascending)
    ds = pydicom.dcmread(mr_file)
    per_frame = []
    for index in range(10):
        decoded = decode_frame(ds, index)
        tensor = pp.prepare(decoded, model.manifest).tensor
        logits = session.run(tensor)["logits"][0]
        per_frame.append(1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
    per_frame = np.asarray(per_frame)
    for k, finding in enumerate(result.findings):
        assert finding.probability == pytest.approx(per_frame[:, k].max(), abs=1e-6)
    assert len(result.images) == 3
    frames = [im.frame for im in result.images]
    spatial = sorted(range(10), key=lambda i: FRAMES[i][5])
    top = sorted(range(10), key=lambda i: -per_frame[i].max())[:3]  # suspicion: every label is a finding
    assert frames == [i + 1 for i in spatial if i in top]  # kept in spatial order
    for im in result.images:  # displays decoded again for the kept frames, windowed per frame
        assert im.sop_instance_uid == str(ds.SOPInstanceUID)
        np.testing.assert_array_equal(im.display, display_image(decode_frame(ds, im.frame - 1)))
        assert im.heatmaps and im.heatmaps[0].values.shape == (64, 64)


def test_image_level_models_show_every_frame_in_spatial_order(make_model_dir, mr_file):
    model, session = _model(make_model_dir, "image", keep=1)
    result, _ = _run(model, session, [mr_file], "image")
    spatial = sorted(range(10), key=lambda i: FRAMES[i][5])
    assert [im.frame for im in result.images] == [i + 1 for i in spatial]
    for im in result.images:
        assert im.display is not None and im.display.dtype == np.uint8


def test_single_frame_images_have_no_frame_number(make_model_dir):
    model, session = _model(make_model_dir, "image", keep=1)
    result, _ = _run(model, session, [Path(real_path("CT_small.dcm"))], "image")
    assert [im.frame for im in result.images] == [None]
