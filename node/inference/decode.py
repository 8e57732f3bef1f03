"""Pixel decoding: a pydicom Dataset (or a file path) to stored values plus the header values needed.

Every transfer syntax pydicom has a decoder for works, provided its plugin is installed (pylibjpeg
with openjpeg/libjpeg/rle; see ``supported_transfer_syntaxes``). Failures raise ``DecodeError``
with a message that says what is wrong and with which instance.

Before anything is decoded, what the image would cost is checked against a :class:`Budget`: the
data set's Rows, Columns, NumberOfFrames, SamplesPerPixel and BitsAllocated, and what the header
of each compressed frame to be decoded claims (a decoder allocates the codestream's size, which
may be far more than the data set says). Over budget raises :class:`BudgetExceeded` (a
DecodeError: permanent) naming the limit and the claim.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import cv2
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames, get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, iter_pixels, pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from node.budget import DEFAULT_BUDGET, Budget
from node.errors import BudgetExceeded, DecodeError
from node.inference.codestream import HEADER_WINDOW, CodestreamError, FrameClaim, frame_claim, j2k_levels
from node.redact import redact
from node.types import DecodedImage, FrameValues, ImageHeader, LookupTable, first_window

log = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNCOMPRESSED = {
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
}

FrameMode = Literal["all", "single", "first"]


def supported_transfer_syntaxes() -> list[UID]:
    """Transfer syntaxes whose pixel data can be decoded with the plugins installed here."""
    out: list[UID] = sorted(_UNCOMPRESSED)
    for ts in pydicom.uid.AllTransferSyntaxes:
        if ts in _UNCOMPRESSED:
            continue
        try:
            if get_decoder(ts).is_available:
                out.append(ts)
        except NotImplementedError:
            continue
    return out


#: ``read_dataset(..., map_pixels=True)`` leaves a value at least this long in the file (pydicom's
#: ``defer_size``): native pixel data is then mapped from the page cache instead of copied into
#: fresh memory (2-4 CPU-ms of a 7.5 MB radiograph's preparation), and anything else that long is
#: read when it is first used, as pydicom does for a deferred element
MAP_PIXELS_BYTES = 4 * 2**20


def read_dataset(source: Dataset | str | Path, map_pixels: bool = False) -> Dataset:
    """Return ``source`` if it is a Dataset, else read the DICOM file at that path; with
    ``map_pixels`` values of :data:`MAP_PIXELS_BYTES` or more stay in the file until used (the
    preparation maps native pixel data, :func:`_native_frame`; :func:`load_deferred` reads the
    rest before the data set leaves the preparation)."""
    if isinstance(source, Dataset):
        return source
    path = Path(source)
    try:
        ds = pydicom.dcmread(path, defer_size=MAP_PIXELS_BYTES if map_pixels else None)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise DecodeError(f"{path}: not a readable DICOM file: {redact(str(exc))}") from exc
    if map_pixels and not _deferral_safe(ds, path):
        return read_dataset(path)
    return ds


def _deferral_safe(ds: Dataset, path: Path) -> bool:
    """Whether values left in the file by a deferred read lie at the offsets pydicom noted: not
    for a deflated data set (they are offsets into the inflated bytes), nor when the pixel data
    runs past the end of the file (cut short: pydicom's whole read says how)."""
    if not _deferred_tags(ds):
        return True
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or UID(str(syntax)).is_deflated:
        return False
    raw = _deferred(ds, "PixelData")
    if raw is None:
        return True
    try:
        return raw.value_tell + raw.length <= path.stat().st_size
    except OSError:
        return False


def _deferred(ds: Dataset, key: str | int) -> RawDataElement | None:
    """The element ``key`` (keyword or tag) while its value is still in the file (pydicom's
    deferred read)."""
    if key not in ds:
        return None
    raw = ds.get_item(key, keep_deferred=True)
    if isinstance(raw, RawDataElement) and raw.value is None and raw.value_tell is not None:
        return raw
    return None


def _deferred_tags(ds: Dataset) -> list[int]:
    """The top-level elements whose values are still in the file (``Dataset.elements`` would
    read them)."""
    return [tag for tag in ds.keys() if _deferred(ds, tag) is not None]  # noqa: SIM118 - iterating ds reads them


def _mapped_pixels(ds: Dataset) -> memoryview | None:
    """Deferred pixel data as a read-only view of the file's pages (a read-only shared mapping,
    unmapped when the last array made from it goes), or None when it is not deferred or the file
    does not hold all of it."""
    raw = _deferred(ds, "PixelData")
    filename = getattr(ds, "filename", None)
    if raw is None or not isinstance(filename, (str, Path)):
        return None
    try:
        with open(filename, "rb") as f:
            if raw.length == 0 or raw.value_tell + raw.length > os.fstat(f.fileno()).st_size:
                return None
            whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    return memoryview(whole)[raw.value_tell : raw.value_tell + raw.length]


def load_deferred(ds: Dataset) -> None:
    """Read every value still left in the file (:func:`read_dataset` with ``map_pixels``), so
    that ``ds`` no longer needs its file (it is pickled to the node's process)."""
    for tag in _deferred_tags(ds):
        ds[tag]  # noqa: B018 - pydicom reads a deferred value on access


def _name(ds: Dataset) -> str:
    uid = ds.get("SOPInstanceUID")
    if uid:
        return f"instance {uid}"
    filename = getattr(ds, "filename", None)
    return f"file {filename}" if filename else "dataset"


def _first(value: Any) -> Any:
    """First value of a multi-valued element, the value itself otherwise; None for empty."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return value[0] if len(value) else None
    return value


def _float_or_none(value: Any) -> float | None:
    value = _first(value)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@overload
def _floats(value: Any, n: Literal[2]) -> tuple[float, float] | None: ...
@overload
def _floats(value: Any, n: Literal[3]) -> tuple[float, float, float] | None: ...
@overload
def _floats(value: Any, n: Literal[6]) -> tuple[float, float, float, float, float, float] | None: ...
def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    """The n numbers of a multi-valued element (a pair, a position, an orientation); None when it
    is absent, not numbers, or has another count."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _int_or_none(value: Any) -> int | None:
    value = _first(value)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _floats_all(value: Any) -> tuple[float, ...]:
    """Every value of a (multi-valued) numeric element as floats; () when absent or not numeric."""
    if value is None or value == "":
        return ()
    values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return ()


def _group_item(group: Dataset | None, sequence: str) -> Dataset | None:
    """The first item of ``sequence`` inside one functional groups item, else None."""
    if group is None:
        return None
    seq = group.get(sequence)
    return seq[0] if seq else None


def _functional_group_value(ds: Dataset, sequence: str, keyword: str) -> Any:
    """A value from the Shared Functional Groups (enhanced multi-frame objects), else None."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    item = _group_item(shared[0] if shared else None, sequence)
    return None if item is None else item.get(keyword)


def _function(value: Any) -> str | None:
    text = str(value or "").strip().upper()
    return text or None


def _frame_values(group: Dataset) -> FrameValues:
    """The values of one Per-Frame Functional Groups item."""
    pvt = _group_item(group, "PixelValueTransformationSequence")
    voi = _group_item(group, "FrameVOILUTSequence")
    measures = _group_item(group, "PixelMeasuresSequence")
    position = _group_item(group, "PlanePositionSequence")
    orientation = _group_item(group, "PlaneOrientationSequence")
    slope = _float_or_none(pvt.get("RescaleSlope")) if pvt is not None else None
    intercept = _float_or_none(pvt.get("RescaleIntercept")) if pvt is not None else None
    centers = _floats_all(voi.get("WindowCenter")) if voi is not None else ()
    widths = _floats_all(voi.get("WindowWidth")) if voi is not None else ()
    return FrameValues(
        rescale_slope=slope,
        rescale_intercept=intercept if slope is not None else None,
        window_centers=centers if widths else (),
        window_widths=widths if centers else (),
        voi_lut_function=_function(voi.get("VOILUTFunction")) if voi is not None else None,
        pixel_spacing=_floats(measures.get("PixelSpacing"), 2) if measures is not None else None,
        image_position_patient=(
            _floats(position.get("ImagePositionPatient"), 3) if position is not None else None
        ),
        image_orientation_patient=(
            _floats(orientation.get("ImageOrientationPatient"), 6) if orientation is not None else None
        ),
    )


def _lookup_table(ds: Dataset, sequence: str, ts: UID) -> LookupTable | None:
    """The first item of a Modality/VOI LUT Sequence as a LookupTable; None when the sequence is
    absent or its item lacks LUTDescriptor or LUTData (pydicom ignores such an item too)."""
    seq = ds.get(sequence)
    if not seq:
        return None
    item = seq[0]
    descriptor = item.get("LUTDescriptor")
    if descriptor is None or "LUTData" not in item or item.LUTData in (None, b"", []):
        return None
    try:
        n, first, bits = (int(v) for v in descriptor)
    except (TypeError, ValueError) as exc:
        raise DecodeError(
            f"{_name(ds)}: {sequence} LUTDescriptor must hold 3 integers (found {descriptor!r})"
        ) from exc
    n = n or 2**16
    if not 8 <= bits <= 16:
        raise DecodeError(f"{_name(ds)}: {sequence} LUTDescriptor gives {bits} bits per entry (8-16 allowed)")
    elem = item["LUTData"]
    if elem.VR == "OW" or isinstance(elem.value, bytes):
        order = "<" if ts.is_little_endian else ">"
        table = np.frombuffer(bytes(elem.value), dtype=f"{order}u2")
    else:
        values = elem.value if isinstance(elem.value, (list, pydicom.multival.MultiValue)) else [elem.value]
        table = np.asarray([int(v) for v in values], dtype=np.int64)
        if table.size and (table.min() < 0 or table.max() > 0xFFFF):
            raise DecodeError(f"{_name(ds)}: {sequence} LUTData holds values outside 0..65535")
    if table.size < n:
        raise DecodeError(f"{_name(ds)}: {sequence} LUTData has {table.size} entries, LUTDescriptor says {n}")
    return LookupTable(first_mapped=first, bits=bits, data=table[:n].astype(np.uint16).tobytes())


def _required_int(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise DecodeError(f"{_name(ds)}: required element {keyword} is missing")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"{_name(ds)}: {keyword} is not an integer (found {value!r})") from exc


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise DecodeError(f"{_name(ds)}: no Transfer Syntax UID in the file meta information")
    ts = UID(str(ts))
    if ts not in _UNCOMPRESSED and ts not in pydicom.uid.AllTransferSyntaxes:
        raise DecodeError(f"{_name(ds)}: unknown transfer syntax {ts}")
    return ts


def _check_decoder(ds: Dataset, ts: UID) -> None:
    if ts in _UNCOMPRESSED:
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise DecodeError(
            f"{_name(ds)}: unsupported transfer syntax {ts} ({ts.name}): no pixel decoder exists for it"
        ) from exc
    if not decoder.is_available:
        # pydicom 3 lists the missing plugins as strings ("gdcm - requires gdcm>=3.0.10")
        missing = "; ".join(str(item) for item in decoder.missing_dependencies) or "none"
        raise DecodeError(
            f"{_name(ds)}: unsupported transfer syntax {ts} ({ts.name}): no decoder plugin installed "
            f"(missing: {missing})"
        )


def header_from_dataset(ds: Dataset) -> ImageHeader:
    """Extract the header values the node needs; raise DecodeError when an essential one is bad."""
    ts = _transfer_syntax(ds)
    rows = _required_int(ds, "Rows")
    cols = _required_int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise DecodeError(f"{_name(ds)}: image has zero size (Rows={rows}, Columns={cols})")
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    if frames <= 0:
        frames = 1
    samples = _int_or_none(ds.get("SamplesPerPixel")) or 1
    stored_pi = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if not stored_pi:
        raise DecodeError(f"{_name(ds)}: required element PhotometricInterpretation is missing")
    decoded_pi = "RGB" if samples == 3 or stored_pi == "PALETTE COLOR" else stored_pi
    bits_allocated = _required_int(ds, "BitsAllocated")
    bits_stored = _int_or_none(ds.get("BitsStored")) or bits_allocated
    pixel_rep = _int_or_none(ds.get("PixelRepresentation")) or 0

    # Enhanced multi-frame objects: Shared Functional Groups over the top level (per-frame values
    # are kept apart, see ImageHeader.for_frame)
    def shared_or_top(sequence: str, keyword: str) -> Any:
        value = _functional_group_value(ds, sequence, keyword)
        return ds.get(keyword) if value is None or value == "" else value

    slope = _float_or_none(shared_or_top("PixelValueTransformationSequence", "RescaleSlope"))
    intercept = _float_or_none(shared_or_top("PixelValueTransformationSequence", "RescaleIntercept"))
    centers = _floats_all(_functional_group_value(ds, "FrameVOILUTSequence", "WindowCenter"))
    widths = _floats_all(_functional_group_value(ds, "FrameVOILUTSequence", "WindowWidth"))
    if not centers or not widths:
        centers, widths = _floats_all(ds.get("WindowCenter")), _floats_all(ds.get("WindowWidth"))
    if not centers or not widths:
        centers, widths = (), ()
    function = _function(shared_or_top("FrameVOILUTSequence", "VOILUTFunction")) or "LINEAR"
    center, width = first_window(centers, widths, function)

    spacing = _floats(_functional_group_value(ds, "PixelMeasuresSequence", "PixelSpacing"), 2)
    if spacing is None:
        spacing = _floats(ds.get("PixelSpacing"), 2) or _floats(ds.get("ImagerPixelSpacing"), 2)
    ipp = _floats(shared_or_top("PlanePositionSequence", "ImagePositionPatient"), 3)
    iop = _floats(shared_or_top("PlaneOrientationSequence", "ImageOrientationPatient"), 6)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or ()
    frame_values = tuple(_frame_values(group) for group in per_frame)
    if frame_values and len(frame_values) != frames:
        log.debug(
            "%s: PerFrameFunctionalGroupsSequence has %d items for %d frames",
            _name(ds),
            len(frame_values),
            frames,
        )

    def text(keyword: str) -> str | None:
        value = ds.get(keyword)
        return str(value) if value not in (None, "") else None

    return ImageHeader(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        transfer_syntax_uid=str(ts),
        modality=str(ds.get("Modality", "") or ""),
        rows=rows,
        cols=cols,
        number_of_frames=frames,
        samples_per_pixel=samples,
        photometric_interpretation=decoded_pi,
        stored_photometric_interpretation=stored_pi,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=pixel_rep,
        rescale_slope=1.0 if slope is None else slope,
        rescale_intercept=0.0 if intercept is None else intercept,
        window_center=center,
        window_width=width,
        window_centers=centers,
        window_widths=widths,
        voi_lut_function=function,
        modality_lut=_lookup_table(ds, "ModalityLUTSequence", ts),
        voi_lut=_lookup_table(ds, "VOILUTSequence", ts),
        frame_values=frame_values,
        pixel_spacing=spacing,
        image_position_patient=ipp,
        image_orientation_patient=iop,
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        slice_location=_float_or_none(ds.get("SliceLocation")),
        body_part_examined=text("BodyPartExamined"),
    )


def _check_native_length(ds: Dataset, header: ImageHeader, keyword: str) -> None:
    """Refuse native pixel data shorter than Rows x Columns x Samples x Frames needs."""
    if keyword == "FloatPixelData":
        bits = 32
    elif keyword == "DoubleFloatPixelData":
        bits = 64
    else:
        bits = header.bits_allocated
    n_values = header.rows * header.cols * header.samples_per_pixel * header.number_of_frames
    expected = (n_values + 7) // 8 if bits == 1 else n_values * (bits // 8)
    stored_pi = header.stored_photometric_interpretation
    if stored_pi in ("YBR_FULL_422", "YBR_PARTIAL_422") and bits != 1:
        expected = expected * 2 // 3
    actual = _pixel_bytes(ds, keyword)
    if actual < expected:
        raise DecodeError(
            f"{_name(ds)}: pixel data is truncated: {actual} bytes, expected {expected} "
            f"({header.number_of_frames} frame(s) of {header.rows}x{header.cols}x"
            f"{header.samples_per_pixel}, {bits} bits allocated)"
        )


def _pixel_bytes(ds: Dataset, keyword: str) -> int:
    """Length of the pixel data element ``keyword``, without reading a deferred value."""
    raw = _deferred(ds, keyword)
    if raw is not None:
        return int(raw.length)
    return len(ds[keyword].value or b"")


def _sample_bytes(bits: int) -> int:
    """Bytes per decoded sample for ``bits`` allocated (1-bit images decode to one byte)."""
    for size in (1, 2, 4, 8):
        if bits <= 8 * size:
            return size
    return (bits + 7) // 8


def _frame_bytes(header: ImageHeader, keyword: str) -> int:
    """Decoded bytes of one frame, as the data set describes it (palette colour expands to RGB)."""
    if keyword == "FloatPixelData":
        size = 4
    elif keyword == "DoubleFloatPixelData":
        size = 8
    else:
        size = _sample_bytes(header.bits_allocated)
    samples = 3 if header.stored_photometric_interpretation == "PALETTE COLOR" else header.samples_per_pixel
    return header.rows * header.cols * max(samples, 1) * size


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _check_dataset_budget(ds: Dataset, header: ImageHeader, keyword: str, budget: Budget) -> None:
    """Refuse an image whose data set describes more than the budget allows."""
    pixels = header.rows * header.cols
    if pixels > budget.max_frame_pixels:
        raise BudgetExceeded(
            f"{_name(ds)}: Rows x Columns {header.rows}x{header.cols} ({pixels} pixels per frame) is over "
            f"the limit limits.max_frame_pixels ({budget.max_frame_pixels})"
        )
    if header.number_of_frames > budget.max_frames:
        raise BudgetExceeded(
            f"{_name(ds)}: NumberOfFrames {header.number_of_frames} is over the limit limits.max_frames "
            f"({budget.max_frames})"
        )
    total = _frame_bytes(header, keyword) * header.number_of_frames
    if total > budget.max_decoded_bytes:
        raise BudgetExceeded(
            f"{_name(ds)}: {header.number_of_frames} frame(s) of {header.rows}x{header.cols}x"
            f"{header.samples_per_pixel}, {header.bits_allocated} bits allocated, decode to "
            f"{_mib(total)}, over the limit limits.max_decoded_mb ({_mib(budget.max_decoded_bytes)})"
        )


def _frame_heads(
    ds: Dataset, header: ImageHeader, indices: Iterable[int] | None
) -> Iterator[tuple[int, bytes]]:
    """(index, first bytes) of the encapsulated frames ``indices`` (None: every frame), each at
    most HEADER_WINDOW bytes taken from its first fragments."""
    buffer = ds.PixelData
    eot = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    extended = (eot[0], eot[1]) if eot[0] and eot[1] else None
    n = header.number_of_frames
    if indices is not None:
        for index in indices:
            frame = get_frame(buffer, index, extended_offsets=extended, number_of_frames=n)
            yield index, frame[:HEADER_WINDOW]
        return
    for index, fragments in enumerate(
        generate_fragmented_frames(buffer, number_of_frames=n, extended_offsets=extended)
    ):
        if index >= n:
            return
        head = b""
        for fragment in fragments:
            head += fragment[: HEADER_WINDOW - len(head)]
            if len(head) >= HEADER_WINDOW:
                break
        yield index, head


def _check_claim(ds: Dataset, header: ImageHeader, index: int, claim: FrameClaim, budget: Budget) -> None:
    """Refuse a frame whose codestream header claims more than the budget, or other than the data set."""
    where = f"{_name(ds)}: the {claim.kind} header of frame {index + 1}"
    if claim.kind == "RLE":
        expected = header.samples_per_pixel * _sample_bytes(header.bits_allocated)
        if claim.components != expected or not 0 < claim.components <= 15:
            raise BudgetExceeded(
                f"{where} declares {claim.components} segments; SamplesPerPixel "
                f"{header.samples_per_pixel} and BitsAllocated {header.bits_allocated} make {expected}"
            )
        return
    rows = claim.rows or header.rows  # JPEG rows 0: given later by a DNL marker
    pixels = rows * claim.cols
    if pixels > budget.max_frame_pixels:
        raise BudgetExceeded(
            f"{where} claims {rows}x{claim.cols}x{claim.components} ({pixels} pixels), over the limit "
            f"limits.max_frame_pixels ({budget.max_frame_pixels}); the data set says Rows {header.rows}, "
            f"Columns {header.cols}"
        )
    if (rows, claim.cols) != (header.rows, header.cols):
        raise BudgetExceeded(
            f"{where} claims {rows}x{claim.cols} pixels, the data set says Rows {header.rows}, "
            f"Columns {header.cols}: a decoder would allocate the codestream's size"
        )
    if claim.components != header.samples_per_pixel:
        raise BudgetExceeded(
            f"{where} claims {claim.components} components, the data set says SamplesPerPixel "
            f"{header.samples_per_pixel}"
        )


def _check_codestreams(
    ds: Dataset, header: ImageHeader, ts: UID, budget: Budget, indices: Iterable[int] | None
) -> None:
    """Check the header of each compressed frame to be decoded (``indices``; None: all) against
    the data set and the budget, before any decoder sees it."""
    index = -1
    try:
        for index, head in _frame_heads(ds, header, indices):
            claim = frame_claim(ts, head)
            if claim is not None:
                _check_claim(ds, header, index, claim, budget)
    except BudgetExceeded:
        raise
    except CodestreamError as exc:
        raise DecodeError(
            f"{_name(ds)}: frame {index + 2 if index < 0 else index + 1}: {redact(str(exc))}"
        ) from exc
    except Exception as exc:  # pydicom's encapsulation parsers raise several types
        raise DecodeError(
            f"{_name(ds)}: encapsulated pixel data cannot be split into frames: {redact(str(exc))}"
        ) from exc


def _checked(ds: Dataset, budget: Budget, indices: Iterable[int] | None = None) -> tuple[ImageHeader, UID]:
    """The header of a dataset whose pixel data can be decoded here within ``budget``, frames
    ``indices`` (None: all) checked (DecodeError otherwise)."""
    keyword = next((k for k in _PIXEL_KEYWORDS if k in ds), None)
    if keyword is None or _pixel_bytes(ds, keyword) == 0:
        raise DecodeError(f"{_name(ds)}: no pixel data")
    header = header_from_dataset(ds)
    ts = UID(header.transfer_syntax_uid)
    _check_dataset_budget(ds, header, keyword, budget)
    _check_decoder(ds, ts)
    if ts.is_compressed and not ts.is_deflated:
        if indices is not None:
            indices = [i for i in indices if 0 <= i < header.number_of_frames]
        _check_codestreams(ds, header, ts, budget, indices)
    else:
        _check_native_length(ds, header, keyword)
    return header, ts


def check_budget(source: Dataset | str | Path, budget: Budget = DEFAULT_BUDGET) -> ImageHeader:
    """Check, without decoding, that every frame of an image can be decoded here within
    ``budget``; return its header. Raises BudgetExceeded (over budget) or DecodeError."""
    return _checked(read_dataset(source), budget)[0]


def _finish(ds: Dataset, header: ImageHeader, arr: np.ndarray, ts: UID, single: bool) -> np.ndarray:
    """Palette expansion, a leading frame axis, native byte order, and the shape check."""
    try:
        if header.stored_photometric_interpretation == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            if arr.dtype == np.uint16:  # 16-bit LUT entries: bring them to the 8 bits the header says
                arr = np.floor(arr / 257.0 + 0.5).astype(np.uint8)
    except Exception as exc:  # pydicom raises many types: re-raise typed
        raise DecodeError(f"{_name(ds)}: could not apply the palette colour LUT: {redact(str(exc))}") from exc
    arr = np.asarray(arr)
    if single:
        arr = arr[np.newaxis, ...]
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    arr = np.ascontiguousarray(arr)
    expected_shape: tuple[int, ...] = (arr.shape[0], header.rows, header.cols)
    if header.photometric_interpretation == "RGB":
        expected_shape += (3,)
    if arr.shape != expected_shape:
        raise DecodeError(
            f"{_name(ds)}: decoded pixel array has shape {arr.shape}, expected {expected_shape}"
        )
    return arr


def decode(
    source: Dataset | str | Path,
    *,
    frames: FrameMode = "all",
    budget: Budget = DEFAULT_BUDGET,
) -> DecodedImage:
    """Decode the pixel data of one instance into stored values (native byte order).

    ``frames``: ``"all"`` decodes every frame; ``"single"`` refuses a multi-frame image with a
    DecodeError; ``"first"`` decodes only the first frame. The result always has a leading frame
    axis. YBR colour is converted to RGB and PALETTE COLOR expanded to 8-bit RGB; greyscale values
    are stored values (apply the modality LUT in preprocessing). The header is the image's
    (per-frame values in ``header.frame_values``); ``iter_frames`` yields per-frame headers.
    Nothing is decoded over ``budget`` (BudgetExceeded).
    """
    ds = read_dataset(source)
    header, ts = _checked(ds, budget, [0] if frames == "first" else None)
    if header.number_of_frames > 1 and frames == "single":
        raise DecodeError(
            f"{_name(ds)}: multi-frame image ({header.number_of_frames} frames) where a single frame "
            "was expected"
        )
    index = 0 if frames == "first" else None
    try:
        arr = pixel_array(ds, index=index)
    except DecodeError:
        raise
    except Exception as exc:  # pydicom and its plugins raise many types: re-raise typed
        raise DecodeError(
            f"{_name(ds)}: could not decode pixel data ({ts.name}): {redact(str(exc))}"
        ) from exc
    arr = _finish(ds, header, arr, ts, single=header.number_of_frames == 1 or index is not None)
    log.debug("decoded %s: %s %s via %s", _name(ds), arr.shape, arr.dtype, ts.name)
    return DecodedImage(header=header, pixels=arr)


def decode_frame(source: Dataset | str | Path, index: int, budget: Budget = DEFAULT_BUDGET) -> DecodedImage:
    """Decode frame ``index`` (0-based) alone; the header is that frame's (``ImageHeader.for_frame``).
    Nothing is decoded over ``budget`` (BudgetExceeded)."""
    ds = read_dataset(source)
    header, ts = _checked(ds, budget, [index])
    if not 0 <= index < header.number_of_frames:
        raise DecodeError(
            f"{_name(ds)}: frame {index + 1} asked for, the image has {header.number_of_frames}"
        )
    try:
        arr = pixel_array(ds, index=index)
    except Exception as exc:  # pydicom and its plugins raise many types: re-raise typed
        raise DecodeError(
            f"{_name(ds)}: could not decode frame {index + 1} of the pixel data ({ts.name}): "
            f"{redact(str(exc))}"
        ) from exc
    arr = _finish(ds, header, arr, ts, single=True)
    return DecodedImage(header=header.for_frame(index), pixels=arr)


#: native transfer syntaxes whose pixel data bytes are the little-endian stored values as they are
_NATIVE_LITTLE = frozenset({pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.ExplicitVRLittleEndian})


#: the last (array, (min, max)) :func:`stored_range` computed, for an array that cannot change
_last_range: tuple[np.ndarray, tuple[int, int]] | None = None


def _immutable(arr: np.ndarray) -> bool:
    """True for a read-only view whose memory is a ``bytes`` object or a read-only mapping of
    a file (a native frame; the node's files are never changed once stored)."""
    base: object = arr
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    if isinstance(base, memoryview):
        return base.readonly and isinstance(base.obj, mmap.mmap)
    return isinstance(base, bytes)


def stored_range(arr: np.ndarray) -> tuple[int, int]:
    """(minimum, maximum) of an integer frame (H, W) in one pass (OpenCV's minMaxLoc). The
    result for a native frame (a view of immutable bytes, which cannot change) is kept until
    the next call, so that decoding, the reduction and the display share one pass."""
    global _last_range
    key = (arr.__array_interface__["data"][0], arr.shape, arr.strides, arr.dtype.str)
    last = _last_range
    if last is not None:
        held, found = last
        if (held.__array_interface__["data"][0], held.shape, held.strides, held.dtype.str) == key:
            return found
    if arr.ndim == 2 and arr.dtype.itemsize <= 2 and arr.dtype.kind in "iu":
        low, high, _, _ = cv2.minMaxLoc(arr)
        found = (int(low), int(high))
    else:
        found = (int(arr.min()), int(arr.max()))
    # the array is held, so its memory cannot be freed and reused by another while it is here
    _last_range = (arr, found) if _immutable(arr) else None
    return found


def forget_stored_range() -> None:
    """Drop what :func:`stored_range` keeps (it holds its frame, and so the file's pixel bytes,
    alive): called once an instance is prepared, so that no instance outlives its turn."""
    global _last_range
    _last_range = None


def _native_frame(ds: Dataset, header: ImageHeader, ts: UID, index: int) -> np.ndarray | None:
    """Frame ``index`` of native little-endian greyscale pixel data as a read-only view of the
    data set's bytes (or of the file's pages, when :func:`read_dataset` left the pixel data in
    the file), or None where pydicom's decode must run.

    It is what pydicom's ``pixel_array`` gives (same dtype, shape, values; no copy, no masking
    pass) for 8- or 16-bit MONOCHROME samples: pydicom reads the same bytes and, when BitsStored
    < BitsAllocated, clears (unsigned) or sign-extends (signed) the bits above BitsStored; that
    changes nothing when every value already lies in BitsStored's range, which is checked here
    (one min/max pass); a frame with a value outside it goes to pydicom."""
    if (
        ts not in _NATIVE_LITTLE
        or "PixelData" not in ds
        or header.samples_per_pixel != 1
        or header.stored_photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2")
        or header.bits_allocated not in (8, 16)
        or not 1 <= header.bits_stored <= header.bits_allocated
        or header.pixel_representation not in (0, 1)
    ):
        return None
    buffer: bytes | memoryview | None = _mapped_pixels(ds)
    if buffer is None:
        buffer = ds.PixelData
        if not isinstance(buffer, bytes):
            return None
    signed = header.pixel_representation == 1
    dtype = np.dtype(f"<{'i' if signed else 'u'}{header.bits_allocated // 8}")
    count = header.rows * header.cols
    offset = index * count * dtype.itemsize
    if offset + count * dtype.itemsize > len(buffer):
        return None
    arr = np.frombuffer(buffer, dtype=dtype, count=count, offset=offset).reshape(header.rows, header.cols)
    bits = header.bits_stored
    if bits < header.bits_allocated:
        low, high = stored_range(arr)
        lowest, highest = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        if low < lowest or high > highest:
            return None  # bits set above BitsStored: pydicom's correction
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def iter_frames(source: Dataset | str | Path, budget: Budget = DEFAULT_BUDGET) -> Iterator[DecodedImage]:
    """Decode an image frame by frame (pydicom's ``iter_pixels``): one DecodedImage per frame,
    each holding one frame and that frame's header (``ImageHeader.for_frame``), so that a
    500-frame image never needs all its decoded frames in memory at once. Every frame is checked
    against ``budget`` before the first is decoded (BudgetExceeded)."""
    ds = read_dataset(source)
    header, ts = _checked(ds, budget)
    if header.number_of_frames == 1 and (native := _native_frame(ds, header, ts, 0)) is not None:
        yield DecodedImage(header=header.for_frame(0), pixels=native[np.newaxis])
        return
    frames = iter_pixels(ds) if header.number_of_frames > 1 else iter([pixel_array(ds)])
    index = 0
    while True:
        try:
            arr = next(frames)
        except StopIteration:
            break
        except Exception as exc:  # pydicom and its plugins raise many types: re-raise typed
            raise DecodeError(
                f"{_name(ds)}: could not decode frame {index + 1} of the pixel data ({ts.name}): "
                f"{redact(str(exc))}"
            ) from exc
        if index >= header.number_of_frames:
            break
        yield DecodedImage(header=header.for_frame(index), pixels=_finish(ds, header, arr, ts, single=True))
        index += 1
    if index < header.number_of_frames:
        raise DecodeError(
            f"{_name(ds)}: pixel data holds {index} frame(s), NumberOfFrames says {header.number_of_frames}"
        )


def slice_order(headers: Sequence[ImageHeader]) -> list[int]:
    """Indices of ``headers`` sorted for display/volume order.

    Sorts along the slice normal (from ImageOrientationPatient and ImagePositionPatient) when every
    header has both, else by InstanceNumber and frame number, else keeps the given order. Frames
    of a multi-frame image take part with their own headers (``ImageHeader.for_frame``: per-frame
    positions), so slices and frames are ordered alike; ties keep the given order.
    """
    n = len(headers)
    if n == 0:
        return []
    if all(h.image_position_patient and h.image_orientation_patient for h in headers):
        iop = np.asarray(headers[0].image_orientation_patient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        keys = [float(np.dot(normal, np.asarray(h.image_position_patient))) for h in headers]
        return sorted(range(n), key=lambda i: (keys[i], i))
    if all(h.instance_number is not None for h in headers):
        return sorted(range(n), key=lambda i: (headers[i].instance_number, headers[i].frame_number or 0, i))
    return list(range(n))


#: transfer syntaxes whose frames are JPEG 2000 / HTJ2K codestreams (Pillow's JPEG 2000 plugin,
#: OpenJPEG underneath, decodes them at a reduced resolution where that OpenJPEG can)
_J2K_SYNTAXES = frozenset(
    {
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.JPEG2000,
        pydicom.uid.HTJ2KLossless,
        pydicom.uid.HTJ2KLosslessRPCL,
        pydicom.uid.HTJ2K,
    }
)


def _pillow_reduced(codestream: bytes, ts: UID, k: int, header: ImageHeader) -> np.ndarray | None:
    """One frame decoded by Pillow at 1/2**k of its size, as stored values of the dtype pydicom
    gives; None where Pillow cannot (no OpenJPEG, HTJ2K unsupported, an unexpected mode)."""
    import io

    from PIL import Image

    try:
        claim = frame_claim(ts, codestream)
    except CodestreamError:
        return None
    if claim is None:
        return None
    precision, signed = claim.bits, claim.signed
    # pydicom decodes to the codestream's precision and corrects only a sign that differs from
    # PixelRepresentation: a precision above BitsStored (OpenJPH writes 16 for 12-bit data held
    # in 16-bit integers) gives the decoder's values unchanged, as here (clipped below to
    # BitsStored's range, as OpenJPEG clips to the precision); other mismatches keep pydicom's
    # full decode
    if signed != bool(header.pixel_representation):
        return None
    if not header.bits_stored <= precision <= header.bits_allocated:
        return None
    try:
        with Image.open(io.BytesIO(codestream)) as im:
            im.reduce = k  # type: ignore[method-assign,assignment]  # the plugin's resolution level
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except Exception as exc:  # Pillow and OpenJPEG raise many types
        log.debug("reduced %s decode at 1/%d not possible here (%s)", ts.name, 2**k, type(exc).__name__)
        return None
    if header.samples_per_pixel == 3:
        return arr if mode == "RGB" and precision == 8 else None
    if mode == "L" and precision == 8 and not signed:
        return arr if header.bits_allocated == 8 else None  # pydicom gives uint16 there
    if mode != "I;16" or not 8 < precision <= 16:
        return None
    # Pillow scales to 16 bits (and offsets signed values to unsigned): undo both
    values = arr.astype(np.int32) >> (16 - precision)
    if signed:
        values -= 1 << (precision - 1)
    if precision > header.bits_stored:
        # OpenJPEG clips the reduced image to the codestream's range: a low-pass value past
        # BitsStored's (an edge's overshoot) is clipped to it here, as at precision == BitsStored
        bits = header.bits_stored
        low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        np.clip(values, low, high, out=values)
    return values.astype(np.int16 if signed else np.uint16)


def _pillow_can_reduce(rows: int, cols: int, k: int) -> bool:
    """Whether Pillow's JPEG 2000 plugin can decode a rows x cols image at ``1 / 2**k``: it
    sizes the reduced image ``(size + 2**(k-1)) // 2**k`` where OpenJPEG makes
    ``ceil(size / 2**k)`` and fails (OSError, after OpenJPEG's decode) where the two differ
    (Pillow 13 ``Jpeg2KImageFile.load``; 2500 rows at 1/16: 156 against 157). Not trying such
    a level took a 2500 x 2048 HTJ2K frame asked at 1/16 from 5.0 to 3.8 ms (JPEG 2000: 14.1 to
    13.0 ms), the same frame at 1/8."""
    half = 1 << (k - 1)
    return all((n + half) >> k == -(-n >> k) for n in (rows, cols))


def iter_frames_reduced(
    source: Dataset | str | Path, reduce: int, budget: Budget = DEFAULT_BUDGET
) -> Iterator[tuple[DecodedImage, int]]:
    """As :func:`iter_frames`, each frame decoded at ``1 / 2**k`` of its size where that is
    possible: ``k = min(reduce, the codestream's decomposition levels)``. Yields (frame, k); a
    frame at k > 0 has ``ceil(rows / 2**k) x ceil(cols / 2**k)`` pixels (its header stays the
    source's). k is 0 (pydicom's full decode) for a transfer syntax other than JPEG 2000 /
    HTJ2K, a greyscale image over 16 bits or colour over 8, a palette, or where Pillow cannot
    decode the frame. Every frame is checked against ``budget`` first, as ``iter_frames`` does."""
    ds = read_dataset(source)
    header, ts = _checked(ds, budget)
    usable = (
        reduce > 0
        and ts in _J2K_SYNTAXES
        and header.stored_photometric_interpretation != "PALETTE COLOR"
        and header.samples_per_pixel in (1, 3)
    )
    if not usable:
        for image in iter_frames(ds, budget):
            yield image, 0
        return
    eot = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    extended = (eot[0], eot[1]) if eot[0] and eot[1] else None
    for index in range(header.number_of_frames):
        try:
            codestream = get_frame(
                ds.PixelData, index, extended_offsets=extended, number_of_frames=header.number_of_frames
            )
        except Exception as exc:  # pydicom's encapsulation parsers raise several types
            raise DecodeError(
                f"{_name(ds)}: encapsulated pixel data cannot be split into frames: {redact(str(exc))}"
            ) from exc
        levels = j2k_levels(codestream) or 0
        arr, k = None, min(reduce, levels)
        # Pillow 13 / OpenJPEG 2.5 refuse some levels whose size does not divide evenly
        # (1250 rows at 1/8): the next lower level is tried then (those that Pillow sizes
        # wrongly without a try)
        while k > 0:
            if not _pillow_can_reduce(header.rows, header.cols, k):
                k -= 1
                continue
            arr = _pillow_reduced(codestream, ts, k, header)
            expected = (-(-header.rows // 2**k), -(-header.cols // 2**k))
            if arr is not None and arr.shape[:2] == expected:
                break
            arr, k = None, k - 1
        if arr is None:
            log.debug(
                "%s frame %d: full decode (asked 1/%d, codestream has %d levels)",
                _name(ds),
                index + 1,
                2**reduce,
                levels,
            )
            yield decode_frame(ds, index, budget), 0
            continue
        pixels = np.ascontiguousarray(arr[np.newaxis, ...])
        yield DecodedImage(header=header.for_frame(index), pixels=pixels), k
