"""What a compressed frame's own header claims (rows, columns, components, precision), read from
the first bytes of the codestream without decoding it.

A decoder allocates what the codestream says, not what the data set's Rows and Columns say: the
claim is read here so that it can be checked against the budget (``node.budget``) first.
Supported: JPEG (SOF0-SOF15), JPEG-LS (SOF55), JPEG 2000 and HTJ2K (SIZ, bare codestream or JP2
boxes) and RLE Lossless (the segment count of its 64-byte header).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import UID

# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC); F7 is JPEG-LS SOF55
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field
_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
#: how far into a frame a header is looked for (APPn segments before a SOF are at most 64 KiB each)
HEADER_WINDOW = 1 << 20


@dataclass(frozen=True, slots=True)
class FrameClaim:
    """What one frame's codestream header says. ``rows`` 0 means the header leaves it to a later
    marker (JPEG DNL). For RLE only ``segments`` is known (rows/cols are the data set's)."""

    kind: str
    rows: int
    cols: int
    components: int
    bits: int
    signed: bool = False  #: JPEG 2000: the first component's samples are signed (Ssiz bit 7)


class CodestreamError(ValueError):
    """The frame's header cannot be read (no start-of-frame or SIZ marker where it must be)."""


def _jpeg(data: bytes) -> FrameClaim:
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("JPEG frame does not start with an SOI marker")
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise CodestreamError(f"JPEG frame: no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if marker in _SOF:
            if pos + 10 > end:
                break
            bits, rows, cols, comps = struct.unpack_from(">BHHB", data, pos + 4)
            kind = "JPEG-LS SOF55" if marker == 0xF7 else f"JPEG SOF{marker - 0xC0}"
            return FrameClaim(kind, rows, cols, comps, bits)
        if marker in (0xDA, 0xD9):  # SOS or EOI before any SOF
            break
        if length < 2:
            raise CodestreamError(f"JPEG frame: marker FF{marker:02X} has length {length}")
        pos += 2 + length
    raise CodestreamError("JPEG frame has no start-of-frame (SOF) marker")


def _j2k(data: bytes) -> FrameClaim:
    start = 0
    if data.startswith(_JP2_SIGNATURE):  # JP2 file format: the codestream sits in a jp2c box
        start = data.find(_SOC_SIZ)
        if start < 0:
            raise CodestreamError("JP2 frame has no codestream (SOC/SIZ markers)")
    elif not data.startswith(_SOC_SIZ):
        raise CodestreamError("JPEG 2000 frame does not start with SOC and SIZ markers")
    if start + 42 > len(data):
        raise CodestreamError("JPEG 2000 SIZ marker segment is truncated")
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, start + 8)
    (csiz,) = struct.unpack_from(">H", data, start + 40)
    ssiz = data[start + 42] if start + 43 <= len(data) else None
    bits = (ssiz & 0x7F) + 1 if ssiz is not None else 0
    signed = bool(ssiz & 0x80) if ssiz is not None else False
    return FrameClaim("JPEG 2000 SIZ", max(ysiz - yo, 0), max(xsiz - xo, 0), csiz, bits, signed)


def j2k_levels(codestream: bytes) -> int | None:
    """The number of wavelet decomposition levels the COD marker of a JPEG 2000 / HTJ2K main
    header gives (a JP2 file's codestream is found first); None when there is no readable COD.
    A decoder can reduce the resolution by at most 2**levels."""
    start = codestream.find(_SOC_SIZ)
    if start < 0:
        return None
    pos = start + 2
    while pos + 4 <= len(codestream):
        if codestream[pos] != 0xFF:
            return None
        marker = codestream[pos + 1]
        if marker in (0x90, 0x93):  # SOT / SOD: the main header ended without a COD
            return None
        length = int.from_bytes(codestream[pos + 2 : pos + 4], "big")
        if marker == 0x52:  # COD: Lcod, Scod, SGcod (4 bytes), then SPcod's levels
            return codestream[pos + 9] if pos + 10 <= len(codestream) else None
        pos += 2 + length
    return None


def _rle(data: bytes) -> FrameClaim:
    if len(data) < 64:
        raise CodestreamError("RLE frame is shorter than its 64-byte header")
    (segments,) = struct.unpack_from("<I", data, 0)
    return FrameClaim("RLE", 0, 0, segments, 0)


def frame_claim(transfer_syntax: UID, data: bytes) -> FrameClaim | None:
    """The header claim of one compressed frame (its first bytes suffice); None for a transfer
    syntax whose frames carry no such header. Raises CodestreamError when the header is unreadable."""
    if transfer_syntax.is_deflated or not transfer_syntax.is_compressed:
        return None
    data = data[:HEADER_WINDOW]
    name = transfer_syntax.keyword or ""
    if name.startswith(("JPEG2000", "HTJ2K")):
        return _j2k(data)
    if name == "RLELossless":
        return _rle(data)
    if name.startswith("JPEG") and not name.startswith("JPEGXL"):
        return _jpeg(data)
    return None  # MPEG, HEVC, ...: not decoded by this node
