"""The findings as a DICOM Comprehensive 3D SR: TID 1500 Imaging Measurement Report, IHE AIR style.

Structure (highdicom templates)::

    CONTAINER (126000, DCM, "Imaging Measurement Report")            TID 1500
      Language, Observation context: device observer = the node       TID 1204, 1001/1004
      Procedure reported                                              source ProcedureCodeSequence
                                                                      or a default per modality
      Image Library                                                   TID 1600: the shown images
      Imaging Measurements
        one Measurement Group (TID 1501) per finding, each with:
          Tracking Identifier + Tracking UID (TID 4108), Finding (the label's code),
          Algorithm Identification (TID 4019: name, version, parameters),
          the probability as a NUM (UCUM "1"), a qualitative evaluation
          <label code> = Present | Absent (at the manifest threshold), and
          positive with a hotspot -> the Image Region (row 10c SCOORD: closed POLYLINE "Outline"
                                     around the hotspot, or POINT "Center" at the peak) SELECTED
                                     FROM the source image (and frame)
          otherwise              -> the images it was scored on (row 10b IMAGE)
      Qualitative Evaluations: TEXT Comment "Research use only - not for diagnosis" (research
                               models only)

Codes (all checked against pydicom's PS3.16 dictionary):

- probability: (111047, DCM, "Probability of cancer") for malignancy labels (its definition is the
  likelihood that a finding is malignant), otherwise (122157, DCM, "Probability"); unit
  (1, UCUM, "no units").
- presence: (52101004, SCT, "Present") / (272519000, SCT, "Absent") (CID 240/241); the concept
  name is the finding's own code so that viewers show e.g. "Pneumonia: Present". PixelMed's
  validator (2022 template tables) warns "Content Item not in template" for this CODE item: its
  TID 1501 has no qualitative-evaluation row yet; highdicom and DCMTK's TID 1501 have it.
- procedure reported: see ``_DEFAULT_PROCEDURES``.
- SCOORD coordinates are (column, row) with (0, 0) at the top left corner of the top left pixel,
  so a pixel centre (row, col) is written as (col + 0.5, row + 0.5).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, MutableSequence, Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.outputs import OutputError
from node.outputs.common import (
    NODE_MODEL_NAME,
    NOT_FOR_DIAGNOSIS,
    SR_SERIES_NUMBER,
    algorithm_equipment,
    ascii_text,
    coded,
    coding_schemes,
    evidence_reference,
    header_copy,
    series_description,
)
from node.outputs.identity import output_uid
from node.types import AnalysisResult, Heatmap, ImageResult, LabelScore, OutputIdentity

log = logging.getLogger(__name__)

PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
PROBABILITY_OF_CANCER = hd.sr.CodedConcept("111047", "DCM", "Probability of cancer")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
OUTLINE = hd.sr.CodedConcept("111041", "DCM", "Outline")
CENTER = hd.sr.CodedConcept("111010", "DCM", "Center")

# Procedure reported when the source has no Procedure Code Sequence (TID 1500 row 4, DCID 100
# "Quantitative Diagnostic Imaging Procedure"). Only members of CID 100 are used: PixelMed's
# validator reports any other code as an error (its CID 100 is the 2019 version, which lacks even
# (43468-8, LN, "XR unspecified body region")), so projection radiography and mammography fall
# back to the generic SNOMED CT procedure.
_DEFAULT_PROCEDURES = {
    "CT": hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region"),
    "MR": hd.sr.CodedConcept("25056-3", "LN", "MRI unspecified body region"),
    "NM": hd.sr.CodedConcept("49118-3", "LN", "NM unspecified body region"),
    "PT": hd.sr.CodedConcept("44136-0", "LN", "PET unspecified body region"),
}
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")

#: CID 29 "Acquisition Modality" by modality (the code values are the Modality values)
_CID29 = {getattr(codes.cid29, name).value: getattr(codes.cid29, name) for name in codes.cid29.dir()}

_MALIGNANCY_WORDS = ("malignan", "cancer", "carcinoma")
#: Polygons longer than this are simplified (a viewer draws them; a few hundred points is plenty).
_MAX_POLYGON_POINTS = 256


def build_sr(result: AnalysisResult, sources: Sequence[Dataset], identity: OutputIdentity) -> Dataset:
    """The Comprehensive 3D SR (TID 1500) describing ``result``, in a new series of the source study.

    ``sources`` are the analysed instances (pixel data may be absent); all are recorded as evidence,
    those shown in ``result.images`` form the image library. UIDs are derived from
    ``result.uid_seed`` (see :func:`node.outputs.identity.output_uid`). Raises
    :class:`~node.outputs.OutputError` when the result and sources do not fit together.
    """
    if not sources:
        raise OutputError("build_sr needs at least one source instance")
    by_uid = _Headers(sources)
    first = by_uid[str(sources[0].SOPInstanceUID)]
    # highdicom reads the patient and study from the first evidence item and only the UIDs of the
    # others: a full header copy of each of 300 CT slices cost ~2 s, four UIDs cost nothing
    evidence = [first, *(evidence_reference(ds) for ds in sources[1:])]
    if str(first.StudyInstanceUID) != result.study_uid:
        raise OutputError("the first source instance is not in the result's study")
    algorithm = result.algorithm
    seed = result.uid_seed

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name=ascii_text(identity.device_name, 64) or None,
            manufacturer_name=ascii_text(identity.manufacturer, 64) or None,
            model_name=NODE_MODEL_NAME,
        ),
    )
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=ascii_text(algorithm.name or algorithm.model_id, 64),
        version=ascii_text(algorithm.version, 64) or "0",
        parameters=[ascii_text(algorithm.parameters, 64)] if algorithm.parameters.strip() else None,
    )
    groups = [
        _measurement_group(result, finding, index, by_uid, identity, algorithm_id)
        for index, finding in enumerate(result.findings)
    ]
    shown = [by_uid[im.sop_instance_uid] for im in result.images if im.sop_instance_uid in by_uid]
    library = list({str(ds.SOPInstanceUID): ds for ds in shown}.values())
    procedure = procedure_reported(first)
    try:
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=procedure,
            imaging_measurements=groups or None,
            referenced_images=library or None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"measurement report content could not be built: {exc}") from exc
    for item in report[0].ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "111028" and "ContentSequence" in item:
            _acquisition_modalities(item.ContentSequence, by_uid)  # Image Library
            if not item.ContentSequence:
                del item.ContentSequence  # an empty container has no Content Sequence
    if algorithm.research_use_only:
        report[0].ContentSequence.append(_research_notice(result))

    schemes = {procedure.scheme_designator}
    schemes.update(f.code.scheme_designator for f in result.findings)
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=output_uid(identity, seed, "sr", "series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=output_uid(identity, seed, "sr", "instance"),
            instance_number=1,
            manufacturer=ascii_text(identity.manufacturer, 64) or "pacs-node",
            is_complete=True,
            is_final=True,
            is_verified=False,
            institution_name=ascii_text(identity.institution_name, 64) or None,
            contributing_equipment=[algorithm_equipment(algorithm, identity)],
            series_description=series_description("AI findings", algorithm),
            manufacturer_model_name=NODE_MODEL_NAME,
            software_versions=ascii_text(identity.software_version, 64) or "0",
            coding_schemes=coding_schemes(schemes, identity) or None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"SR document could not be built: {exc}") from exc
    # General Equipment: the node, with the UID its device observer context names (TID 1004)
    sr.DeviceUID = identity.device_uid
    log.debug(
        "SR built: %d measurement groups, %d evidence instances, model %s",
        len(groups),
        len(evidence),
        algorithm.model_id,
    )
    return sr


class _Headers(Mapping[str, Dataset]):
    """Header copies (see :func:`header_copy`) of the source instances by SOP Instance UID, made
    on first use: only the images the content references need one."""

    def __init__(self, sources: Sequence[Dataset]) -> None:
        self._sources = {str(ds.SOPInstanceUID): ds for ds in sources}
        self._copies: dict[str, Dataset] = {}

    def __getitem__(self, uid: str) -> Dataset:
        if uid not in self._copies:
            self._copies[uid] = header_copy(self._sources[uid])
        return self._copies[uid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


def _acquisition_modalities(items: MutableSequence[Dataset], sources: Mapping[str, Dataset]) -> None:
    """Image Library entries name the acquisition modality (TID 1602 row 1, mandatory, DCID 29).
    highdicom derives it from the SOP class, which gives (OT, DCM, "Other") for secondary
    captures, a value CID 29 does not have: use the source's own Modality when CID 29 has it (an
    ultrasound or endoscopy capture), else leave that image out of the library (it stays in the
    evidence and in its measurement groups)."""
    for item in list(items):
        if item.get("ValueType") == "IMAGE" and "ReferencedSOPSequence" in item:
            uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for child in item.get("ContentSequence") or []:
                name, value = child.get("ConceptNameCodeSequence"), child.get("ConceptCodeSequence")
                if not (name and value and name[0].CodeValue == "121139") or value[0].CodeValue in _CID29:
                    continue
                source = sources.get(uid)
                code = _CID29.get(str(source.get("Modality") or "")) if source is not None else None
                if code is None:
                    log.debug("an image with no acquisition modality is left out of the image library")
                    items.remove(item)
                    break
                value[0].CodeValue = code.value
                value[0].CodingSchemeDesignator = code.scheme_designator
                value[0].CodeMeaning = code.meaning
        elif "ContentSequence" in item:
            _acquisition_modalities(item.ContentSequence, sources)
            if not item.ContentSequence and item.ConceptNameCodeSequence[0].CodeValue == "126200":
                items.remove(item)  # an Image Library Group left empty


def procedure_reported(source: Dataset) -> hd.sr.CodedConcept:
    """The procedure the report is about: the first complete item of the source's Procedure Code
    Sequence when it has one, else the CID 100 default for its modality (see above)."""
    for item in source.get("ProcedureCodeSequence") or []:
        value = item.get("CodeValue")
        scheme = item.get("CodingSchemeDesignator")
        meaning = item.get("CodeMeaning")
        if value and scheme and meaning:
            return hd.sr.CodedConcept(str(value), str(scheme), ascii_text(str(meaning), 64) or str(value))
    modality = str(source.get("Modality") or "").upper()
    return _DEFAULT_PROCEDURES.get(modality, IMAGING_PROCEDURE)


def probability_concept(finding: LabelScore) -> hd.sr.CodedConcept:
    """(111047, DCM, "Probability of cancer") for a malignancy label, else (122157, DCM, "Probability")."""
    text = f"{finding.label} {finding.code.meaning}".lower()
    if any(word in text for word in _MALIGNANCY_WORDS) and "benign" not in text:
        return PROBABILITY_OF_CANCER
    return PROBABILITY


def _measurement_group(
    result: AnalysisResult,
    finding: LabelScore,
    index: int,
    sources: Mapping[str, Dataset],
    identity: OutputIdentity,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group for ``finding``; a positive finding with a hotspot also carries its
    region (row 10c SCOORD + row 10d IMAGE), the others reference the images they were scored on."""
    if not 0.0 <= finding.probability <= 1.0 or not np.isfinite(finding.probability):
        raise OutputError(f"probability of {finding.label!r} is not in [0, 1]: {finding.probability!r}")
    tracking = hd.sr.TrackingIdentifier(
        uid=output_uid(identity, result.uid_seed, "sr", "tracking", finding.label),
        identifier=ascii_text(f"{result.algorithm.model_id} {finding.label} #{index + 1}", 64),
    )
    finding_code = coded(finding.code)
    evaluation = hd.sr.QualitativeEvaluation(name=finding_code, value=PRESENT if finding.positive else ABSENT)
    measurement = hd.sr.Measurement(
        name=probability_concept(finding), value=float(finding.probability), unit=NO_UNITS
    )
    located = _best_hotspot(result, finding.label, sources) if finding.positive else None
    referenced = None
    if located is None:
        referenced = [
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=str(sources[im.sop_instance_uid].SOPClassUID),
                referenced_sop_instance_uid=im.sop_instance_uid,
                referenced_frame_numbers=_frames(im, sources[im.sop_instance_uid]),
            )
            for im in result.images
            if im.sop_instance_uid in sources and any(s.label == finding.label for s in im.scores)
        ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding_code,
        algorithm_id=algorithm_id,
        measurements=[measurement],
        qualitative_evaluations=[evaluation],
        source_images=referenced or None,
    )
    if located is not None:
        image, heatmap = located
        group[0].ContentSequence.append(_hotspot_region(image, heatmap, sources[image.sop_instance_uid]))
    return group


