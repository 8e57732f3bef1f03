"""HTJ2K (High-Throughput JPEG 2000) frames decoded at a reduced resolution (issue 16 item 1), with
real codestreams written by OpenJPH (itkwasm-htj2k: OpenJPH built for WebAssembly), as
test_decode_reduced.py does for JPEG 2000 written by OpenJPEG.

Files: HTJ2KLossless (.201), HTJ2KLosslessRPCL (.202, RPCL progression) and HTJ2K (.203,
irreversible 9/7) from a full-size chest phantom (12-bit unsigned, MONOCHROME1) and from pydicom's
test files (CT/MR signed 16-bit, a 12-bit MR, a 10-bit CR, an 8-bit image and a 10-frame MR).

References and tolerances:

- lossless: pydicom's full decode is the source, bit for bit (the files are right);
- lossless, reduced: bit for bit what the JPEG 2000 path gives for the same pixels (the same
  reversible 5/3 wavelet, one tile, so the same low-pass image), which itself is held to the area
  average within 5 % of the range on smooth images (test_decode_reduced.py), mirrored here;
- lossy, reduced: the lossless reduced image within the quantisation's own error (stated below);
- the node's path (``prepare_frames`` for the chest model with ``decode_reduced``): the model
  input from the HTJ2K file equals the one from the JPEG 2000 file bit for bit, and the
  uncompressed original's within test_decode_reduced.py's MAX_GREY / MEAN_GREY.

OpenJPH writes the precision of the integer type (16 for 12-bit data in uint16) where the data
set says BitsStored 12: pydicom then gives the decoder's values unchanged, and so does the
reduced decode (node/inference/decode.py ``_pillow_reduced``).

Pillow 13 (OpenJPEG 2.5) sizes a reduced image ``(size + 2**(k-1)) // 2**k`` where OpenJPEG
makes ``ceil(size / 2**k)``, and refuses the level where they differ (2500 rows at 1/16, 257
columns at 1/4): the node then tries the level below, as for JPEG 2000.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import UID

from node.inference.codestream import frame_claim, j2k_levels
from node.inference.decode import iter_frames, iter_frames_reduced
from node.inference.manifest import Manifest
from node.inference.reduce import decode_reduction, prepare_frames
from node.inference.registry import load_registry
from node.synth import generate_study

from .test_decode_reduced import MAX_GREY, MEAN_GREY
from .test_reduce import _grey_scale

htj2k = pytest.importorskip("itkwasm_htj2k", reason="itkwasm-htj2k (dev extra) writes the HTJ2K files")
itkwasm = pytest.importorskip("itkwasm")

REPO = Path(__file__).resolve().parents[2]
LOSSLESS = (pydicom.uid.HTJ2KLossless, pydicom.uid.HTJ2KLosslessRPCL)
RPCL = 2  # OpenJPH's progression order numbers: 0 LRCP, 1 RLCP, 2 RPCL, 3 PCRL, 4 CPRL
#: .203 (irreversible 9/7) at OpenJPH's quantisation step 1e-4 (of the codestream's 16-bit range):
#: the full decode is the source within this fraction of the image's range (measured <= 2.6 %)
LOSSY_STEP = 1e-4
LOSSY_FULL = 0.03


def _codestream(frame: np.ndarray, levels: int = 5, *, lossy: bool = False, progression: int = RPCL) -> bytes:
    """One greyscale frame as an OpenJPH HTJ2K codestream, one tile (as OpenJPEG writes JPEG 2000)."""
    rows, cols = frame.shape
    image = itkwasm.Image(
        itkwasm.ImageType(dimension=2, componentType=frame.dtype.name, pixelType="Scalar", components=1),
        size=[cols, rows],
        data=np.ascontiguousarray(frame),
    )
    return bytes(
        htj2k.encode(
            image,
            decompositions=levels,
            not_reversible=lossy,
            quantization_step=LOSSY_STEP if lossy else 1,
            progression_order=progression,
            tile_size=[cols, rows],
            tile_offset=[0, 0],
            block_dimensions=[64, 64],
        )
    )


def _with_frames(template: Dataset, ts: UID, codestreams: list[bytes]) -> Dataset:
    """``template`` with its pixel data replaced by ``codestreams`` (encapsulated, one per frame)."""
    ds = copy.deepcopy(template)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate(codestreams)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if len(codestreams) > 1:
        ds.NumberOfFrames = len(codestreams)
    if ts == pydicom.uid.HTJ2K:
        ds.LossyImageCompression = "01"
    return ds


def _frames(ds: Dataset) -> list[np.ndarray]:
    arr = ds.pixel_array
    return list(arr) if int(ds.get("NumberOfFrames", 1)) > 1 else [arr]


def _htj2k(source: Dataset, ts: UID, levels: int = 5) -> Dataset:
    lossy, progression = ts == pydicom.uid.HTJ2K, RPCL if ts == pydicom.uid.HTJ2KLosslessRPCL else 1
    return _with_frames(
        source, ts, [_codestream(f, levels, lossy=lossy, progression=progression) for f in _frames(source)]
    )


def _j2k(source: Dataset) -> Dataset:
    ds = copy.deepcopy(source)
    ds.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


def _eight_bit() -> Dataset:
    """MR2_UNCR's 12-bit values as an 8-bit image (its top 8 bits)."""
    ds = pydicom.dcmread(get_testdata_file("MR2_UNCR.dcm"))
    arr = (ds.pixel_array >> 4).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = arr.tobytes()
    return ds


