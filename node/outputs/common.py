"""Helpers shared by the output writers: header copies, coded concepts, coding schemes, equipment."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
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


def algorithm_equipment(algorithm: AlgorithmIdentity, identity: OutputIdentity) -> hd.ContributingEquipment:
    """The model as Contributing Equipment (0018,A001), as IHE AIR asks.

    Purpose of Reference: (109102, DCM, "Processing Equipment") from CID 7005: the model processed
    the source images into new instances (109103 "Modifying Equipment" is for equipment that
    changed existing instances). Manufacturer Model Name is the model's name, Software Versions its
    version, Device UID is derived from the model file's SHA-256.
    """
    item = hd.ContributingEquipment(
        manufacturer=ascii_text(algorithm.manufacturer, 64) or "unknown",
        purpose_of_reference=hd.sr.CodedConcept("109102", "DCM", "Processing Equipment"),
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
VISUAL_EXPLANATION = hd.sr.CodedConcept("130401", "DCM", "Visual explanation")
CLASS_ACTIVATION = hd.sr.CodedConcept("130402", "DCM", "Class activation")
GRADIENT_WEIGHTED_CLASS_ACTIVATION = hd.sr.CodedConcept("130403", "DCM", "Gradient-weighted class activation")
SALIENCY = hd.sr.CodedConcept("130404", "DCM", "Saliency")


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
    both breasts, or an image whose body part is not stated)."""
    parts = {str(ds.get("BodyPartExamined") or "").upper() for ds in sources}
    if len(parts) == 1 and "" not in parts and not out.get("BodyPartExamined"):
        out.BodyPartExamined = parts.pop()
    value = series_laterality(sources)
    if value is not None:
        out.Laterality = value
        return
    part = str(out.get("BodyPartExamined") or "").upper()
    stated = any(
        str(ds.get("Laterality") or ds.get("ImageLaterality") or "").upper() in {"R", "L", "B"}
        for ds in sources
    )
    if part and part not in _PAIRED_BODY_PARTS and not stated:
        if "Laterality" in out:
            del out.Laterality
    else:
        out.Laterality = None


def sources_by_uid(sources: Sequence[Dataset]) -> dict[str, Dataset]:
    """Source data sets by SOP Instance UID."""
    return {str(ds.SOPInstanceUID): ds for ds in sources}
