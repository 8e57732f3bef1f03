"""Helpers shared by the output writers: header copies, coded concepts, coding schemes, equipment."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from node.outputs import OutputError
from node.outputs.identity import algorithm_device_uid, make_uid
from node.types import AlgorithmIdentity, Code, OutputIdentity

log = logging.getLogger(__name__)

#: The line every output of a research model carries (in descriptions and SR text).
NOT_FOR_DIAGNOSIS = "Research use only - not for diagnosis"
#: The same line as burned into the secondary captures.
BURNED_IN_WARNING = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
#: ManufacturerModelName of the node as a device (its SRs' device observer, General Equipment).
NODE_MODEL_NAME = "pacs-node inference node"

#: Series numbers of the output series (several models may write into one study: numbers need
#: not be unique, the UIDs are).
SR_SERIES_NUMBER = 9900
SC_SERIES_NUMBER = 9901
PM_SERIES_NUMBER = 9902

# Patient and study attributes of Type 2 that highdicom copies from the first source and that
# pydicom's test files (and some modalities) leave out: filled with empty values.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_PIXEL_KEYWORDS = {
    "PixelData",
    "FloatPixelData",
    "DoubleFloatPixelData",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
    "DataSetTrailingPadding",
}

# Coding schemes of PS3.16 Table 8-1 that need no Coding Scheme Identification item.
_STANDARD_SCHEMES = {
    "DCM",
    "SCT",
    "SRT",
    "LN",
    "UCUM",
    "RADLEX",
    "NCIt",
    "UMLS",
    "FMA",
    "MSH",
    "UBERON",
    "I10",
    "ICD10",
    "ACR",
    "MDC",
    "NEU",
    "RXNORM",
    "UPC",
}


def _valid_date_time(elem: DataElement) -> bool:
    """False for a DA, TM or DT element whose value pydicom cannot read as one (highdicom would
    refuse it, quoting the value); True for any other element."""
    from pydicom.valuerep import DA, DT, TM

    kind = {"DA": DA, "TM": TM, "DT": DT}.get(str(elem.VR))
    raw = elem.value
    if kind is None or raw in (None, ""):
        return True
    values = raw if isinstance(raw, (list, tuple, MultiValue)) else [raw]
    try:
        for value in values:
            if value not in (None, ""):
                kind(str(value))
    except (ValueError, TypeError, OverflowError):
        return False
    return True


def header_copy(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without its pixel data, with absent Type 2 patient/study attributes
    (see ``_TYPE2_PATIENT_STUDY``) added empty. The caller's data set is not changed."""
    out = Dataset()
    for elem in ds:
        if elem.keyword in _PIXEL_KEYWORDS or elem.tag.group == 0x7FE0:
            continue
        out.add(copy.deepcopy(elem))
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in out:
            setattr(out, keyword, None)
        elif not _valid_date_time(out[keyword]):  # e.g. a birth date as 1911-09-27: unknown
            log.info("%s is not a valid %s: the outputs carry it empty", keyword, out[keyword].VR)
            setattr(out, keyword, None)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not out.get(keyword):
            raise OutputError(f"a source instance has no {keyword}")
    return out


def evidence_reference(ds: Dataset) -> Dataset:
    """The four UIDs that list ``ds`` as evidence of an SR (its study, series, instance and class)."""
    out = Dataset()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = ds.get(keyword)
        if not value:
            raise OutputError(f"a source instance has no {keyword}")
        setattr(out, keyword, value)
    return out


def ascii_text(text: str, limit: int | None = None) -> str:
    """``text`` with non-ASCII characters replaced (safe in the default character repertoire and in
    Hershey fonts), cut to ``limit`` characters."""
    out = "".join(ch if 32 <= ord(ch) < 127 else "-" if ch in "\u2013\u2014" else "?" for ch in text)
    out = re.sub(r"\s+", " ", out).strip()
    return out[:limit] if limit is not None else out


