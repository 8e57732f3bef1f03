"""Check a received data set's structure and read the header values the node files it by,
without decoding pixel data or re-encoding anything.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.budget import DEFAULT_BUDGET
from node.dicom import status
from node.errors import BudgetExceeded, IngestError

_UNDEFINED = 0xFFFFFFFF
# Top-level attributes kept for filing and routing (nothing that identifies the patient).
_WANTED = {
    0x00080005,  # SpecificCharacterSet
    0x00080016,  # SOPClassUID
    0x00080018,  # SOPInstanceUID
    0x00080060,  # Modality
    0x0008103E,  # SeriesDescription
    0x00180015,  # BodyPartExamined
    0x0020000D,  # StudyInstanceUID
    0x0020000E,  # SeriesInstanceUID
    0x00200011,  # SeriesNumber
    0x00200013,  # InstanceNumber
}


@dataclass(frozen=True, slots=True)
class Header:
    """What the node needs from a received data set to file it."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    body_part: str
    series_number: int | None
    series_description: str
    instance_number: int | None


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed optional text value must not refuse the image
        return ""
    return str(value or "").strip()


def _known_vr(element: object) -> object:
    """A filing element as its dictionary VR when the sender wrote it as UN (explicit VR files
    converted by some tools carry every standard attribute as UN; DCMTK stores them as they are).
    The value bytes are the same: UN only hides the VR, in the transfer syntax's byte order."""
    if isinstance(element, RawDataElement) and element.VR == "UN":
        return element._replace(VR=dictionary_VR(element.tag))
    return element


_IN_CHUNK = 1 << 20
_OUT_CHUNK = 16 << 20


class InflateError(ValueError):
    """A deflated data set does not inflate (corrupt or truncated deflate stream)."""


def _inflated_pieces(data: bytes | bytearray | memoryview, limit: int) -> Iterator[bytes]:
    """Inflate raw-deflate ``data`` piece by piece (at most 16 MiB each), never holding more than
    one piece; raise BudgetExceeded as soon as the output passes ``limit`` bytes, InflateError when
    the stream is corrupt or ends early."""
    view = memoryview(data)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pos = total = 0
    try:
        while not inflater.eof:
            if inflater.unconsumed_tail:
                source: bytes | memoryview = inflater.unconsumed_tail
            elif pos < len(view):
                source, pos = view[pos : pos + _IN_CHUNK], pos + _IN_CHUNK
            else:
                break
            piece = inflater.decompress(source, min(_OUT_CHUNK, limit - total + 1))
            total += len(piece)
            if total > limit:
                raise BudgetExceeded(
                    f"deflated data set inflates to over limits.max_inflated_mb ({limit // 2**20} MiB)"
                )
            yield piece
    except zlib.error as exc:
        raise InflateError(f"deflated data set does not inflate: {exc}") from exc
    finally:
        view.release()
    if not inflater.eof:
        raise InflateError("deflated data set is truncated")


def inflate(data: bytes | bytearray | memoryview, limit: int) -> io.BytesIO:
    """The inflated data set of a Deflated Explicit VR Little Endian body, capped at ``limit``
    bytes. The size is counted first as a stream (a bomb is refused holding at most 16 MiB), then
    the data set is inflated into a buffer of exactly that size. Raises BudgetExceeded over the
    limit, InflateError when it does not inflate."""
    total = inflated_size(data, limit)
    out = io.BytesIO()
    if total:
        out.seek(total - 1)
        out.write(b"\0")  # one allocation of the final size; the pieces are written in place
        out.seek(0)
    for piece in _inflated_pieces(data, total):
        out.write(piece)
    out.seek(0)
    return out


def inflated_size(data: bytes | bytearray | memoryview, limit: int) -> int:
    """How many bytes ``data`` inflates to, counted without keeping them (at most one 16 MiB piece
    in memory). Raises BudgetExceeded over ``limit``, InflateError when it does not inflate."""
    return sum(len(piece) for piece in _inflated_pieces(data, limit))


# --- the fast walk: the same structure check and header as the pydicom walk below, for the data
# sets every sender writes (little endian, well formed, plain ASCII header values), at a fraction
# of its cost. Anything else (a malformed or unusual structure, a value that needs pydicom's
# decoding) makes it give up, and the pydicom walk decides: it never accepts what that walk refuses,
# and the header it returns is the one that walk would.


class _Unsure(Exception):
    """The fast walk cannot tell; the pydicom walk decides."""


