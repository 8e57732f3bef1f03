"""Pixel decoding over pydicom's bundled test files (every transfer syntax) and the refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.data import get_testdata_file

from node.errors import DecodeError
from node.inference.decode import decode, header_from_dataset, slice_order, supported_transfer_syntaxes
from node.types import ImageHeader

from .conftest import DATA


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)  # never reach for the network
    if path is None:
        pytest.skip(f"{name} is not bundled with this pydicom")
    return str(path)


@pytest.fixture(scope="module")
def mr_reference() -> np.ndarray:
    return decode(bundled("MR_small.dcm")).pixels


MR_VARIANTS = {
    "MR_small_implicit.dcm": uid.ImplicitVRLittleEndian,
    "MR_small_bigendian.dcm": uid.ExplicitVRBigEndian,
    "MR_small_expb.dcm": uid.ExplicitVRBigEndian,
    "MR_small_jpeg_ls_lossless.dcm": uid.JPEGLSLossless,
    "MR_small_jp2klossless.dcm": uid.JPEG2000Lossless,
    "MR_small_RLE.dcm": uid.RLELossless,
}


@pytest.mark.parametrize("name", sorted(MR_VARIANTS))
def test_mr_small_variants_decode_to_the_same_pixels(name, mr_reference):
    img = decode(bundled(name))
    assert img.header.transfer_syntax_uid == MR_VARIANTS[name]
    assert img.pixels.dtype.isnative
    assert img.pixels.shape == (1, 64, 64)
    np.testing.assert_array_equal(img.pixels, mr_reference)


def test_htj2k_fixture_decodes_to_mr_small(mr_reference):
    img = decode(DATA / "MR_small_htj2k.dcm")
    assert img.header.transfer_syntax_uid == uid.HTJ2KLossless
    np.testing.assert_array_equal(img.pixels, mr_reference)


def test_reference_values_and_header(mr_reference):
    assert mr_reference.dtype == np.int16
    assert (int(mr_reference.min()), int(mr_reference.max())) == (127, 2145)
    h = decode(bundled("MR_small.dcm")).header
    assert (h.window_center, h.window_width) == (600.0, 1600.0)
    assert h.pixel_spacing == (0.3125, 0.3125)
    assert h.modality == "MR" and h.rows == 64 and h.cols == 64 and h.number_of_frames == 1
    assert h.stored_value_range == (-32768.0, 32767.0)


def test_ct_small_header():
    img = decode(Path(bundled("CT_small.dcm")))
    h = img.header
    assert (h.rescale_slope, h.rescale_intercept) == (1.0, -1024.0)
    assert h.image_position_patient == pytest.approx((-158.135803, -179.035797, -75.699997))
    assert h.instance_number == 1
    assert h.sop_instance_uid.startswith("1.3.6.1.4.1.5962")
    assert h.series_instance_uid and h.study_instance_uid
    assert img.pixels.shape == (1, 128, 128)


def test_deflated():
    img = decode(bundled("image_dfl.dcm"))
    assert img.header.transfer_syntax_uid == uid.DeflatedExplicitVRLittleEndian
    assert img.pixels.shape == (1, 512, 512) and img.pixels.dtype == np.uint8


def test_jpeg_extended_and_jpeg2000_same_nm_image():
    ext = decode(bundled("JPGExtended.dcm"))  # JPEG Extended, 12 bit
    j2k = decode(bundled("JPEG2000.dcm"))  # the same NM image in JPEG 2000
    assert ext.header.transfer_syntax_uid == uid.JPEGExtended12Bit
    assert j2k.header.transfer_syntax_uid == uid.JPEG2000
    assert ext.pixels.shape == j2k.pixels.shape == (1, 1024, 256)
    corr = np.corrcoef(ext.pixels.ravel().astype(float), j2k.pixels.ravel().astype(float))[0, 1]
    assert corr > 0.9


def test_jpeg_lossy_file_with_corrupt_stream_is_a_decode_error():
    # JPEG-lossy.dcm carries a stream with a misplaced marker (pydicom keeps it as a failure case;
    # JPGExtended.dcm is the repaired copy): it must fail cleanly, naming the transfer syntax.
    with pytest.raises(DecodeError, match="could not decode pixel data \\(JPEG Extended"):
        decode(bundled("JPEG-lossy.dcm"))


def test_rgb_jpeg_baseline_ybr_is_converted_to_rgb():
    jpeg = decode(bundled("SC_rgb_jpeg_dcmtk.dcm"))  # JPEG baseline, YBR_FULL
    rle = decode(bundled("SC_rgb_rle.dcm"))  # the same picture, RLE, RGB
    assert jpeg.header.stored_photometric_interpretation == "YBR_FULL"
    assert jpeg.header.photometric_interpretation == "RGB"
    assert jpeg.pixels.shape == rle.pixels.shape == (1, 100, 100, 3)
    diff = np.abs(jpeg.pixels.astype(int) - rle.pixels.astype(int))
    assert diff.max() <= 8  # lossy


def test_jpeg_lossless_matches_rle():
    ll = decode(bundled("SC_rgb_jpeg_gdcm.dcm"))
    assert ll.header.transfer_syntax_uid == uid.JPEGLosslessSV1
    np.testing.assert_array_equal(ll.pixels, decode(bundled("SC_rgb_rle.dcm")).pixels)


def test_palette_is_expanded_to_8bit_rgb():
    img = decode(bundled("examples_palette.dcm"))
    assert img.header.stored_photometric_interpretation == "PALETTE COLOR"
    assert img.header.photometric_interpretation == "RGB"
    assert img.pixels.shape == (1, 350, 800, 3) and img.pixels.dtype == np.uint8


def test_supported_syntaxes_cover_the_brief():
    supported = set(supported_transfer_syntaxes())
    for ts in (
        uid.ImplicitVRLittleEndian,
        uid.ExplicitVRLittleEndian,
        uid.ExplicitVRBigEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
        uid.HTJ2K,
        uid.RLELossless,
    ):
        assert ts in supported, ts.name


# ---------------------------------------------------------------------------------------------
# Multi-frame


def test_multiframe_all_single_first():
    path = bundled("rtdose.dcm")  # 15 frames of 10x10
    assert decode(path).pixels.shape == (15, 10, 10)
    first = decode(path, frames="first")
    assert first.pixels.shape == (1, 10, 10)
    np.testing.assert_array_equal(first.pixels[0], decode(path).pixels[0])
    with pytest.raises(DecodeError, match="multi-frame image \\(15 frames\\)"):
        decode(path, frames="single")


def test_multiframe_compressed_big_endian_agree():
    a = decode(bundled("rtdose.dcm")).pixels
    np.testing.assert_array_equal(decode(bundled("rtdose_rle.dcm")).pixels, a)
    np.testing.assert_array_equal(decode(bundled("rtdose_expb.dcm")).pixels, a)


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.fixture
def mr_ds() -> pydicom.Dataset:
    return pydicom.dcmread(bundled("MR_small.dcm"))


def test_multi_valued_window_takes_the_first(mr_ds):
    mr_ds.WindowCenter = [40, 400]
    mr_ds.WindowWidth = [80, 1500]
    h = header_from_dataset(mr_ds)
    assert (h.window_center, h.window_width) == (40.0, 80.0)


def test_no_pixel_data(mr_ds):
    del mr_ds.PixelData
    with pytest.raises(DecodeError, match="no pixel data"):
        decode(mr_ds)


def test_unknown_transfer_syntax(mr_ds):
    mr_ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    with pytest.raises(DecodeError, match="unknown transfer syntax 1.2.3.4.5"):
        decode(mr_ds)


def test_unsupported_transfer_syntax(mr_ds):
    mr_ds.file_meta.TransferSyntaxUID = uid.MPEG2MPML
    with pytest.raises(DecodeError, match="unsupported transfer syntax .*MPEG2"):
        decode(mr_ds)


def test_missing_transfer_syntax(mr_ds):
    del mr_ds.file_meta.TransferSyntaxUID
    with pytest.raises(DecodeError, match="no Transfer Syntax UID"):
        decode(mr_ds)


def test_truncated_file():
    with pytest.raises(DecodeError, match="pixel data is truncated: 8130 bytes, expected 8192"):
        decode(bundled("MR_truncated.dcm"))


def test_short_pixel_data(mr_ds):
    mr_ds.PixelData = mr_ds.PixelData[:100]
    with pytest.raises(DecodeError, match="truncated: 100 bytes"):
        decode(mr_ds)


def test_truncated_compressed_stream():
    ds = pydicom.dcmread(bundled("MR_small_RLE.dcm"))
    from pydicom.encaps import encapsulate, generate_frames

    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    with pytest.raises(DecodeError, match="could not decode pixel data \\(RLE Lossless\\)"):
        decode(ds)


@pytest.mark.parametrize("field", ["Rows", "Columns"])
def test_zero_rows_or_cols(mr_ds, field):
    setattr(mr_ds, field, 0)
    with pytest.raises(DecodeError, match="zero size"):
        decode(mr_ds)


def test_not_dicom(tmp_path):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"not dicom at all" * 10)
    with pytest.raises(DecodeError, match="not a readable DICOM file"):
        decode(p)


def test_decode_does_not_modify_the_dataset(mr_ds):
    before = copy.deepcopy(mr_ds)
    decode(mr_ds)
    assert mr_ds == before


# ---------------------------------------------------------------------------------------------
# Slice ordering


def _h(**kw) -> ImageHeader:
    base = header_from_dataset(pydicom.dcmread(bundled("CT_small.dcm")))
    from dataclasses import replace

    return replace(base, **kw)


def test_slice_order_by_position_along_normal():
    iop = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    hs = [
        _h(image_position_patient=(0.0, 0.0, z), image_orientation_patient=iop, instance_number=n)
        for z, n in [(10.0, 1), (-5.0, 2), (2.5, 3)]
    ]
    assert slice_order(hs) == [1, 2, 0]


def test_slice_order_falls_back_to_instance_number():
    hs = [_h(image_position_patient=None, instance_number=n) for n in (3, 1, 2)]
    assert slice_order(hs) == [1, 2, 0]
    assert slice_order([_h(image_position_patient=None, instance_number=None)] * 2) == [0, 1]


def test_no_decoder_plugin_installed_is_a_decode_error(tmp_path):
    """A site without the optional codec packages gets a DecodeError naming what is missing (pydicom
    3 lists missing plugins as strings; reading them as a dict raised AttributeError: a 500)."""
    import subprocess
    import sys

    script = tmp_path / "no_plugins.py"
    script.write_text(
        "import sys\n"
        "for name in ('pylibjpeg', 'openjpeg', 'libjpeg', 'PIL', 'gdcm'):\n"
        "    sys.modules[name] = None  # as if the package were not installed\n"
        "from node.errors import DecodeError\n"
        "from node.inference.decode import decode\n"
        "try:\n"
        f"    decode({bundled('SC_rgb_jpeg_dcmtk.dcm')!r})\n"
        "except DecodeError as exc:\n"
        "    print('DecodeError:', exc)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DecodeError:" in done.stdout
    assert "no decoder plugin installed" in done.stdout
    assert "gdcm" in done.stdout
