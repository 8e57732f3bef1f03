"""Colour decoding (issue 20): RGB, YBR_FULL, YBR_FULL_422 (native and JPEG baseline), planar
configuration 0 and 1, checked against pydicom's own raw decoding plus ``convert_color_space``,
on pydicom's and pydicom-data's real files and on the fundus / dermoscopy / smear headers."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import convert_color_space, pixel_array

from node.inference.decode import decode
from tests.colour import colour_dataset, picture

#: real colour files: (name, stored photometric interpretation, planar configuration)
REAL = [
    ("SC_rgb.dcm", "RGB", 0),
    ("color-px.dcm", "RGB", 0),
    ("color-pl.dcm", "RGB", 1),
    ("US1_UNCR.dcm", "RGB", 0),
    ("SC_ybr_full_uncompressed.dcm", "YBR_FULL", 0),
    ("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422", 0),
    ("SC_rgb_dcmtk_+eb+cy+n1.dcm", "YBR_FULL", 0),  # JPEG baseline, YBR_FULL
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", "YBR_FULL_422", 0),  # JPEG baseline, 4:2:2
    ("SC_rgb_jpeg_dcmtk.dcm", "YBR_FULL", 0),
    ("examples_ybr_color.dcm", "YBR_FULL_422", 0),  # JPEG baseline, 30 frames
]


def reference_rgb(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom without its colour conversion (``raw``), then ``convert_color_space`` to RGB."""
    raw = pixel_array(ds, raw=True)
    pi = str(ds.PhotometricInterpretation)
    return raw if pi == "RGB" else convert_color_space(raw, pi, "RGB")


@pytest.mark.parametrize(("name", "pi", "planar"), REAL, ids=[r[0] for r in REAL])
def test_real_colour_files_decode_to_pydicoms_rgb(name, pi, planar):
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"{name} is not in pydicom's test files or pydicom-data (pip install pydicom-data)")
    ds = pydicom.dcmread(path)
    assert (str(ds.PhotometricInterpretation), int(ds.get("PlanarConfiguration", 0))) == (pi, planar)
    img = decode(path)
    assert img.header.photometric_interpretation == "RGB"
    assert img.header.stored_photometric_interpretation == pi
    expected = reference_rgb(ds)
    if expected.ndim == 3:
        expected = expected[np.newaxis]
    assert img.pixels.shape == expected.shape and img.pixels.shape[-1] == 3
    assert img.pixels.dtype == np.uint8
    np.testing.assert_array_equal(img.pixels, expected)
    # and the conversion did happen: a YBR image's decoded values are not its stored luma/chroma
    if pi != "RGB":
        assert not np.array_equal(img.pixels, pixel_array(ds, raw=True).reshape(img.pixels.shape))


def test_planar_configurations_decode_alike():
    """color-pl (planar 1) and color-px (planar 0) hold the same picture."""
    pl = decode(get_testdata_file("color-pl.dcm")).pixels
    px = decode(get_testdata_file("color-px.dcm")).pixels
    np.testing.assert_array_equal(pl, px)


@pytest.mark.parametrize("kind", ["fundus", "derm", "smear"])
@pytest.mark.parametrize(
    ("encoding", "planar", "tolerance"),
    [
        ("RGB", 0, 0),
        ("RGB", 1, 0),
        ("YBR_FULL", 0, 1),
        ("YBR_FULL", 1, 1),
        ("YBR_FULL_422", 0, None),
        ("JPEG", 0, None),
    ],
)
def test_the_three_kinds_in_each_encoding(kind, encoding, planar, tolerance):
    """Each phantom header in each encoding: equal to pydicom's own RGB; RGB exactly the picture,
    YBR_FULL within the rounding of its conversion, 4:2:2 and JPEG close to it on average."""
    original = picture(kind)
    ds = colour_dataset(kind, original, encoding=encoding, planar=planar)
    img = decode(ds)
    assert img.header.photometric_interpretation == "RGB" and img.header.modality == ds.Modality
    got = img.pixels[0]
    np.testing.assert_array_equal(got, reference_rgb(ds))
    error = np.abs(got.astype(int) - original)
    if tolerance is not None:
        assert error.max() <= tolerance
    else:  # chroma subsampled (and JPEG quantised): colours near the picture's, channels in order
        assert error.mean() < 6
        assert np.allclose(got.reshape(-1, 3).mean(axis=0), original.reshape(-1, 3).mean(axis=0), atol=3)
