"""Pixel values against pydicom's own functions (``apply_modality_lut``, ``apply_voi_lut``,
``apply_windowing``) on real vendor files: VOI LUT Sequence, Modality LUT Sequence, SIGMOID and
LINEAR_EXACT windows, and the bit-identity of the fast LINEAR ramp.

pydicom's windowing returns values in the image's output range (stored range, rescaled); the node's
``window`` step returns 0..255. "Scaled the same way" below means ``(p - y_min) / (y_max - y_min) * 255``
for pydicom's output ``p``; for the bit-identity test pydicom itself is given an output range of
0..255 (BitsStored 8, unsigned, no rescale), so its arithmetic is the node's, operation for operation.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing

from node.errors import PreprocessError
from node.inference import preprocess as pp
from node.inference.decode import decode, header_from_dataset
from node.inference.manifest import ModalityLutStep, WindowStep
from node.runner.analyse import display_image

STEPS = [ModalityLutStep(op="modality_lut"), WindowStep(op="window", source="header")]


def real(name: str) -> Dataset:
    path = get_testdata_file(name, download=False)  # never reach for the network
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return pydicom.dcmread(path)


def node_window(ds: Dataset) -> np.ndarray:
    """The node's modality_lut + window (header) steps on the dataset's first frame (H, W)."""
    decoded = decode(ds)
    tensor = pp.run_steps(decoded.frame(0), decoded.header, STEPS).tensor
    return tensor[0, 0]


def pydicom_window_scaled(ds: Dataset) -> np.ndarray:
    """pydicom's modality LUT + VOI LUT on the same pixels, its output range scaled to 0..255."""
    arr = ds.pixel_array
    out = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    if ds.get("VOILUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif ds.get("ModalityLUTSequence"):
        y_min, y_max = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    else:
        bits = int(ds.BitsStored)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        y_min, y_max = lo * slope + intercept, hi * slope + intercept
    return ((out - y_min) / (y_max - y_min) * 255.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# LUT sequences


def test_voi_lut_sequence_matches_pydicom_exactly_on_vlut_04():
    ds = real("vlut_04.dcm")
    header = header_from_dataset(ds)
    assert header.voi_lut is not None and header.voi_lut.entries == 256 and header.voi_lut.bits == 16
    ours = node_window(ds)
    reference = (apply_voi_lut(ds.pixel_array, ds).astype(np.float64) / 65535.0 * 255.0).astype(np.float32)
    np.testing.assert_array_equal(ours, reference)
    assert np.array_equal(ours, pydicom_window_scaled(ds))


def test_a_reversed_voi_lut_matches_pydicom():
    """vlut_04's table is nearly the identity (entry i = 257 i); reversed, it inverts the image."""
    ds = real("vlut_04.dcm")
    item = ds.VOILUTSequence[0]
    item.LUTData = list(reversed(item.LUTData))
    ours = node_window(ds)
    np.testing.assert_array_equal(ours, pydicom_window_scaled(ds))
    np.testing.assert_allclose(ours, 255.0 - ds.pixel_array, atol=1e-3)


def test_voi_lut_sequence_is_preferred_over_a_window_as_pydicom_does():
    ds = real("vlut_04.dcm")
    ds.WindowCenter, ds.WindowWidth = 100, 20  # apply_voi_lut(prefer_lut=True) ignores these
    np.testing.assert_array_equal(node_window(ds), pydicom_window_scaled(ds))


def test_modality_lut_sequence_matches_pydicom_exactly_on_mlut_18():
    ds = real("mlut_18.dcm")
    decoded = decode(ds)
    header = decoded.header
    assert header.modality_lut is not None and header.modality_lut.first_mapped == -2048
    values, value_range = pp.header_modality(decoded.frame(0), header)
    np.testing.assert_array_equal(values, apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    assert value_range == (0.0, 65535.0)  # the LUT's output range, as pydicom's apply_windowing takes it
    # stored values outside the table take its first / last entry
    lut = header.modality_lut
    edge = np.array([[-32768, -2049, 2048, 30719]], dtype=np.int16)
    np.testing.assert_array_equal(pp.lut_lookup(edge, lut), apply_modality_lut(edge, ds))
    # pydicom subtracts the first mapped value in int16 and wraps past 30719; the node does not
    top = np.array([[32767]], dtype=np.int16)
    assert pp.lut_lookup(top, lut)[0, 0] == 65535 and apply_modality_lut(top, ds)[0, 0] == 0


def test_window_after_a_modality_lut_matches_pydicom_on_mlut_18():
    ds = real("mlut_18.dcm")
    ds.WindowCenter, ds.WindowWidth = 30000, 20000
    ours = node_window(ds)
    np.testing.assert_allclose(ours, pydicom_window_scaled(ds), atol=1e-3)
    assert ours.min() == 0.0 and ours.max() == 255.0


# ------------------------------------------------------------------------------------------------
# VOI LUT functions


def sigmoid_ct(center: float = 40.0, width: float = 400.0) -> Dataset:
    ds = real("CT_small.dcm")
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = center, width, "SIGMOID"
    return ds


def test_sigmoid_matches_pydicom_on_a_real_ct():
    ds = sigmoid_ct()
    assert header_from_dataset(ds).voi_lut_function == "SIGMOID"
    ours = node_window(ds)
    np.testing.assert_allclose(ours, pydicom_window_scaled(ds), atol=1e-3)
    assert ours.min() > 0.0 and ours.max() < 255.0  # a sigmoid never reaches its bounds


def test_sigmoid_ramp_values_guard_against_linear_only_windowing():
    """Mutation guard: reverting the window step to the old linear-only windowing (first
    WindowCenter/WindowWidth, VOILUTFunction ignored) fails this test. pydicom's SIGMOID on
    c=2048 w=2048 over 0, 512, ..., 4096, scaled to 0..255 and rounded, is the expected row; the old
    linear window gave 0 0 0 64 127 191 255 255 255."""
    ds = real("CT_small.dcm")
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2048, 2048, "SIGMOID"
    header = header_from_dataset(ds)
    ramp = np.arange(0, 4097, 512, dtype=np.uint16).reshape(1, -1)
    ours = pp.run_steps(ramp, header, STEPS).tensor[0, 0, 0]
    expected = [5, 12, 30, 69, 128, 186, 225, 243, 250]
    assert np.floor(ours + 0.5).astype(int).tolist() == expected
    reference = apply_voi_lut(ramp.astype(np.float64), ds)[0] / 4095.0 * 255.0
    np.testing.assert_allclose(ours, reference, atol=1e-3)


def test_linear_exact_matches_pydicom_on_a_real_mr():
    ds = real("MR_small.dcm")
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 600.25, 0.5, "LINEAR_EXACT"
    header = header_from_dataset(ds)
    assert (header.voi_lut_function, header.window_width) == ("LINEAR_EXACT", 0.5)  # LINEAR needs >= 1
    ours = node_window(ds)
    np.testing.assert_allclose(ours, pydicom_window_scaled(ds), atol=1e-3)
    ds.WindowWidth = 1600
    wide = node_window(ds)
    np.testing.assert_allclose(wide, pydicom_window_scaled(ds), atol=1e-3)
    ds.VOILUTFunction = "LINEAR"
    assert not np.array_equal(wide, node_window(ds))  # LINEAR_EXACT is not LINEAR


def test_unknown_voi_lut_function_and_invalid_width_are_named():
    ds = sigmoid_ct()
    ds.VOILUTFunction = "LOG"
    decoded = decode(ds)
    with pytest.raises(PreprocessError, match="VOILUTFunction is 'LOG'"):
        pp.run_steps(decoded.frame(0), decoded.header, STEPS)
    ds.VOILUTFunction, ds.WindowWidth = "LINEAR", 0.5
    decoded = decode(ds)
    with pytest.raises(PreprocessError, match="WindowWidth is 0.5, LINEAR needs >= 1"):
        pp.run_steps(decoded.frame(0), decoded.header, STEPS)
    fallback = [STEPS[0], WindowStep(op="window", source="header", fallback="minmax")]
    out = pp.run_steps(decoded.frame(0), decoded.header, fallback).tensor
    assert out.min() == 0.0 and out.max() == 255.0


def test_explicit_and_preset_windows_stay_linear():
    ds = sigmoid_ct()
    decoded = decode(ds)
    explicit = [STEPS[0], WindowStep(op="window", source="explicit", center=40, width=400)]
    ours = pp.run_steps(decoded.frame(0), decoded.header, explicit).tensor[0, 0]
    values = pp.modality_lut(decoded.frame(0), 1.0, -1024.0)
    np.testing.assert_array_equal(ours, pp.window(values, 40, 400))
    assert ours.min() == 0.0  # a sigmoid would never reach 0


# ------------------------------------------------------------------------------------------------
# The fast LINEAR ramp is pydicom's windowing, bit for bit


def pydicom_linear_0_255(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """pydicom's apply_windowing with an output range of exactly 0..255."""
    ds = Dataset()
    ds.PhotometricInterpretation, ds.BitsStored, ds.PixelRepresentation = "MONOCHROME2", 8, 0
    ds.WindowCenter, ds.WindowWidth = center, width
    return apply_windowing(values, ds).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "center", "width"),
    [
        ("CT_small.dcm", 40.0, 400.0),
        ("CT_small.dcm", 40.3, 399.7),
        ("MR_small.dcm", 600.0, 1600.0),
        ("MR_small.dcm", 2047.3, 4094.9),
        ("RG1_J2KI.dcm", 15000.0, 30000.0),
    ],
)
def test_linear_window_is_bit_identical_to_pydicom(name, center, width):
    ds = real(name)
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    reference = pydicom_linear_0_255(values, center, width)
    np.testing.assert_array_equal(pp.window(values, center, width), reference)


def test_linear_window_is_bit_identical_at_the_window_bounds():
    """Inputs on and next to both bounds of many windows, where a rounding slip would show."""
    rng = np.random.default_rng(7)
    centers = np.concatenate([rng.integers(-2000, 4000, 40), np.round(rng.uniform(-2000, 4000, 40), 1)])
    widths = np.concatenate([rng.integers(1, 4000, 40), np.round(rng.uniform(1, 4000, 40), 1)])
    fast = 0
    for center, width in zip(centers.tolist(), widths.tolist(), strict=True):
        c, w = center - 0.5, width - 1.0
        bounds = np.array([c - w / 2, c + w / 2])
        x = np.concatenate([bounds, np.nextafter(bounds, np.inf), np.nextafter(bounds, -np.inf), [c]])
        x = np.concatenate([x, rng.uniform(c - w, c + w, 200)])
        np.testing.assert_array_equal(pp.window(x, center, width), pydicom_linear_0_255(x, center, width))
        fast += pp._clip_is_exact(c, w, 0.0, 255.0) if w else 0
    assert fast >= 40  # the integer windows (at least) take the fast path


def test_a_window_proved_exact_takes_the_fast_path():
    assert pp._clip_is_exact(40.0 - 0.5, 400.0 - 1.0, 0.0, 255.0)
    assert pp._clip_is_exact(15000.0 - 0.5, 30000.0 - 1.0, 0.0, 255.0)


# ------------------------------------------------------------------------------------------------
# display_image windows as the steps do


def test_display_image_uses_the_same_voi_as_the_window_step():
    for ds in (sigmoid_ct(), real("vlut_04.dcm")):
        decoded = decode(copy.deepcopy(ds))
        shown = display_image(decoded)
        step = node_window(ds)
        np.testing.assert_array_equal(shown, np.clip(step, 0, 255).astype(np.uint8))
