"""Decompression bombs built in the test: tiny files whose codestream headers (or deflate
streams) claim gigabytes, wrapped as DX/CR DICOM with small Rows and Columns."""

from __future__ import annotations

import copy
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

SIDE = 64


def _image(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)


def jpeg_claiming(rows: int, cols: int) -> bytes:
    """A baseline JPEG of 64x64x3 whose SOF0 header is patched to claim ``rows`` x ``cols``."""
    ok, buf = cv2.imencode(".jpg", _image(), [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc0")
    assert sof > 0 and data[sof + 9] == 3, "no 3-component SOF0 in the encoded JPEG"
    struct.pack_into(">HH", data, sof + 5, rows, cols)
    return bytes(data)


def j2k_claiming(rows: int, cols: int) -> bytes:
    """A JPEG 2000 codestream of 64x64 grey whose SIZ marker claims ``cols`` x ``rows``."""
    ok, buf = cv2.imencode(".jp2", _image()[..., 0])
    assert ok
    raw = buf.tobytes()
    start = raw.find(b"\xff\x4f\xff\x51")
    assert start >= 0, "no codestream in the encoded JP2"
    data = bytearray(raw[start:])
    struct.pack_into(">II", data, 8, cols, rows)
    return bytes(data)


def wrap(
    template: Path | Dataset, frame: bytes, transfer_syntax: str, samples: int, photometric: str
) -> Dataset:
    """``template`` (a phantom chest radiograph) with ``frame`` as its encapsulated pixel data,
    Rows and Columns 64, and fresh UIDs."""
    ds = copy.deepcopy(template) if isinstance(template, Dataset) else pydicom.dcmread(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.Rows = ds.Columns = SIDE
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    elif "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    for keyword in ("WindowCenter", "WindowWidth", "NumberOfFrames"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.set_original_encoding(False, True)
    return ds


def jpeg_bomb(template: Path | Dataset) -> Dataset:
    """A DX/CR whose JPEG Baseline frame header claims 65535x65535x3 (12.9 GB decoded)."""
    return wrap(template, jpeg_claiming(65535, 65535), JPEGBaseline8Bit, 3, "YBR_FULL_422")


def j2k_bomb(template: Path | Dataset) -> Dataset:
    """A DX/CR whose JPEG 2000 SIZ marker claims 40000x40000 (1.6 GB decoded, 8-bit grey)."""
    return wrap(template, j2k_claiming(40000, 40000), JPEG2000Lossless, 1, "MONOCHROME2")


def rle_lying(template: Path | Dataset) -> Dataset:
    """A DX/CR in RLE Lossless whose header declares 15 segments for 8-bit grey (1 expected)."""
    header = struct.pack("<16I", 15, *([64] * 15))
    return wrap(template, header + b"\x00" * 64, RLELossless, 1, "MONOCHROME2")


def deflate_bomb_body(inflated_mib: int, sop_class: str = "1.2.840.10008.5.1.4.1.1.1.1") -> tuple[str, bytes]:
    """(SOP Instance UID, body) of a Deflated Explicit VR Little Endian data set: its UIDs, then an
    OB element of ``inflated_mib`` MiB of zeros, deflated to about 1 MB per GiB. Built fast: after a
    full flush the compressor's output for the same 16 MiB of zeros is the same block, repeated."""
    sop_instance = generate_uid()
    head = b""
    for tag, value in (
        ((0x0008, 0x0016), sop_class),
        ((0x0008, 0x0018), sop_instance),
        ((0x0020, 0x000D), generate_uid()),
        ((0x0020, 0x000E), generate_uid()),
    ):
        raw = value.encode() + (b"\x00" if len(value) % 2 else b"")
        head += struct.pack("<HH", *tag) + b"UI" + struct.pack("<H", len(raw)) + raw
    block = 16 * 2**20
    assert inflated_mib * 2**20 % block == 0
    size = inflated_mib * 2**20
    head += struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00" + struct.pack("<I", size)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    prefix = compressor.compress(head) + compressor.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(block)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush(zlib.Z_FINISH)
    count = size // block
    body = prefix + first + repeated * (count - 1) + tail if count else prefix + tail
    return sop_instance, body


DEFLATE_SYNTAX = DeflatedExplicitVRLittleEndian