def series_description(kind: str, algorithm: AlgorithmIdentity) -> str:
    """``"<kind> - <model> <version>"`` plus ``" - not for diagnosis"`` for research models, fitted
    into 64 characters (the model name is shortened first; the warning is never cut)."""
    tail = " - not for diagnosis" if algorithm.research_use_only else ""
    version = ascii_text(algorithm.version, 16)
    room = 64 - len(kind) - 3 - len(version) - 1 - len(tail)
    name = ascii_text(algorithm.name or algorithm.model_id)
    if len(name) > room:
        name = name[: max(room - 1, 1)].rstrip() + "~"
    return f"{kind} - {name} {version}{tail}"[:64]


def coded(code: Code | PydicomCode) -> hd.sr.CodedConcept:
    """A highdicom coded concept from a node :class:`~node.types.Code` or a pydicom code."""
    if isinstance(code, PydicomCode):
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    if not (code.value and code.scheme_designator and code.meaning):
        raise OutputError(f"incomplete code {code!r}: value, scheme and meaning are required")
    return hd.sr.CodedConcept(code.value, code.scheme_designator, ascii_text(code.meaning, 64) or code.value)


def coding_schemes(
    designators: Iterable[str], identity: OutputIdentity
) -> list[CodingSchemeIdentificationItem]:
    """Coding Scheme Identification items for the schemes not defined by PS3.16 (private ones such
    as ``99PACSNODE``, or a local scheme copied from a source's Procedure Code Sequence): a DICOM
    object must declare every such scheme it uses.

    Our own private schemes (``99...``) get a name, a UID under the organisation root and the
    manufacturer as responsible organisation; a foreign scheme is declared by its designator only
    (we do not know, and must not invent, its UID)."""
    items = []
    for designator in sorted({d for d in designators if d} - _STANDARD_SCHEMES):
        if designator.startswith("99"):
            item = CodingSchemeIdentificationItem(
                designator=designator,
                name=f"{ascii_text(identity.manufacturer, 40)} private codes ({designator})",
                responsible_organization=ascii_text(identity.manufacturer, 64) or None,
            )
            # Coding Scheme UID (Type 1C, "if available"); not registered, so no Coding Scheme
            # Registry (highdicom keeps a UID only beside a registry, hence set here)
            item.CodingSchemeUID = make_uid(identity.uid_root, "pacs-node coding scheme", designator)
            items.append(item)
        else:
            items.append(CodingSchemeIdentificationItem(designator=designator))
    return items