@pytest.fixture(scope="module")
def sources() -> dict[str, Dataset]:
    """Uncompressed originals: a full-size chest phantom and pydicom's test files."""
    out = Path(tempfile.mkdtemp(prefix="htj2k-"))
    generate_study("cxr", out / "cxr", 1, None, write_masks=False)
    found = {"cxr": pydicom.dcmread(sorted((out / "cxr").glob("**/*.dcm"))[0])}
    for name, file in (
        ("ct-signed16", "CT_small.dcm"),
        ("mr-signed16", "MR_small.dcm"),
        ("mr-12bit", "MR2_UNCR.dcm"),
        ("cr-10bit", "RG3_UNCR.dcm"),
        ("mr-12bit-10frames", "emri_small.dcm"),
    ):
        found[name] = pydicom.dcmread(get_testdata_file(file))
    found["mr-8bit"] = _eight_bit()
    return found


SOURCES = ["cxr", "ct-signed16", "mr-signed16", "mr-12bit", "cr-10bit", "mr-12bit-10frames", "mr-8bit"]


def test_the_sources_cover_the_depths_and_signs(sources):
    seen = {
        (int(ds.BitsStored), int(ds.PixelRepresentation), int(ds.get("NumberOfFrames", 1)) > 1)
        for ds in sources.values()
    }
    assert {(12, 0, False), (16, 1, False), (10, 0, False), (8, 0, False), (12, 0, True)} <= seen


@pytest.mark.parametrize("ts", LOSSLESS, ids=["201", "202"])
@pytest.mark.parametrize("name", SOURCES)
def test_lossless_files_decode_to_the_source_pixels(sources, name, ts):
    source = sources[name]
    ds = _htj2k(source, ts)
    head = get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames", 1)))
    claim = frame_claim(ts, head)
    assert claim is not None and (claim.rows, claim.cols) == (source.Rows, source.Columns)
    assert claim.signed == bool(source.PixelRepresentation)
    assert j2k_levels(head) == 5
    cap = 4 + int.from_bytes(head[4:6], "big")  # HTJ2K's CAP marker segment follows SIZ
    assert head[cap : cap + 2] == b"\xff\x50"
    if ts == pydicom.uid.HTJ2KLosslessRPCL:
        cod = head.find(b"\xff\x52")
        assert head[cod + 5] == RPCL
    assert np.array_equal(ds.pixel_array, source.pixel_array)


def _reduced(ds: Dataset, k: int) -> list[tuple[np.ndarray, int]]:
    return [(image.pixels[0], got) for image, got in iter_frames_reduced(ds, k)]