def _best_hotspot(
    result: AnalysisResult, label: str, sources: Mapping[str, Dataset]
) -> tuple[ImageResult, Heatmap] | None:
    """The shown image whose heatmap for ``label`` has the highest hotspot peak (ties: higher score)."""
    best: tuple[float, float, int] | None = None
    found: tuple[ImageResult, Heatmap] | None = None
    for order, image in enumerate(result.images):
        if image.sop_instance_uid not in sources:
            continue
        score = next((s.probability for s in image.scores if s.label == label), 0.0)
        for heatmap in image.heatmaps:
            if heatmap.label != label or heatmap.hotspot is None:
                continue
            key = (heatmap.hotspot.peak_value, score, -order)
            if best is None or key > best:
                best, found = key, (image, heatmap)
    return found


def _frames(image: ImageResult, source: Dataset) -> list[int] | None:
    if image.frame is None or int(source.get("NumberOfFrames") or 1) <= 1:
        return None
    return [int(image.frame)]


def _hotspot_region(image: ImageResult, heatmap: Heatmap, source: Dataset) -> hd.sr.ScoordContentItem:
    """The hotspot as SCOORD on the source image: (111041, DCM, "Outline") closed POLYLINE around
    it, or (111010, DCM, "Center") POINT at its peak when the polygon is degenerate; with the
    source image (and frame) as its SELECTED FROM child."""
    hotspot = heatmap.hotspot
    if hotspot is None:
        raise OutputError(f"heatmap {heatmap.label!r} has no hotspot")
    rows, cols = int(source.get("Rows") or 0), int(source.get("Columns") or 0)
    frames = _frames(image, source)
    polygon = _polygon_points(hotspot.polygon, rows, cols)
    if polygon is not None:
        name, graphic_type, data = OUTLINE, hd.sr.GraphicTypeValues.POLYLINE, polygon
    else:
        point = np.array([[hotspot.peak_col + 0.5, hotspot.peak_row + 0.5]], dtype=np.float64)
        if rows and cols:
            point = np.clip(point, 0.0, [cols, rows])
        name, graphic_type, data = CENTER, hd.sr.GraphicTypeValues.POINT, point
    item = hd.sr.ScoordContentItem(
        name=name,
        graphic_type=graphic_type,
        graphic_data=data,
        pixel_origin_interpretation=hd.sr.PixelOriginInterpretationValues.FRAME if frames else None,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    item.ContentSequence = [
        hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=image.sop_instance_uid,
            referenced_frame_numbers=frames,
        )
    ]
    return item