_HEADER = struct.Struct("<HHL")  # implicit VR: group, element, 32-bit length
_EXPLICIT = struct.Struct("<HH2sH")  # explicit VR: group, element, VR, 16-bit length
_U32 = struct.Struct("<L")
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_SEQUENCE_END_BYTES = b"\xfe\xff\xdd\xe0"
# the dictionary VR of each filing attribute (an explicit VR must be it or UN)
_WANTED_VR = {
    0x00080005: b"CS",
    0x00080016: b"UI",
    0x00080018: b"UI",
    0x00080060: b"CS",
    0x0008103E: b"LO",
    0x00180015: b"CS",
    0x0020000D: b"UI",
    0x0020000E: b"UI",
    0x00200011: b"IS",
    0x00200013: b"IS",
}
_PRINTABLE = re.compile(rb"[ -\[\]-~]*")  # printable ASCII without backslash (one value)
_INTEGER = re.compile(r"[+-]?[0-9]+")


def _implicit_sq(tag: int) -> bool:
    """True when the dictionary VR of ``tag`` is SQ (an undefined-length implicit VR element);
    _Unsure for a tag the dictionary does not know."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError as exc:
        raise _Unsure from exc


def _walk(
    buf: memoryview, pos: int, end: int | None, implicit: bool, kept: dict[int, tuple[bytes, bytes]] | None
) -> int:
    """Walk the elements from ``pos`` up to ``end`` exactly (None: up to an item delimiter, in an
    undefined-length item); keep the filing elements' (VR, value) in ``kept`` (top level only).
    Returns the position after the last element (or after the delimiter); raises _Unsure."""
    size = len(buf) if end is None else end
    while pos < size:
        if pos + 8 > size:
            raise _Unsure
        if implicit:
            group, elem, length = _HEADER.unpack_from(buf, pos)
            vr = b""
            pos += 8
        else:
            group, elem, vr, length = _EXPLICIT.unpack_from(buf, pos)
            pos += 8
            if vr in _LONG_VRS:
                if pos + 4 > size:
                    raise _Unsure
                (length,) = _U32.unpack_from(buf, pos)
                pos += 4
            elif group == 0xFFFE or vr not in _SHORT_VRS:
                if end is None and group == 0xFFFE and elem == 0xE00D and vr == b"\0\0" and length == 0:
                    return pos  # the item delimiter: no VR, a 32-bit length of 0
                raise _Unsure
        tag = group << 16 | elem
        if group == 0xFFFE:
            if implicit and end is None and tag == _ITEM_END and length == 0:
                return pos
            raise _Unsure
        if length == _UNDEFINED:
            if (vr == b"SQ") if not implicit else _implicit_sq(tag):
                pos = _skip_sequence(buf, pos, implicit)
            elif tag == _PIXEL_DATA and vr in (b"OB", b"OW"):
                found = bytes(buf[pos:]).find(_SEQUENCE_END_BYTES)
                if found < 0 or pos + found + 8 > len(buf):
                    raise _Unsure
                pos += found + 4
                if _U32.unpack_from(buf, pos)[0] != 0:
                    raise _Unsure
                pos += 4
            else:
                raise _Unsure
            if pos > size:
                raise _Unsure
            continue
        value_end = pos + length
        if value_end > size:
            raise _Unsure
        if kept is not None and tag in _WANTED_VR:
            wanted = _WANTED_VR[tag]
            if not implicit and vr != wanted and vr != b"UN":
                raise _Unsure
            kept[tag] = (wanted, bytes(buf[pos:value_end]))
        pos = value_end
    if end is None:
        raise _Unsure  # no item delimiter
    return pos


def _skip_sequence(buf: memoryview, pos: int, implicit: bool) -> int:
    """Walk the items of an undefined-length sequence from ``pos``; the position after its
    delimiter. Raises _Unsure."""
    size = len(buf)
    while True:
        if pos + 8 > size:
            raise _Unsure
        group, elem, length = _HEADER.unpack_from(buf, pos)
        pos += 8
        tag = group << 16 | elem
        if tag == _SEQUENCE_END:
            if length != 0:
                raise _Unsure
            return pos
        if tag != _ITEM:
            raise _Unsure
        if length == _UNDEFINED:
            pos = _walk(buf, pos, None, implicit, None)
        else:
            item_end = pos + length
            if item_end > size or _walk(buf, pos, item_end, implicit, None) != item_end:
                raise _Unsure
            pos = item_end


def _plain(value: bytes, vr: bytes) -> str:
    """A one-valued printable ASCII value as pydicom's reading gives it (stripped as the header
    strips it); _Unsure for anything else (a backslash, other bytes, a UID's padding aside)."""
    if vr == b"UI" and value.endswith(b"\0"):
        value = value[:-1]
    if _PRINTABLE.fullmatch(value) is None:
        raise _Unsure
    return value.decode("ascii").strip()


def _plain_int(value: bytes | None) -> int | None:
    """An IS value as the header reads it (None when absent or empty); _Unsure unless plain."""
    if value is None:
        return None
    text = _plain(value, b"IS")
    if not text:
        return None
    if _INTEGER.fullmatch(text) is None:
        raise _Unsure
    return int(text)


def _fast_header(buf: memoryview, implicit: bool) -> Header | None:
    """The filing header of a little endian data set by the fast walk; None when it cannot tell
    (then the pydicom walk decides, and raises what it raises)."""
    kept: dict[int, tuple[bytes, bytes]] = {}
    try:
        _walk(buf, 0, len(buf), implicit, kept)

        def text(tag: int) -> str:
            found = kept.get(tag)
            return "" if found is None else _plain(found[1], found[0])

        series_number = kept.get(0x00200011)
        instance_number = kept.get(0x00200013)
        header = Header(
            sop_class_uid=text(0x00080016),
            sop_instance_uid=text(0x00080018),
            study_uid=text(0x0020000D),
            series_uid=text(0x0020000E),
            modality=text(0x00080060).upper(),
            body_part=text(0x00180015).upper(),
            series_number=_plain_int(None if series_number is None else series_number[1]),
            series_description=text(0x0008103E),
            instance_number=_plain_int(None if instance_number is None else instance_number[1]),
        )
    except (_Unsure, struct.error):
        return None
    if not (header.sop_class_uid and header.sop_instance_uid and header.study_uid and header.series_uid):
        return None  # the pydicom walk names what is missing
    return header


def inspect_dataset(
    stream: io.BytesIO, transfer_syntax: UID, max_inflated: int = DEFAULT_BUDGET.max_inflated_bytes
) -> Header:
    """Walk every top-level element of ``stream`` and return the filing header.

    Attributes written with VR UN are read with their dictionary VR. A deflated data set is
    inflated as a stream, refused (CANNOT_UNDERSTAND, naming the limit) once it passes
    ``max_inflated`` bytes. Raises IngestError(CANNOT_UNDERSTAND) when the data set is truncated,
    overruns its lengths, is not parseable, or lacks a UID the node needs.
    """
    stream.seek(0)
    buffer = stream
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        body = stream.getbuffer()
        try:
            buffer = inflate(body, max_inflated)
        except (BudgetExceeded, InflateError) as exc:
            raise IngestError(status.CANNOT_UNDERSTAND, str(exc)) from exc
        finally:
            body.release()
    view = buffer.getbuffer()
    try:
        fast = (
            _fast_header(view, transfer_syntax.is_implicit_VR) if transfer_syntax.is_little_endian else None
        )
    finally:
        view.release()
    if fast is not None:
        stream.seek(0)
        return fast
    return _pydicom_header(stream, buffer, transfer_syntax)


def _pydicom_header(stream: io.BytesIO, buffer: io.BytesIO, transfer_syntax: UID) -> Header:
    """inspect_dataset's walk with pydicom: every case, and the errors to answer with."""
    size = len(buffer.getbuffer())
    kept: dict[int, object] = {}
    try:
        elements = data_element_generator(
            buffer, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian, defer_size=4096
        )
        for element in elements:
            # undefined-length sequences come back parsed (a truncated one raises while parsing)
            if isinstance(element, RawDataElement) and element.length != _UNDEFINED:
                if element.value is None and element.length:
                    end = element.value_tell + element.length
                elif element.value is not None:
                    end = element.value_tell + len(element.value)
                else:
                    end = element.value_tell
                if end > size or (element.value is not None and len(element.value) != element.length):
                    raise IngestError(
                        status.CANNOT_UNDERSTAND,
                        f"data set truncated: element {element.tag} declares {element.length} bytes",
                    )
            if int(element.tag) in _WANTED:
                kept[int(element.tag)] = _known_vr(element)
    except IngestError:
        raise
    except Exception as exc:  # pydicom raises several types on malformed input
        raise IngestError(status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from exc
    finally:
        stream.seek(0)
    ds = Dataset(kept)  # type: ignore[arg-type]
    ds.set_original_encoding(transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian, None)
    try:
        header = Header(
            sop_class_uid=_text(ds, "SOPClassUID"),
            sop_instance_uid=_text(ds, "SOPInstanceUID"),
            study_uid=_text(ds, "StudyInstanceUID"),
            series_uid=_text(ds, "SeriesInstanceUID"),
            modality=_text(ds, "Modality").upper(),
            body_part=_text(ds, "BodyPartExamined").upper(),
            series_number=_int_or_none(ds.get("SeriesNumber")),
            series_description=_text(ds, "SeriesDescription"),
            instance_number=_int_or_none(ds.get("InstanceNumber")),
        )
    except Exception as exc:
        raise IngestError(status.CANNOT_UNDERSTAND, f"header values cannot be read: {exc}") from exc
    for field, label in (
        ("sop_class_uid", "SOP Class UID"),
        ("sop_instance_uid", "SOP Instance UID"),
        ("study_uid", "Study Instance UID"),
        ("series_uid", "Series Instance UID"),
    ):
        if not getattr(header, field):
            raise IngestError(status.CANNOT_UNDERSTAND, f"data set has no {label}")
    return header
