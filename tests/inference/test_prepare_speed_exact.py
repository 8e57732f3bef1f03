"""The faster preparation (issue 16 item 1) gives what the code it replaces gives.

- ``reduce.area_reduce_clipped`` (rows averaged strip by strip with OpenCV's area weights, then
  OpenCV for the columns) against the code it replaces, ``cv2.resize(clip(float32(image)),
  INTER_AREA)``, and against a float64 truth: within float32 summation error (stated below), no
  less accurate than OpenCV; ``area_weights`` is OpenCV's table (checked through cv2 in float64).
- ``prepared.lookup`` (the display table chunk by chunk) is ``np.take``, bit for bit.
- ``decode._native_frame`` (native little-endian greyscale as a view of the file's bytes) is
  pydicom's ``pixel_array``, bit for bit, dtype included, and leaves to pydicom every frame with
  bits set above BitsStored.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.inference import decode as dec
from node.inference.prepared import lookup
from node.inference.reduce import area_reduce_clipped, area_weights

#: area averages may differ from OpenCV's by float32 summation order: this many float32 ulps of
#: the largest clipped value, plus one per source pixel a cell spans along each axis (measured on
#: 2500 x 2048 radiographs: <= 10 ulps, 2.4e-3 stored units out of 4000)
ULPS = 16


def _reference(image: np.ndarray, lo: float, hi: float, target: tuple[int, int]) -> np.ndarray:
    """The code area_reduce_clipped replaces (reduce_early before issue 16's second pass)."""
    clipped = image.astype(np.float32)
    np.clip(clipped, np.float32(lo), np.float32(hi), out=clipped)
    return cv2.resize(clipped, (target[1], target[0]), interpolation=cv2.INTER_AREA)


def _truth(image: np.ndarray, lo: float, hi: float, target: tuple[int, int]) -> np.ndarray:
    """The same area average in float64 (dense weight matrices)."""

    def matrix(n: int, d: int) -> np.ndarray:
        m = np.zeros((d, n))
        for i, (a, b, w) in enumerate(area_weights(n, d)):
            m[i, a:b] = w
        return m

    values = np.clip(image.astype(np.float64), lo, hi)
    return matrix(image.shape[0], target[0]) @ values @ matrix(image.shape[1], target[1]).T


@pytest.mark.parametrize(
    "shape, target, dtype",
    [
        ((2500, 2048), (224, 184), np.uint16),  # a radiograph letterboxed to 224
        ((2140, 1760), (224, 184), np.uint16),
        ((1000, 800), (128, 102), np.int16),  # signed
        ((1024, 1024), (128, 128), np.uint16),  # integer factor (OpenCV's fast path)
        ((600, 301), (600, 100), np.uint16),  # rows kept as they are
        ((500, 300), (250, 300), np.uint8),  # columns kept as they are
        ((4000, 300), (13, 7), np.uint16),  # cells longer than one strip
        ((257, 259), (255, 258), np.uint16),  # barely reduced: fractional cells everywhere
    ],
)
def test_area_reduce_is_the_opencv_average(shape, target, dtype) -> None:
    rng = np.random.default_rng(sum(shape))
    info = np.iinfo(dtype)
    top = min(int(info.max), 4095) if dtype != np.int16 else 2047
    bottom = 0 if info.min == 0 else -2048
    # smooth content plus noise: realistic cells, not only white noise
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    base = (top - bottom) * (0.5 + 0.4 * np.sin(yy / 97.0) * np.cos(xx / 61.0)) + bottom
    image = np.clip(base + rng.normal(0, 40, shape), bottom, top).astype(dtype)
    lo, hi = bottom + 0.37 * (top - bottom), bottom + 0.81 * (top - bottom) + 0.5
    got = area_reduce_clipped(image, lo, hi, target)
    ref = _reference(image, lo, hi, target)
    truth = _truth(image, lo, hi, target)
    assert got.dtype == np.float32 and got.shape == target
    ulp = float(np.spacing(np.float32(max(abs(lo), abs(hi)))))
    # float32 sums of n terms: errors grow with n (the cell's length along each axis)
    terms = shape[0] / target[0] + shape[1] / target[1]
    assert np.abs(got - ref).max() <= (ULPS + terms) * ulp, float(np.abs(got - ref).max())
    # no less accurate than the OpenCV path it replaces (a margin of 2 ulps for ties)
    assert np.abs(got - truth).max() <= np.abs(ref - truth).max() + 2 * ulp


def test_area_reduce_of_a_constant_clip_is_that_constant() -> None:
    image = np.arange(300 * 200, dtype=np.uint16).reshape(300, 200) % 1000
    got = area_reduce_clipped(image, 5000.25, 5000.25, (30, 20))
    assert np.allclose(got, 5000.25, rtol=0, atol=float(np.spacing(np.float32(5000.25))) * 4)


@pytest.mark.parametrize(
    "ssize, dsize", [(2500, 224), (2048, 184), (1760, 184), (1000, 333), (64, 64), (9, 4)]
)
def test_area_weights_are_opencvs(ssize: int, dsize: int) -> None:
    """A float64 resize by OpenCV (its weights, double sums) of an image of independent random
    rows equals the weights applied in float64: the same table."""
    rng = np.random.default_rng(ssize * dsize)
    image = rng.random((ssize, 3))
    got = cv2.resize(image, (3, dsize), interpolation=cv2.INTER_AREA)
    mine = np.zeros((dsize, 3))
    for i, (a, b, w) in enumerate(area_weights(ssize, dsize)):
        mine[i] = w.astype(np.float64) @ image[a:b]
    assert np.abs(got - mine).max() < 1e-9


@pytest.mark.parametrize("size", [0, 1, 1000, (1 << 18) - 1, 1 << 18, (1 << 18) * 3 + 17])
def test_lookup_is_take(size: int) -> None:
    rng = np.random.default_rng(size)
    table = rng.integers(0, 256, 65536).astype(np.uint8)
    indices = rng.integers(0, 65536, size).astype(np.uint16)
    got = lookup(table, indices)
    assert got.dtype == np.uint8 and got.shape == indices.shape
    assert np.array_equal(got, np.take(table, indices))
    square = rng.integers(0, 65536, (301, 513)).astype(np.uint16)
    assert np.array_equal(lookup(table, square), np.take(table, square))
    strided = square[::2, 1::3]  # not contiguous
    assert np.array_equal(lookup(table, strided), np.take(table, strided))


def _native_dataset(
    values: np.ndarray,
    bits_stored: int,
    signed: bool,
    ts=ExplicitVRLittleEndian,
    raw: bytes | None = None,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = values.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    order = ">" if ts == ExplicitVRBigEndian else "<"
    data = raw if raw is not None else values.astype(values.dtype.newbyteorder(order)).tobytes()
    ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
    return ds


CASES = [
    ("12 in 16, unsigned", np.arange(0, 4096, dtype=np.uint16)[:4000].reshape(40, 100), 12, False),
    ("16 in 16, unsigned", np.arange(0, 65536, 7, dtype=np.uint16)[:9000].reshape(90, 100), 16, False),
    ("12 in 16, signed", (np.arange(4000, dtype=np.int16) - 2048).reshape(40, 100), 12, True),
    (
        "16 in 16, signed",
        (np.arange(9000, dtype=np.int32) * 7 - 32768).astype(np.int16).reshape(90, 100),
        16,
        True,
    ),
    ("8 bits, odd length", (np.arange(35 * 33) % 256).astype(np.uint8).reshape(35, 33), 8, False),
    ("7 in 8, signed", (np.arange(35 * 33) % 128 - 64).astype(np.int8).reshape(35, 33), 7, True),
]


@pytest.mark.parametrize("what, values, bits, signed", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_native_frames_are_pydicoms(what, values, bits, signed, ts) -> None:
    ds = _native_dataset(values, bits, signed, ts)
    header, uid = dec._checked(ds, dec.DEFAULT_BUDGET)
    got = dec._native_frame(ds, header, uid, 0)
    ref = pixel_array(ds)
    assert got is not None, what
    assert got.dtype == ref.dtype and got.shape == ref.shape and np.array_equal(got, ref), what
    assert np.array_equal(got, values)
    (frame,) = list(dec.iter_frames(ds))
    assert frame.pixels.dtype == ref.dtype and np.array_equal(frame.frame(0), ref)


@pytest.mark.parametrize(
    "what, values, bits, signed",
    [
        ("unsigned 12-bit with high bits set", np.array([[0xF123, 5], [4095, 0x1000]], np.uint16), 12, False),
        (
            "signed 12-bit, a stored value with its sign bit but no extension",
            np.array([[2048, -5]], np.int16),
            12,
            True,
        ),
        ("signed 12-bit beyond the range", np.array([[-2049, 7]], np.int16), 12, True),
        ("unsigned 7 in 8 with bit 7 set", np.array([[200, 3]], np.uint8), 7, False),
    ],
)
def test_frames_with_bits_above_bits_stored_go_to_pydicom(what, values, bits, signed) -> None:
    ds = _native_dataset(values, bits, signed)
    header, uid = dec._checked(ds, dec.DEFAULT_BUDGET)
    assert dec._native_frame(ds, header, uid, 0) is None, what
    (frame,) = list(dec.iter_frames(ds))
    ref = pixel_array(ds)
    assert frame.pixels.dtype == ref.dtype and np.array_equal(frame.frame(0), ref), what
    assert not np.array_equal(ref, values)  # pydicom did correct them: the case is a real one


def test_big_endian_and_other_layouts_go_to_pydicom() -> None:
    values = np.arange(4000, dtype=np.uint16).reshape(40, 100)
    ds = _native_dataset(values, 16, False, ExplicitVRBigEndian)
    header, uid = dec._checked(ds, dec.DEFAULT_BUDGET)
    assert dec._native_frame(ds, header, uid, 0) is None
    (frame,) = list(dec.iter_frames(ds))
    assert np.array_equal(frame.frame(0), values)


def test_real_files_decode_as_pydicom_does() -> None:
    """Every single-frame file of pydicom's and pydicom-data's the fast path takes."""
    names = [
        "RG1_UNCR.dcm",  # CR, MONOCHROME1, 15 bits of 16
        "RG3_UNCI.dcm",
        "CT_small.dcm",  # signed
        "MR_small.dcm",
        "mlut_18.dcm",
        "vlut_04.dcm",
        "rtdose_1frame.dcm",
        "OBXXXX1A.dcm",
    ]
    taken = 0
    for name in names:
        path = get_testdata_file(name)
        if path is None:
            continue
        ds = pydicom.dcmread(path)
        header, uid = dec._checked(ds, dec.DEFAULT_BUDGET)
        if header.number_of_frames != 1:
            continue
        got = dec._native_frame(ds, header, uid, 0)
        if got is None:
            continue
        taken += 1
        ref = pixel_array(ds)
        assert got.dtype == ref.dtype and np.array_equal(got, ref), name
        (frame,) = list(dec.iter_frames(Path(path)))
        assert np.array_equal(frame.frame(0), ref), name
    assert taken >= 4


def test_native_frames_are_read_only_views() -> None:
    """Nothing downstream may write into them: a write would change the data set's bytes."""
    ds = _native_dataset(np.arange(100, dtype=np.uint16).reshape(10, 10), 16, False)
    (frame,) = list(dec.iter_frames(ds))
    assert not frame.pixels.flags.writeable
    with pytest.raises(ValueError):
        frame.pixels[0, 0, 0] = 1
