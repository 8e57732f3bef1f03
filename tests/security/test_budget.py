"""The resource budget (issue 21, items 1 and 2) without a node: what codestream headers claim,
which images pass (a 500-frame CT, a mammogram) and which are refused before any decode, and a
deflate stream inflated with a cap. Bombs are decoded only in a subprocess under an address-space
limit, so that a regression fails the test instead of exhausting the machine."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from node.budget import DEFAULT_BUDGET, Budget
from node.dicom.inspect import inflate, inflated_size, inspect_dataset
from node.errors import BudgetExceeded, DecodeError, IngestError
from node.inference.codestream import frame_claim
from node.inference.decode import check_budget, decode_frame, iter_frames
from node.settings import load_settings
from tests.security.bombs import deflate_bomb_body, j2k_claiming, jpeg_claiming, wrap
from tests.security.limited import run_limited


def _dataset(
    rows: int, cols: int, frames: int = 1, bits: int = 16, pixel_data: bytes | None = None
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixel_data if pixel_data is not None else bytes(rows * cols * frames * bits // 8)
    return ds


def _ct_jpeg(frames: int) -> Dataset:
    """An 8-bit 512x512 CT of ``frames`` JPEG Baseline frames."""
    rng = np.random.default_rng(0)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (512, 512), dtype=np.uint8))
    assert ok
    ds = _dataset(512, 512, frames, bits=8, pixel_data=b"")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.tobytes()] * frames)
    ds["PixelData"].VR = "OB"
    return ds


def test_settings_defaults_are_the_default_budget() -> None:
    assert load_settings().limits.budget() == DEFAULT_BUDGET
    custom = load_settings(limits={"max_frame_pixels": 100, "max_inflated_mb": 2}).limits.budget()
    assert custom.max_frame_pixels == 100 and custom.max_inflated_bytes == 2 * 2**20


def test_codestream_claims_are_read() -> None:
    claim = frame_claim(pydicom.uid.JPEGBaseline8Bit, jpeg_claiming(65535, 65535))
    assert (claim.rows, claim.cols, claim.components) == (65535, 65535, 3)
    claim = frame_claim(pydicom.uid.JPEG2000Lossless, j2k_claiming(40000, 30000))
    assert (claim.rows, claim.cols, claim.components) == (40000, 30000, 1)
    assert frame_claim(ExplicitVRLittleEndian, b"") is None


def test_real_sizes_pass() -> None:
    ct = _ct_jpeg(500)
    header = check_budget(ct)
    assert header.number_of_frames == 500
    first = next(iter_frames(ct))
    assert first.pixels.shape == (1, 512, 512)
    assert decode_frame(ct, 499).pixels.shape == (1, 512, 512)
    mammogram = _dataset(5120, 4096)  # 21 M pixels, 16 bits
    assert check_budget(mammogram).rows == 5120


@pytest.mark.parametrize(
    ("ds", "named"),
    [
        (_dataset(10000, 10000, pixel_data=b"\0\0"), "limits.max_frame_pixels"),
        (_dataset(16, 16, frames=20_000, pixel_data=b"\0\0"), "limits.max_frames"),
        (_dataset(4096, 4096, frames=200, pixel_data=b"\0\0"), "limits.max_decoded_mb"),
    ],
)
def test_dataset_claims_over_budget_are_refused(ds: Dataset, named: str) -> None:
    with pytest.raises(BudgetExceeded, match=named):
        check_budget(ds)


def test_codestream_disagreeing_with_rows_columns_is_refused() -> None:
    template = _dataset(64, 64, bits=8)
    template.Modality = "DX"
    lying = wrap(template, jpeg_claiming(64, 128), JPEGBaseline8Bit, 3, "YBR_FULL_422")
    with pytest.raises(BudgetExceeded, match="claims 64x128 pixels, the data set says Rows 64, Columns 64"):
        check_budget(lying)
    honest = wrap(template, jpeg_claiming(64, 64), JPEGBaseline8Bit, 3, "YBR_FULL_422")
    assert next(iter_frames(honest)).pixels.shape == (1, 64, 64, 3)
    assert isinstance(BudgetExceeded("x"), DecodeError), "over budget is permanent (a DecodeError)"


def test_bombs_are_refused_before_decoding_under_a_memory_limit() -> None:
    code = """
import pydicom
from tests.security.bombs import jpeg_bomb, j2k_bomb, wrap
from tests.security.test_budget import _dataset
from node.errors import BudgetExceeded
from node.inference.decode import decode, iter_frames, decode_frame
template = _dataset(64, 64, bits=8)
template.Modality = "DX"
for build in (jpeg_bomb, j2k_bomb):
    for call in (lambda ds: decode(ds), lambda ds: list(iter_frames(ds)), lambda ds: decode_frame(ds, 0)):
        try:
            call(build(template))
        except BudgetExceeded as exc:
            assert "limits.max_frame_pixels" in str(exc), exc
        else:
            raise SystemExit("decoded a bomb")
print("refused")
"""
    done = run_limited(code, limit=1536 * 2**20)
    assert done.returncode == 0 and "refused" in done.stdout, done.stdout + done.stderr[-3000:]


def test_inflate_is_capped_and_streams() -> None:
    _, small = deflate_bomb_body(32)
    expected = zlib.decompress(small, -zlib.MAX_WBITS)
    assert inflated_size(small, 64 * 2**20) == len(expected) > 32 * 2**20
    assert inflate(small, 64 * 2**20).getvalue() == expected
    with pytest.raises(BudgetExceeded, match=r"limits.max_inflated_mb \(16 MiB\)"):
        inflate(small, 16 * 2**20)
    with pytest.raises(IngestError, match="limits.max_inflated_mb") as refused:
        inspect_dataset(io.BytesIO(small), DeflatedExplicitVRLittleEndian, max_inflated=16 * 2**20)
    assert refused.value.status == 0xC000
    header = inspect_dataset(io.BytesIO(small), DeflatedExplicitVRLittleEndian, max_inflated=64 * 2**20)
    assert header.sop_class_uid == "1.2.840.10008.5.1.4.1.1.1.1"


def test_deflate_bomb_is_refused_in_bounded_memory() -> None:
    code = """
import io
from pydicom.uid import DeflatedExplicitVRLittleEndian
from tests.security.bombs import deflate_bomb_body
from node.dicom.inspect import inspect_dataset
from node.errors import IngestError
_, body = deflate_bomb_body(3072)
try:
    inspect_dataset(io.BytesIO(body), DeflatedExplicitVRLittleEndian)
except IngestError as exc:
    assert "limits.max_inflated_mb" in str(exc), exc
    print("refused")
"""
    done = run_limited(code, limit=1024 * 2**20)  # below the 1 GiB cap itself: the count streams
    assert done.returncode == 0 and "refused" in done.stdout, done.stdout + done.stderr[-3000:]


def test_budget_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Budget().max_frames = 1  # type: ignore[misc]
    assert struct.calcsize("<I") == 4
