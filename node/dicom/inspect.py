"""Check a received data set's structure and read the header values the node files it by,
without decoding pixel data or re-encoding anything.
"""

from __future__ import annotations

import io
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