@pytest.mark.parametrize("ts", LOSSLESS, ids=["201", "202"])
@pytest.mark.parametrize("name", SOURCES)
def test_reduced_is_the_jpeg_2000_reduced_decode_bit_for_bit(sources, name, ts):
    """Every depth and sign reduces (k as asked: every size here divides as Pillow needs at 1/4),
    to ceil(rows/4) x ceil(cols/4), the dtype pydicom gives, and the values OpenJPEG's JPEG 2000
    path gives for the same pixels."""
    source = sources[name]
    got = _reduced(_htj2k(source, ts), 2)
    reference = _reduced(_j2k(source), 2)
    assert len(got) == len(reference) == int(source.get("NumberOfFrames", 1))
    for (small, k), (expected, k_j2k) in zip(got, reference, strict=True):
        assert k == k_j2k == 2
        assert small.shape == (-(-source.Rows // 4), -(-source.Columns // 4))
        assert small.dtype == source.pixel_array.dtype
        assert np.array_equal(small, expected)


def _area_distance(small: np.ndarray, frame: np.ndarray) -> float:
    """Mean |reduced - INTER_AREA average| over the frame's range of values."""
    full = frame.astype(np.float32)
    area = cv2.resize(full, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_AREA)
    return float(np.abs(small.astype(np.float32) - area).mean()) / float(full.max() - full.min())


@pytest.mark.parametrize("name", ["cxr", "ct-signed16", "mr-12bit", "cr-10bit"])
def test_reduced_is_near_the_area_average(sources, name):
    """test_decode_reduced.py's bound (5 % of the range), taken on the mean here: on real images
    the 5/3 low pass is half a pixel off and sharper than an area average at edges (measured mean
    0.4-2.7 %, max up to 40 % at edges), and values stay in BitsStored's range (the 10-bit CR's
    edges overshoot 1023 where the codestream's precision is 16)."""
    source = sources[name]
    ((small, k),) = _reduced(_htj2k(source, pydicom.uid.HTJ2KLossless), 2)
    assert k == 2 and _area_distance(small, source.pixel_array) <= 0.05
    bits = int(source.BitsStored)
    if source.PixelRepresentation:
        assert -(2 ** (bits - 1)) <= int(small.min()) and int(small.max()) < 2 ** (bits - 1)
    else:
        assert int(small.max()) < 2**bits


def test_smooth_images_of_every_depth_within_the_jpeg_2000_tolerance():
    """test_decode_reduced.py's smooth image and bound (5 % of the range against INTER_AREA)."""
    from pydicom.dataset import FileMetaDataset

    rows, cols = 400, 300
    y, x = np.mgrid[0:rows, 0:cols]
    for dtype, bits in (("int16", 12), ("uint16", 16), ("uint16", 12), ("uint8", 8)):
        top = 2 ** (bits - 1) if dtype.startswith("int") else 2**bits
        smooth = (np.sin(y / 40.0) * np.cos(x / 30.0) * 0.45 + 0.5) * (top - 1)
        if dtype.startswith("int"):
            smooth = smooth * 2 - (top - 1)
        arr = smooth.astype(dtype)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated = 8 if bits == 8 else 16
        ds.BitsStored, ds.HighBit = bits, bits - 1
        ds.PixelRepresentation = 1 if dtype.startswith("int") else 0
        ds = _with_frames(ds, pydicom.uid.HTJ2KLossless, [_codestream(arr)])
        assert np.array_equal(ds.pixel_array, arr)
        ((small, k),) = _reduced(ds, 2)
        assert k == 2 and small.dtype == arr.dtype
        expected = cv2.resize(arr.astype(np.float32), (cols // 4, rows // 4), interpolation=cv2.INTER_AREA)
        assert np.abs(small.astype(np.float32) - expected).max() <= 0.05 * (top - 1), (dtype, bits)


@pytest.mark.parametrize("name", ["cxr", "ct-signed16", "cr-10bit", "mr-12bit", "mr-12bit-10frames"])
def test_lossy_reduced_is_as_near_the_area_average_as_the_lossless(sources, name):
    """.203 (irreversible 9/7): its full decode is the source within the quantisation, and its
    reduced image (the 9/7 low pass, not the 5/3's) is no farther from the area average than
    the lossless reduction that the JPEG 2000 path uses (measured mean: 0.4-6.6 % of the range
    against 0.4-9.5 %)."""
    source = sources[name]
    lossy = _htj2k(source, pydicom.uid.HTJ2K)
    frames = _frames(source)
    span = float(source.pixel_array.max()) - float(source.pixel_array.min())
    full = lossy.pixel_array
    assert full.shape == source.pixel_array.shape and full.dtype == source.pixel_array.dtype
    error = np.abs(full.astype(np.float64) - source.pixel_array).max() / span
    assert 0 < error <= LOSSY_FULL, error
    got = _reduced(lossy, 2)
    lossless = _reduced(_htj2k(source, pydicom.uid.HTJ2KLossless), 2)
    assert len(got) == len(frames)
    for (small, k), (reference, _), frame in zip(got, lossless, frames, strict=True):
        assert k == 2 and small.shape == reference.shape and small.dtype == reference.dtype
        assert _area_distance(small, frame) <= 1.1 * _area_distance(reference, frame)


def test_never_more_levels_than_the_codestream_has(sources):
    source = sources["mr-12bit"]  # 1024 x 1024: every level divides
    for levels in (1, 2, 3):
        ds = _htj2k(source, pydicom.uid.HTJ2KLossless, levels=levels)
        assert j2k_levels(get_frame(ds.PixelData, 0, number_of_frames=1)) == levels
        ((small, k),) = _reduced(ds, 9)
        assert k == levels
        assert small.shape == (1024 >> levels, 1024 >> levels)


def test_a_level_pillow_sizes_wrongly_steps_down_to_the_one_below(sources):
    """2500 rows at 1/16: Pillow makes 156 rows, OpenJPEG 157, and Pillow refuses; 1/8 works."""
    source = sources["cxr"]
    assert source.Rows == 2500
    ds = _htj2k(source, pydicom.uid.HTJ2KLossless)
    ((small, k),) = _reduced(ds, 4)
    assert k == 3 and small.shape == (313, 256)
    ((expected, k_j2k),) = _reduced(_j2k(source), 4)
    assert k_j2k == 3 and np.array_equal(small, expected)
    # a frame with 257 columns can only be halved
    crop = copy.deepcopy(sources["mr-12bit"])
    arr = np.ascontiguousarray(crop.pixel_array[:300, :257])
    crop.Rows, crop.Columns, crop.PixelData = 300, 257, arr.tobytes()
    ((small, k),) = _reduced(_htj2k(crop, pydicom.uid.HTJ2KLossless), 3)
    assert k == 1 and small.shape == (150, 129)


def _full(ds: Dataset) -> list[np.ndarray]:
    return [image.pixels[0] for image in iter_frames(ds)]


def test_a_frame_pillow_cannot_decode_falls_back_to_the_full_decode(sources, monkeypatch, caplog):
    """OpenJPEG before 2.5 has no HTJ2K decoder and Pillow then raises: the frame is decoded by
    pydicom in full (k = 0), the same pixels as iter_frames, said at debug."""
    from PIL import Image

    ds = _htj2k(sources["ct-signed16"], pydicom.uid.HTJ2KLossless)

    def refuse(*args, **kwargs):
        raise OSError("cannot identify image file")

    monkeypatch.setattr(Image, "open", refuse)
    with caplog.at_level(logging.DEBUG, logger="node.inference.decode"):
        ((small, k),) = _reduced(ds, 2)
    assert k == 0 and np.array_equal(small, sources["ct-signed16"].pixel_array)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("not possible here (OSError)" in m for m in messages), messages
    assert any("full decode" in m for m in messages), messages


def test_a_sign_the_codestream_contradicts_keeps_pydicom_s_correction(sources, caplog):
    """Unsigned data written as signed samples: pydicom corrects the sign, so the reduced decode
    is not used (k = 0) and the frame is pydicom's full decode."""
    source = sources["mr-12bit"]
    signed = source.pixel_array.astype(np.int16)  # 12-bit values < 2**11 read the same either way
    assert signed.max() < 2**15
    ds = _with_frames(source, pydicom.uid.HTJ2KLossless, [_codestream(signed)])
    with caplog.at_level(logging.DEBUG, logger="node.inference.decode"):
        ((small, k),) = _reduced(ds, 2)
    assert k == 0 and np.array_equal(small, _full(ds)[0])
    assert any("full decode" in r.getMessage() for r in caplog.records)


def test_multi_frame_each_frame_reduced(sources):
    """Ten frames in one encapsulated file: each reduced to 1/8 (8 x 8), the JPEG 2000 path's
    frames bit for bit (lossless)."""
    source = sources["mr-12bit-10frames"]
    reference = _reduced(_j2k(source), 3)
    for ts in (*LOSSLESS, pydicom.uid.HTJ2K):
        ds = _htj2k(source, ts)
        full = _full(ds)
        got = _reduced(ds, 3)
        assert len(got) == len(full) == 10
        for (small, k), frame in zip(got, full, strict=True):
            assert k == 3 and small.shape == (8, 8) and small.dtype == frame.dtype
        if ts != pydicom.uid.HTJ2K:
            assert all(np.array_equal(a, b) for a, b in zip(full, source.pixel_array, strict=True))
            assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(got, reference, strict=True))


@pytest.fixture(scope="module")
def registry():
    return load_registry(REPO / "models" / "onnx", strict=True)


def _on(manifest: Manifest) -> Manifest:
    data = manifest.model_dump(mode="json")
    data["decode_reduced"] = True
    return Manifest.model_validate(data)


def _one(ds: Dataset, manifest: Manifest):
    ((decoded, model_input),) = list(prepare_frames(ds, manifest, check_size=False))
    return decoded, model_input


@pytest.mark.parametrize("ts", [*LOSSLESS, pydicom.uid.HTJ2K], ids=["201", "202", "203"])
def test_the_node_prepares_the_chest_model_from_htj2k_as_from_jpeg_2000(registry, sources, ts):
    """The chest model reduces early (decode_reduction: 1/16 asked for 2500 x 2048; Pillow gives
    1/8): its input from the HTJ2K file is the JPEG 2000 file's bit for bit (lossless) and the
    uncompressed original's within MAX_GREY / MEAN_GREY (measured: max 20.8 / 21.0 grey levels,
    mean 1.14 / 1.13 for .201 / .203); the geometry is the JPEG 2000 path's."""
    manifest = _on(registry.models["cxr"].manifest)
    source = sources["cxr"]
    assert decode_reduction(manifest.preprocessing, (source.Rows, source.Columns)) == 4
    decoded, small = _one(_htj2k(source, ts), manifest)
    assert decoded.pixels.shape[1:] == (313, 256), "the reduced path should run"
    _, j2k = _one(_j2k(source), manifest)
    _, original = _one(source, registry.models["cxr"].manifest)
    unit = _grey_scale(manifest)
    if ts != pydicom.uid.HTJ2K:
        assert np.array_equal(small.tensor, j2k.tensor)
    diff = np.abs(original.tensor - small.tensor) / unit
    assert diff.max() <= MAX_GREY and diff.mean() <= MEAN_GREY, (float(diff.max()), float(diff.mean()))
    assert small.geometry == j2k.geometry


def test_the_levels_pillow_sizes_wrongly_are_the_ones_it_refuses():
    """decode._pillow_can_reduce (the levels not tried) is Pillow's behaviour: each (size, level)
    it rules out fails in Pillow and each it allows decodes, for HTJ2K and JPEG 2000 alike. A
    Pillow that sizes as OpenJPEG does fails here: then the rule should go."""
    import io

    from PIL import Image
    from pydicom.encaps import generate_frames

    from node.inference.decode import _pillow_can_reduce

    def decodes(codestream: bytes, k: int) -> bool:
        try:
            with Image.open(io.BytesIO(codestream)) as im:
                im.reduce = k
                im.load()
        except OSError:
            return False
        return True

    for rows in (64, 65, 66, 67, 97, 100, 113, 130):
        frame = (np.arange(rows * 64).reshape(rows, 64) % 3000).astype(np.uint16)
        ds = Dataset()
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, 64, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = frame.tobytes()
        ds.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
        (j2k,) = generate_frames(ds.PixelData, number_of_frames=1)
        for codestream in (_codestream(frame), j2k):
            for k in range(1, 6):
                assert decodes(codestream, k) == _pillow_can_reduce(rows, 64, k), (rows, k)