def _polygon_points(polygon: Sequence[tuple[float, float]], rows: int, cols: int) -> np.ndarray | None:
    """(row, col) pixel centres -> closed (column, row) SCOORD points, or None when fewer than 3
    distinct points remain."""
    if len(polygon) < 3:
        return None
    points = np.array([(c + 0.5, r + 0.5) for r, c in polygon], dtype=np.float64)
    if rows and cols:
        points = np.clip(points, 0.0, [cols, rows])
    if len(points) > _MAX_POLYGON_POINTS:
        step = int(np.ceil(len(points) / _MAX_POLYGON_POINTS))
        points = points[::step]
    keep = np.ones(len(points), dtype=bool)
    keep[1:] = np.any(np.diff(points, axis=0) != 0, axis=1)
    points = points[keep]
    if len(points) > 1 and np.array_equal(points[0], points[-1]):
        points = points[:-1]
    if len(np.unique(points, axis=0)) < 3:
        return None
    return np.vstack([points, points[:1]])


def _research_notice(result: AnalysisResult) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12 Qualitative Evaluations container with the research-use comment."""
    algorithm = result.algorithm
    text = (
        f"{NOT_FOR_DIAGNOSIS}. Produced by the research model {ascii_text(algorithm.name, 64)} "
        f"{ascii_text(algorithm.version, 16)} ({ascii_text(algorithm.model_id, 64)}); "
        "not validated for clinical use."
    )
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = [
        hd.sr.TextContentItem(
            name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
    ]
    return container