def node_observer(identity: OutputIdentity) -> hd.sr.ObserverContext:
    """The node as the device observer (TID 1004) of the documents it writes (SR, KOS)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name=ascii_text(identity.device_name, 64) or None,
            manufacturer_name=ascii_text(identity.manufacturer, 64) or None,
            model_name=NODE_MODEL_NAME,
        ),
    )


def closed_polygon(points: np.ndarray, max_points: int) -> np.ndarray | None:
    """(N, 2) outline points thinned to about ``max_points``, without consecutive repeats or a
    repeated last point, closed (the first point again at the end); None when fewer than 3
    distinct points remain."""
    if len(points) > max_points:
        points = points[:: int(np.ceil(len(points) / max_points))]
    keep = np.ones(len(points), dtype=bool)
    keep[1:] = np.any(np.diff(points, axis=0) != 0, axis=1)
    points = points[keep]
    if len(points) > 1 and np.array_equal(points[0], points[-1]):
        points = points[:-1]
    if len(np.unique(points, axis=0)) < 3:
        return None
    return np.vstack([points, points[:1]])


def algorithm_equipment(algorithm: AlgorithmIdentity, identity: OutputIdentity) -> hd.ContributingEquipment:
    """The model as Contributing Equipment (0018,A001), as IHE AIR asks.

    Purpose of Reference: (109102, DCM, "Processing Equipment") from CID 7005: the model processed
    the source images into new instances (109103 "Modifying Equipment" is for equipment that
    changed existing instances). Manufacturer Model Name is the model's name, Software Versions its
    version, Device UID is derived from the model file's SHA-256.
    """
    item = hd.ContributingEquipment(
        manufacturer=ascii_text(algorithm.manufacturer, 64) or "unknown",
        purpose_of_reference=hd.sr.CodedConcept.from_code(codes.DCM.ProcessingEquipment),
        manufacturer_model_name=ascii_text(algorithm.name or algorithm.model_id, 64),
        software_versions=ascii_text(algorithm.version, 64),
        institution_name=ascii_text(identity.institution_name, 64) or None,
        station_name=ascii_text(identity.device_name, 16) or None,
        contribution_description=ascii_text(
            f"AI model {algorithm.model_id}"
            + (" (research use only, not for diagnosis)" if algorithm.research_use_only else ""),
            64,
        ),
    )
    item.DeviceUID = algorithm_device_uid(identity, algorithm)
    return item


# Visual explanation codes (DCM 130401-130404; 130402-130404 are in CID 7180 "Abstract
# Multi-dimensional Image Model Component Semantics", the value set of a parametric map's quantity).
VISUAL_EXPLANATION = hd.sr.CodedConcept.from_code(codes.DCM.VisualExplanation)
CLASS_ACTIVATION = hd.sr.CodedConcept.from_code(codes.DCM.ClassActivation)
GRADIENT_WEIGHTED_CLASS_ACTIVATION = hd.sr.CodedConcept.from_code(codes.DCM.GradientWeightedClassActivation)
SALIENCY = hd.sr.CodedConcept.from_code(codes.DCM.Saliency)


def explanation_concept(method: str) -> hd.sr.CodedConcept:
    """The DCM visual-explanation code for a heatmap method of the manifest.

    ``gradcam``/``grad-cam`` -> Gradient-weighted class activation; ``cam`` (class activation maps
    computed in the graph) -> Class activation; ``occlusion`` and ``patch`` (perturbation and
    sliding-window maps) -> Saliency; anything else -> Visual explanation.
    """
    key = method.lower().replace("-", "").replace("_", "")
    if key in {"gradcam", "gradcam++", "gradcampp", "hirescam"}:
        return GRADIENT_WEIGHTED_CLASS_ACTIVATION
    if key == "cam":
        return CLASS_ACTIVATION
    if key in {"occlusion", "patch", "saliency"}:
        return SALIENCY
    return VISUAL_EXPLANATION


#: Body parts (BodyPartExamined, PS3.16 Annex L) that are paired: a series of them must say
#: its Laterality, or leave it empty when it is unknown or mixed.
_PAIRED_BODY_PARTS = {
    "BREAST",
    "EYE",
    "EAR",
    "KIDNEY",
    "LUNG",
    "OVARY",
    "TESTIS",
    "ADRENAL",
    "HAND",
    "FOOT",
    "KNEE",
    "HIP",
    "SHOULDER",
    "ELBOW",
    "WRIST",
    "ANKLE",
    "ARM",
    "LEG",
    "UPPER LIMB",
    "LOWER LIMB",
    "CLAVICLE",
    "FEMUR",
    "TIBIA",
    "FIBULA",
    "HUMERUS",
    "RADIUS",
    "ULNA",
    "SCAPULA",
    "PAROTID",
    "THUMB",
    "TOE",
    "FINGER",
    "CALCANEUS",
    "PATELLA",
    "ORBIT",
    "EXTREMITY",
}


#: Body parts that are neither a paired organ nor one dciodvfy (dicom3tools) takes as unpaired:
#: the skin (a lesion anywhere on the body) and the blood. Laterality is required for them as
#: dciodvfy reads the Type 2C condition, so a series of them says it is unknown (empty) rather
#: than leaving it out as for the chest.
_BODY_PARTS_WITHOUT_SIDE = {"SKIN", "BLOOD"}


def series_laterality(sources: Iterable[Dataset]) -> str | None:
    """The Laterality (R or L) shared by all ``sources`` (their Laterality, else Image Laterality),
    or None when they differ or do not say."""
    found = set()
    for ds in sources:
        value = str(ds.get("Laterality") or ds.get("ImageLaterality") or "").upper()
        found.add(value if value in {"R", "L"} else "")
    return found.pop() if len(found) == 1 and "" not in found else None


def set_series_laterality(out: Dataset, sources: Sequence[Dataset]) -> None:
    """Body Part Examined and Laterality (0020,0060) of an output series made from ``sources``.

    Body Part Examined is copied when every source names the same part. Laterality (General
    Series, Type 2C: required for paired body parts) is R or L when every source says the same;
    absent when the body part is known and unpaired (the chest, whose images say U or nothing:
    the attribute is not allowed there); otherwise empty, i.e. unknown (a mammography series with
    both breasts, skin or blood without a side, or an image whose body part is not stated). An
    output carrying the Specimen module (ContainerIdentifier) has no Laterality."""
    parts = {str(ds.get("BodyPartExamined") or "").upper() for ds in sources}
    if len(parts) == 1 and "" not in parts and not out.get("BodyPartExamined"):
        out.BodyPartExamined = parts.pop()
    if "ContainerIdentifier" in out:
        # a specimen (the Specimen module, as a presentation state over a microscopy slide copies
        # it): dciodvfy allows no Laterality there
        if "Laterality" in out:
            del out.Laterality
        return
    value = series_laterality(sources)
    if value is not None:
        out.Laterality = value
        return
    part = str(out.get("BodyPartExamined") or "").upper()
    stated = any(
        str(ds.get("Laterality") or ds.get("ImageLaterality") or "").upper() in {"R", "L", "B"}
        for ds in sources
    )
    if part and part not in _PAIRED_BODY_PARTS and part not in _BODY_PARTS_WITHOUT_SIDE and not stated:
        if "Laterality" in out:
            del out.Laterality
    else:
        out.Laterality = None


def sources_by_uid(sources: Sequence[Dataset]) -> dict[str, Dataset]:
    """Source data sets by SOP Instance UID."""
    return {str(ds.SOPInstanceUID): ds for ds in sources}


# ---------------------------------------------------------------------------------------------
# Geometry and other optional attributes of real sources: validated before any builder uses or
# copies them (a builder never fails on, and never copies, an invalid optional value).

#: Attributes a header copy never carries as they came: they are validated and set again by
#: :func:`clean_header` (or left out).
_GEOMETRY_KEYWORDS = (
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PatientOrientation",
    "SliceThickness",
    "FrameOfReferenceUID",
)
_ORIENTATION_LETTERS = re.compile(r"^[LRAPHF]{1,3}$")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def safe_get(ds: Dataset, keyword: str) -> object:
    """``ds.get(keyword)``, or None when the stored value cannot even be decoded."""
    try:
        return ds.get(keyword)
    except (ValueError, TypeError, OverflowError, AttributeError, KeyError, LookupError):
        return None


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    """Exactly ``count`` finite numbers from a DICOM multi-value (DS/FD/str), else None."""
    if value is None or isinstance(value, bytes):
        return None
    items = [value] if isinstance(value, str | int | float) else list(value)  # type: ignore[call-overload]
    if len(items) != count:
        return None
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(n == n and abs(n) != float("inf") for n in numbers):
        return None
    return numbers


def valid_spacing(value: object) -> tuple[float, float] | None:
    """(row, column) spacing in mm when ``value`` holds exactly two positive finite numbers."""
    numbers = _floats(value, 2)
    if numbers is None or min(numbers) <= 0:
        return None
    return numbers[0], numbers[1]


def valid_orientation(value: object) -> tuple[float, float, float, float, float, float] | None:
    """Image Orientation (Patient) when it holds two orthogonal unit vectors (within 1 %)."""
    numbers = _floats(value, 6)
    if numbers is None:
        return None
    row, col = numbers[:3], numbers[3:]
    norm_r = sum(v * v for v in row) ** 0.5
    norm_c = sum(v * v for v in col) ** 0.5
    dot = sum(a * b for a, b in zip(row, col, strict=True))
    if abs(norm_r - 1.0) > 0.01 or abs(norm_c - 1.0) > 0.01 or abs(dot) > 0.01:
        return None
    return numbers  # type: ignore[return-value]


def valid_position(value: object) -> tuple[float, float, float] | None:
    """Image Position (Patient) when it holds exactly three finite numbers."""
    numbers = _floats(value, 3)
    return None if numbers is None else (numbers[0], numbers[1], numbers[2])


def valid_patient_orientation(value: object) -> tuple[str, str] | None:
    """Patient Orientation (row direction, column direction) when both are anatomical letters."""
    if value is None or isinstance(value, str | bytes):
        return None
    try:
        items = [str(v).strip().upper() for v in value]  # type: ignore[attr-defined]
    except TypeError:
        return None
    if len(items) != 2 or not all(_ORIENTATION_LETTERS.match(v) for v in items):
        return None
    return items[0], items[1]


def valid_uid(value: object) -> str | None:
    """``value`` when it is a syntactically valid UID."""
    text = str(value or "").strip()
    return text if len(text) <= 64 and _UID.match(text) else None


def _frame_items(ds: Dataset, frame: int | None) -> list[Dataset]:
    """The per-frame functional group item of ``frame`` (1-based; else the first) and the shared
    item of an enhanced multi-frame object, in that order of precedence; [] for classic objects."""
    items: list[Dataset] = []
    per_frame = safe_get(ds, "PerFrameFunctionalGroupsSequence")
    if per_frame:
        index = (frame or 1) - 1
        if 0 <= index < len(per_frame):  # type: ignore[arg-type]
            items.append(per_frame[index])  # type: ignore[index]
    shared = safe_get(ds, "SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])  # type: ignore[index]
    return items


def _macro_value(ds: Dataset, frame: int | None, macro: str, keyword: str) -> object:
    """``keyword`` from functional group ``macro`` of ``frame`` (per-frame first), else from the
    top level of ``ds``."""
    for item in _frame_items(ds, frame):
        seq = safe_get(item, macro)
        if seq:
            value = safe_get(seq[0], keyword)  # type: ignore[index]
            if value not in (None, ""):
                return value
    return safe_get(ds, keyword)


@dataclass(frozen=True)
class PlaneGeometry:
    """The valid geometry of one source frame; None where the source has no valid value."""

    pixel_spacing: tuple[float, float] | None
    #: "PixelSpacing" or "ImagerPixelSpacing": where ``pixel_spacing`` came from
    spacing_source: str | None
    imager_pixel_spacing: tuple[float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    position: tuple[float, float, float] | None
    slice_thickness: float | None
    frame_of_reference_uid: str | None
    patient_orientation: tuple[str, str] | None
    notes: tuple[str, ...] = ()


def plane_geometry(ds: Dataset, frame: int | None = None) -> PlaneGeometry:
    """The geometry of ``frame`` (1-based) of ``ds``, from its functional groups (enhanced objects)
    or its top-level attributes, each value validated (see ``valid_*``): invalid or missing values
    are None and named in ``notes``."""
    notes = []
    spacing = valid_spacing(_macro_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing"))
    imager = valid_spacing(safe_get(ds, "ImagerPixelSpacing"))
    source = "PixelSpacing" if spacing else None
    if spacing is None:
        raw = safe_get(ds, "PixelSpacing")
        if raw not in (None, ""):
            notes.append("Pixel Spacing of the source is invalid and left out")
        if imager is not None:
            spacing, source = imager, "ImagerPixelSpacing"
    orientation = valid_orientation(
        _macro_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient")
    )
    position = valid_position(_macro_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient"))
    thickness_value = _floats(_macro_value(ds, frame, "PixelMeasuresSequence", "SliceThickness"), 1)
    thickness = thickness_value[0] if thickness_value and thickness_value[0] > 0 else None
    return PlaneGeometry(
        pixel_spacing=spacing,
        spacing_source=source,
        imager_pixel_spacing=imager,
        orientation=orientation,
        position=position,
        slice_thickness=thickness,
        frame_of_reference_uid=valid_uid(safe_get(ds, "FrameOfReferenceUID")),
        patient_orientation=valid_patient_orientation(safe_get(ds, "PatientOrientation")),
        notes=tuple(notes),
    )


def clean_header(ds: Dataset, frame: int | None = None, flatten: bool = False) -> Dataset:
    """A header copy (see :func:`header_copy`) whose optional attributes are safe to hand to
    highdicom: the geometry of ``frame`` validated (see :func:`plane_geometry`) and set as classic
    top-level attributes where valid, left out where not; with ``flatten`` the functional groups
    and the frame count are left out too (the copy then describes that one frame); Laterality
    and Image Laterality kept only when R, L, B or U; an unknown Specific Character Set replaced
    by ISO_IR 192 (the values are already decoded, so UTF-8 carries them)."""
    geometry = plane_geometry(ds, frame)
    out = header_copy(ds)
    flat = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "NumberOfFrames")
    for keyword in (*_GEOMETRY_KEYWORDS, *(flat if flatten else ()), "FrameIncrementPointer"):
        if keyword in out:
            delattr(out, keyword)
    if geometry.spacing_source == "PixelSpacing" and geometry.pixel_spacing:
        out.PixelSpacing = list(geometry.pixel_spacing)
    if geometry.imager_pixel_spacing:
        out.ImagerPixelSpacing = list(geometry.imager_pixel_spacing)
    if geometry.orientation:
        out.ImageOrientationPatient = list(geometry.orientation)
    if geometry.position:
        out.ImagePositionPatient = list(geometry.position)
    if geometry.slice_thickness:
        out.SliceThickness = geometry.slice_thickness
    if geometry.frame_of_reference_uid:
        out.FrameOfReferenceUID = geometry.frame_of_reference_uid
    if geometry.patient_orientation:
        out.PatientOrientation = list(geometry.patient_orientation)
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(safe_get(out, keyword) or "").strip().upper()
        if keyword in out and value not in {"R", "L", "B", "U"}:
            delattr(out, keyword)
    fix_character_set(out)
    return out


def fix_character_set(ds: Dataset) -> None:
    """Replace a Specific Character Set that pydicom or highdicom cannot write by ISO_IR 192
    (UTF-8), in place.

    pydicom has already decoded the values (falling back to the default repertoire), so writing
    them as UTF-8 keeps what was read; copying an unknown term would make the output invalid, and
    highdicom refuses the empty first value of a code-extension set (``\\ISO 2022 IR 100``)."""
    from pydicom.charset import python_encoding

    value = safe_get(ds, "SpecificCharacterSet")
    if value in (None, ""):
        return
    terms = [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    writable = {v.value for v in hd.SpecificCharacterSetValues}
    known = all(str(t).strip() in python_encoding and str(t).strip() in writable for t in terms)
    if not known:
        log.info("a Specific Character Set outputs cannot carry as is: written as ISO_IR 192")
        ds.SpecificCharacterSet = "ISO_IR 192"


def referenced_frame(ds: Dataset, frame: int | None) -> int | None:
    """The frame number a reference to ``ds`` names: ``frame`` when ``ds`` has several frames and
    its SOP class is a multi-frame one; None otherwise (a reference to a single-frame class must
    not name a frame, even when a non-conformant file holds several)."""
    from highdicom._standard_utils import is_multiframe_image

    if frame is None:
        return None
    try:
        frames = int(safe_get(ds, "NumberOfFrames") or 1)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    if frames <= 1 or not is_multiframe_image(ds):
        return None
    return int(frame)
