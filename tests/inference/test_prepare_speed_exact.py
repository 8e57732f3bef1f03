"""The faster preparation (issue 16 item 1) gives what the code it replaces gives.

- ``reduce.area_reduce_clipped`` (rows averaged strip by strip with OpenCV's area weights, then
  OpenCV for the columns) against the code it replaces, ``cv2.resize(clip(float32(image)),
  INTER_AREA)``, and against a float64 truth: within float32 summation error (stated below), no
  less accurate than OpenCV; ``area_weights`` is OpenCV's table (checked through cv2 in float64).
- ``prepared.lookup`` (the display table chunk by chunk) is ``np.take``, bit for bit, and so is
  ``prepared._display_by_opencv`` (a header window in one OpenCV pass) wherever it is taken.
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
from node.inference import prepared
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


@pytest.mark.parametrize("lo, hi", [(-10.5, 5000.0), (0.0, 4095.0), (1.0, 4095.0), (0.0, 4094.5)])
def test_area_reduce_without_a_clip_is_the_same(lo: float, hi: float) -> None:
    """A window that spans the image skips the clip (exactly a no-op then), one that cuts a
    single extreme value does not."""
    rng = np.random.default_rng(7)
    image = rng.integers(0, 4096, (1000, 900)).astype(np.uint16)
    image[0, 0], image[-1, -1] = 0, 4095
    got = area_reduce_clipped(image, lo, hi, (100, 90))
    ref = _reference(image, lo, hi, (100, 90))
    ulp = float(np.spacing(np.float32(4096)))
    assert np.abs(got - ref).max() <= (ULPS + 20) * ulp
    if lo > 0 or hi < 4095:
        assert (
            got[0, 0] != area_reduce_clipped(image, -1.0, 5000.0, (100, 90))[0, 0]
            or got[-1, -1] != (area_reduce_clipped(image, -1.0, 5000.0, (100, 90))[-1, -1])
        )


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


def _windowed(values: np.ndarray, bits: int, center, width, **extra) -> dec.DecodedImage:
    ds = _native_dataset(values, bits, False)
    ds.WindowCenter, ds.WindowWidth = center, width
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    (frame,) = list(dec.iter_frames(ds))
    return frame


def _table_display(frame: dec.DecodedImage) -> np.ndarray:
    """The display through the table alone (the reference the OpenCV passes must equal)."""
    pixels = frame.frame(0)
    table = prepared._display_table(pixels.dtype, frame.header)
    assert table is not None
    return np.take(table, pixels)


WINDOWS = [
    # bits, center, width, extra attributes
    (12, 1549.9, 2423, {}),
    (12, 2551.8, 2423.7, {"PhotometricInterpretation": "MONOCHROME1"}),
    (
        16,
        40801.5,
        38400,
        {"PhotometricInterpretation": "MONOCHROME1", "RescaleSlope": 1, "RescaleIntercept": 0},
    ),
    (16, 24375.4, 37348.6, {}),
    (14, 6215, 9436.5, {}),
    (12, 300, 2, {}),  # a 1-grey-level-wide ramp
    (12, 100000, 50, {}),  # every value below the window
    (12, -5000, 50, {"PhotometricInterpretation": "MONOCHROME1"}),  # every value above it
    (12, 40, 400, {"RescaleSlope": 0.25, "RescaleIntercept": -1024}),
    (12, 1500, 1001, {"VOILUTFunction": "LINEAR_EXACT"}),
    (8, 127.5, 200, {}),
    (12, -700, 900, {"RescaleSlope": -1.5, "RescaleIntercept": 100}),  # a decreasing rescale
]


@pytest.mark.parametrize("bits, center, width, extra", WINDOWS)
def test_the_opencv_display_is_the_table(bits, center, width, extra) -> None:
    rng = np.random.default_rng(bits + int(width))
    dtype = np.uint8 if bits == 8 else np.uint16
    top = (1 << bits) - 1
    for trial in range(3):
        shape = (301 + trial, 517)
        values = rng.integers(0, top + 1, shape).astype(dtype)
        values[0, :64] = np.arange(64) * (top // 64)  # the whole range present
        frame = _windowed(values, bits, center, width, **extra)
        pixels = frame.frame(0)
        table = prepared._display_table(pixels.dtype, frame.header)
        assert table is not None
        shown = prepared.display_image(frame)
        assert shown.dtype == np.uint8 and np.array_equal(shown, np.take(table, pixels)), (trial, extra)


def test_the_opencv_display_is_taken_and_its_fixups_are_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Radiograph-like windows take the OpenCV passes (so the equality above is not vacuous),
    and values that round ambiguously in float32 are looked up: exact even with many of them."""
    monkeypatch.setattr(prepared, "_MAX_FIXUPS", 10**6)
    compares = []
    real = prepared.cv2.compare

    def counting(*args, **kwargs):
        compares.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepared.cv2, "compare", counting)
    taken = 0
    rng = np.random.default_rng(16)
    for bits, center, width, extra in WINDOWS:
        dtype = np.uint8 if bits == 8 else np.uint16
        values = rng.integers(0, (1 << bits), (257, 263)).astype(dtype)
        frame = _windowed(values, bits, center, width, **extra)
        pixels = frame.frame(0)
        table = prepared._display_table(pixels.dtype, frame.header)
        fast = prepared._display_by_opencv(pixels, frame.header, table)
        if fast is not None:
            taken += 1
            assert np.array_equal(fast, _table_display(frame)), (bits, center, width)
    assert taken >= len(WINDOWS) - 2
    assert compares, "some stored value should have needed the table (16-bit windows have several)"


@pytest.mark.parametrize(
    "center, width, extra",
    [
        (2048, 256, {}),  # y = v - 1920: every stored value's ramp is a whole number
        (2048, 256, {"PhotometricInterpretation": "MONOCHROME1"}),
        (2000, 255, {"VOILUTFunction": "LINEAR_EXACT"}),  # y = v - 1872.5: every one a half
        (1024.5, 512, {}),  # y = (v - 1024) / 511 * 255 + 127.5: whole every 511 values
    ],
)
def test_whole_number_ramps_need_no_look_up(monkeypatch: pytest.MonkeyPatch, center, width, extra) -> None:
    """Where the window puts stored values exactly on whole grey levels (a round-number window),
    the lifted rounding point keeps them off the tie: one OpenCV pass, no value looked up in the
    table, and still the table's display (with the point unlifted, the first two windows put
    every value on a tie and fell back to the whole look-up)."""
    compares = []
    real = prepared.cv2.compare
    monkeypatch.setattr(prepared.cv2, "compare", lambda *a, **k: (compares.append(1), real(*a, **k))[1])
    values = np.random.default_rng(7).integers(0, 4096, (211, 307)).astype(np.uint16)
    values[0, : 4096 // 16] = np.arange(0, 4096, 16)
    frame = _windowed(values, 12, center, width, **extra)
    pixels = frame.frame(0)
    table = prepared._display_table(pixels.dtype, frame.header)
    fast = prepared._display_by_opencv(pixels, frame.header, table)
    assert fast is not None
    assert np.array_equal(fast, _table_display(frame))
    assert not compares


def test_signed_or_lut_displays_keep_the_table() -> None:
    path = get_testdata_file("CT_small.dcm")  # signed
    (frame,) = list(dec.iter_frames(path))
    pixels = frame.frame(0)
    table = prepared._display_table(pixels.dtype, frame.header)
    assert prepared._display_by_opencv(pixels, frame.header, table) is None
    path = get_testdata_file("vlut_04.dcm")  # a VOI LUT Sequence
    (frame,) = list(dec.iter_frames(path))[:1]
    pixels = frame.frame(0)
    table = prepared._display_table(pixels.dtype, frame.header)
    if table is not None:
        assert prepared._display_by_opencv(pixels, frame.header, table) is None


def test_stored_range_is_shared_only_for_frames_that_cannot_change(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = dec.cv2.minMaxLoc

    def counting(arr):
        calls.append(1)
        return real(arr)

    monkeypatch.setattr(dec.cv2, "minMaxLoc", counting)
    values = (np.arange(40 * 100, dtype=np.uint16) % 4000).reshape(40, 100)
    (frame,) = list(dec.iter_frames(_native_dataset(values, 12, False)))  # one pass: the BitsStored check
    assert dec.stored_range(frame.frame(0)) == (0, 3999)
    assert dec.stored_range(frame.pixels[0]) == (0, 3999)  # another view of the same bytes
    assert len(calls) == 1
    writable = values.copy()
    assert dec.stored_range(writable) == (0, 3999)
    writable[3, 3] = 4095
    assert dec.stored_range(writable) == (0, 4095)  # a writable array is never taken from before
    signed = (values.astype(np.int16) - 2000)[:, ::2]
    assert dec.stored_range(signed) == (int(signed.min()), int(signed.max()))


def test_a_prepared_instance_leaves_no_frame_held(tmp_path: Path) -> None:
    """stored_range holds its frame (and so the file's pixel bytes): preparing an instance ends
    with it dropped, so that an instance's bytes never outlive its turn."""
    from node.inference.prepared import PrepareSpec, prepare_items
    from node.inference.registry import load_registry

    manifest = load_registry(Path(__file__).resolve().parents[2] / "models" / "onnx").get("cxr").manifest
    ds = _native_dataset((np.arange(300 * 280, dtype=np.uint16) % 4000).reshape(300, 280), 12, False)
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.3",
        "1.2.3.5",
    )
    ds.Modality = "CR"
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    (frame,) = prepare_items([path], PrepareSpec(manifest))
    assert frame.display is not None and frame.model_input is not None
    assert dec._last_range is None
