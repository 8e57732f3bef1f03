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
          Finding Site for photographs (OP, DMS, XC, SM, GM; see ``finding_site``),
          Algorithm Identification (TID 4019: name, version, parameters),
          the probability as a NUM (UCUM "1"), a qualitative evaluation
          <label code> = Present | Absent (at the manifest threshold), and
          positive with a hotspot -> the Image Region (row 10c SCOORD: closed POLYLINE "Outline"
                                     around the hotspot, or POINT "Center" at the peak) SELECTED
                                     FROM the source image (and frame)
          otherwise              -> the images it was scored on (row 10b IMAGE)
      Qualitative Evaluations: TEXT Comment "Research use only - not for diagnosis" (research
                               models only)

A segmentation model's result (``result.segmentation``) reports each segment that has pixels as
one TID 1411 Volumetric ROI group referencing its segment of the job's SEG (row 8 IMAGE
"Referenced Segment" with the SEG frames holding it, and the source series), with the finding
type and category, its probability, Area (the largest cross-section, derivation Maximum) and
Volume where the geometry allowed them, and Present. The probability NUM is INFERRED FROM the
segment's outline (SCOORD) on the frame where it is most probable (TID 300's coordinates row):
OHIF 3.13 reads the first region of every measurement and fails on the whole report when one has
none. (A second, TID 1501 group carrying the outline was tried: PixelMed's 2022 rules then check
every group of the container against TID 1411 and report the 1501 one as missing its segment.)

Segments without pixels are qualitative evaluations; when no SEG was written a comment says why.

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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from node.outputs import OutputError
from node.outputs.common import (
    NODE_MODEL_NAME,
    NOT_FOR_DIAGNOSIS,
    SR_SERIES_NUMBER,
    PlaneGeometry,
    algorithm_equipment,
    ascii_text,
    clean_header,
    closed_polygon,
    coded,
    coding_schemes,
    evidence_reference,
    node_observer,
    plane_geometry,
    referenced_frame,
    series_description,
)
from node.outputs.identity import output_uid
from node.types import AnalysisResult, Heatmap, ImageResult, LabelScore, OutputIdentity

log = logging.getLogger(__name__)

PRESENT = hd.sr.CodedConcept.from_code(codes.SCT.Present)
ABSENT = hd.sr.CodedConcept.from_code(codes.SCT.Absent)
PROBABILITY = hd.sr.CodedConcept.from_code(codes.DCM.Probability)
PROBABILITY_OF_CANCER = hd.sr.CodedConcept.from_code(codes.DCM.ProbabilityOfCancer)
NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
#: Hand-typed: pydicom's ``codes`` has no UMLS concepts (TID 1500 names this one).
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)
#: The prefix of the Tracking Identifiers that ``@cornerstonejs/adapters`` maps to its tools
#: ("Cornerstone3DTools@^0.1.0:<tool>", MeasurementReport.getAdapterForTrackingIdentifier).
CORNERSTONE_TAG = "Cornerstone3DTools@^0.1.0"

# Procedure reported when the source has no Procedure Code Sequence (TID 1500 row 4, DCID 100
# "Quantitative Diagnostic Imaging Procedure"). Only members of CID 100 are used: PixelMed's
# validator reports any other code as an error (its CID 100 is the 2019 version, which lacks even
# (43468-8, LN, "XR unspecified body region")), so projection radiography and mammography fall
# back to the generic SNOMED CT procedure.
_DEFAULT_PROCEDURES = {
    "CT": hd.sr.CodedConcept.from_code(codes.LN.CTUnspecifiedBodyRegion),
    "MR": hd.sr.CodedConcept.from_code(codes.LN.MRIUnspecifiedBodyRegion),
    "NM": hd.sr.CodedConcept.from_code(codes.LN.NMUnspecifiedBodyRegion),
    "PT": hd.sr.CodedConcept.from_code(codes.LN.PETUnspecifiedBodyRegion),
}
IMAGING_PROCEDURE = hd.sr.CodedConcept.from_code(codes.SCT.ImagingProcedure)

#: CID 29 "Acquisition Modality" by modality (the code values are the Modality values)
_CID29 = {getattr(codes.cid29, name).value: getattr(codes.cid29, name) for name in codes.cid29.dir()}

_MALIGNANCY_WORDS = ("malignan", "cancer", "carcinoma", "melanoma")

#: Photographic modalities (issue 20) whose findings carry a Finding Site: the source's
#: AnatomicRegionSequence, else the default here (fundus: the retina; dermoscopy: skin).
#: Microscopy (SM/GM) defaults to blood only when a description names blood (a smear).
_PHOTOGRAPHIC_SITES: dict[str, hd.sr.CodedConcept | None] = {
    "OP": hd.sr.CodedConcept.from_code(codes.SCT.Retina),
    "DMS": hd.sr.CodedConcept.from_code(codes.SCT.Skin),
    "XC": None,
    "SM": None,
    "GM": None,
}
BLOOD = hd.sr.CodedConcept.from_code(codes.SCT.Blood)
_LATERALITY = {
    "R": hd.sr.CodedConcept.from_code(codes.SCT.Right),
    "L": hd.sr.CodedConcept.from_code(codes.SCT.Left),
    "B": hd.sr.CodedConcept.from_code(codes.SCT.Bilateral),
}
#: Polygons longer than this are simplified (a viewer draws them; a few hundred points is plenty).
_MAX_POLYGON_POINTS = 256


def build_sr(
    result: AnalysisResult,
    sources: Sequence[Dataset],
    identity: OutputIdentity,
    segmentation: Dataset | None = None,
    segmentation_note: str = "",
) -> Dataset:
    """The Comprehensive 3D SR (TID 1500) describing ``result``, in a new series of the source study.

    ``sources`` are the analysed instances (pixel data may be absent); all are recorded as evidence,
    those shown in ``result.images`` form the image library. UIDs are derived from
    ``result.uid_seed`` (see :func:`node.outputs.identity.output_uid`). For a segmentation result,
    ``segmentation`` is the job's SEG (see :mod:`node.outputs.seg`) that the segment groups
    reference, and ``segmentation_note`` says why there is none. Raises
    :class:`~node.outputs.OutputError` when the result and sources do not fit together.
    """
    if not sources:
        raise OutputError("build_sr needs at least one source instance")
    by_uid = _Headers(sources)
    first = by_uid[str(sources[0].SOPInstanceUID)]
    # highdicom reads the patient and study from the first evidence item and only the UIDs of the
    # others: a full header copy of each of 300 CT slices cost ~2 s, four UIDs cost nothing
    evidence = [first, *(evidence_reference(ds) for ds in sources[1:])]
    if segmentation is not None:  # the SEG the segment groups reference, in the same study
        evidence.append(evidence_reference(segmentation))
    if str(first.StudyInstanceUID) != result.study_uid:
        raise OutputError("the first source instance is not in the result's study")
    algorithm = result.algorithm

    observer = node_observer(identity)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=ascii_text(algorithm.name or algorithm.model_id, 64),
        version=ascii_text(algorithm.version, 64) or "0",
        parameters=[ascii_text(algorithm.parameters, 64)] if algorithm.parameters.strip() else None,
    )
    for finding in result.findings:
        if not 0.0 <= finding.probability <= 1.0 or not np.isfinite(finding.probability):
            raise OutputError(f"probability of {finding.label!r} is not in [0, 1]: {finding.probability!r}")
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    unlocated = []
    segment_groups = 0
    for index, finding in enumerate(result.findings):
        if result.segmentation is not None:
            pair = (
                _segment_groups(result, finding, index, segmentation, by_uid, identity, algorithm_id)
                if segmentation is not None and finding.positive
                else []
            )
            if not pair:
                unlocated.append(finding)
            else:
                groups.extend(pair)
                segment_groups += 1
            continue
        located = (
            _best_hotspot(result, finding.label, by_uid) if finding.positive and not finding.normal else None
        )
        if located is None:
            unlocated.append(finding)
        else:
            groups.append(_measurement_group(result, finding, index, located, by_uid, identity, algorithm_id))
    procedure = procedure_reported(first)
    try:
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=procedure,
            # highdicom wants a group; a placeholder is dropped below when there is no real one
            imaging_measurements=groups
            or [
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=output_uid(identity, result, "sr", "none"), identifier="none"
                    )
                )
            ],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"measurement report content could not be built: {exc}") from exc
    content = report[0].ContentSequence
    if not groups:
        # no region to report: the Imaging Measurements container stays, empty (the adapters
        # OHIF uses fail on an SR without it), the findings are the qualitative evaluations
        for item in content:
            if _concept(item) == "126010" and "ContentSequence" in item:
                del item.ContentSequence
    library = image_library(result.images, by_uid)
    if library is not None:
        # TID 1500 row 5, after the procedure reported (row 4) and before the measurements
        at = next((i for i, item in enumerate(content) if _concept(item) == "126010"), len(content))
        content.insert(at, library)
    evaluations = _qualitative_evaluations(result, unlocated, segmentation_note)
    if evaluations is not None:
        content.append(evaluations)

    schemes = {procedure.scheme_designator}
    schemes.update(f.code.scheme_designator for f in result.findings)
    schemes.update(_used_designators(report[0]))
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=output_uid(identity, result, "sr", "series"),
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=output_uid(identity, result, "sr", "instance"),
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
        "SR built: %d measurement groups (%d segments), %d qualitative evaluations, %d evidence "
        "instances, model %s",
        len(groups),
        segment_groups,
        len(unlocated),
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
            self._copies[uid] = clean_header(self._sources[uid])
        return self._copies[uid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)


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


def finding_site(source: Dataset) -> hd.sr.FindingSite | None:
    """Where a finding on a photographic source (OP, DMS, XC, SM, GM) is: the first complete item
    of its AnatomicRegionSequence, else the modality's default (OP: retina, DMS: skin; SM/GM:
    blood when a description names blood), with ImageLaterality (else Laterality) R/L/B as the
    laterality; None for other modalities or when nothing says where (nothing is guessed)."""
    modality = str(source.get("Modality") or "").strip().upper()
    if modality not in _PHOTOGRAPHIC_SITES:
        return None
    site = None
    for item in source.get("AnatomicRegionSequence") or []:
        value, scheme, meaning = (item.get(k) for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning"))
        if value and scheme and meaning:
            site = hd.sr.CodedConcept(str(value), str(scheme), ascii_text(str(meaning), 64) or str(value))
            break
    if site is None:
        site = _PHOTOGRAPHIC_SITES[modality]
    if site is None and modality in ("SM", "GM"):
        described = " ".join(str(source.get(k) or "") for k in ("SeriesDescription", "StudyDescription"))
        site = BLOOD if "blood" in described.lower() else None
    if site is None:
        return None
    side = str(source.get("ImageLaterality") or source.get("Laterality") or "").strip().upper()
    try:
        return hd.sr.FindingSite(anatomic_location=site, laterality=_LATERALITY.get(side))
    except (ValueError, TypeError) as exc:  # a code highdicom refuses: left out, as optional values are
        log.info("finding site %s left out: %s", site.value, exc)
        return None


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
    located: tuple[ImageResult, Heatmap],
    sources: Mapping[str, Dataset],
    identity: OutputIdentity,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group for a positive ``finding`` with a hotspot: its probability (TID 300)
    INFERRED FROM the hotspot's outline or centre on the source image (and frame), and its
    qualitative evaluation. The Tracking Identifier names the Cornerstone tool that draws the
    region, so that viewers built on ``@cornerstonejs/adapters`` (OHIF) rehydrate it (see the
    module doc)."""
    image, heatmap = located
    source = sources[image.sop_instance_uid]
    region, tool = _hotspot_coordinates(image, heatmap, source)
    tracking = hd.sr.TrackingIdentifier(
        uid=output_uid(identity, result, "sr", "tracking", finding.label),
        identifier=f"{CORNERSTONE_TAG}:{tool}:"
        + ascii_text(
            f"{result.algorithm.model_id} {finding.label} #{index + 1}",
            64 - len(CORNERSTONE_TAG) - len(tool) - 2,
        ),
    )
    finding_code = coded(finding.code)
    measurement = hd.sr.Measurement(
        name=probability_concept(finding),
        value=float(finding.probability),
        unit=NO_UNITS,
        referenced_coordinates=[region],
    )
    site = finding_site(source)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding_code,
        algorithm_id=algorithm_id,
        finding_sites=[site] if site is not None else None,
        measurements=[measurement],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding_code, value=PRESENT)],
    )
    return group


VOLUME = hd.sr.CodedConcept.from_code(codes.SCT.Volume)
AREA = hd.sr.CodedConcept.from_code(codes.SCT.Area)
MAXIMUM = hd.sr.CodedConcept.from_code(codes.SCT.Maximum)
_MM2 = hd.sr.CodedConcept.from_code(codes.UCUM.SquareMillimeter)
_MM3 = hd.sr.CodedConcept.from_code(codes.UCUM.CubicMillimeter)


def _seg_frames(segmentation: Dataset, number: int) -> list[int]:
    """The 1-based frames of a SEG that hold segment ``number``."""
    frames = []
    for i, item in enumerate(segmentation.get("PerFrameFunctionalGroupsSequence") or [], start=1):
        ident = item.get("SegmentIdentificationSequence")
        if ident and int(ident[0].ReferencedSegmentNumber) == number:
            frames.append(i)
    return frames


def _segment_groups(
    result: AnalysisResult,
    finding: LabelScore,
    index: int,
    segmentation: Dataset,
    sources: Mapping[str, Dataset],
    identity: OutputIdentity,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """The TID 1411 group of a present segment (see the module doc), as a one-item list; [] when
    the SEG has no such segment or the segment has no outline on a shown frame (the finding is then
    a qualitative evaluation)."""
    from node.outputs.seg import segment_numbers

    assert result.segmentation is not None
    number = segment_numbers(result.segmentation).get(finding.label)
    summary = next((s for s in result.segmentation.segments if s.label == finding.label), None)
    located = _best_hotspot(result, finding.label, sources)
    if number is None or summary is None or located is None:
        return []
    image, heatmap = located
    source = sources[image.sop_instance_uid]
    region, tool = _hotspot_coordinates(image, heatmap, source)
    reference = hd.sr.ReferencedSegment(
        sop_class_uid=str(segmentation.SOPClassUID),
        sop_instance_uid=str(segmentation.SOPInstanceUID),
        segment_number=number,
        frame_numbers=_seg_frames(segmentation, number) or None,
        source_series=hd.sr.SourceSeriesForSegmentation(str(source.SeriesInstanceUID)),
    )
    finding_code = coded(finding.code)
    sizes = []
    if summary.area_mm2 is not None:
        sizes.append(hd.sr.Measurement(name=AREA, value=summary.area_mm2, unit=_MM2, derivation=MAXIMUM))
    if summary.volume_mm3 is not None:
        sizes.append(hd.sr.Measurement(name=VOLUME, value=summary.volume_mm3, unit=_MM3))
    tracking_uid = output_uid(identity, result, "sr", "tracking", finding.label)
    identifier = f"{CORNERSTONE_TAG}:{tool}:" + ascii_text(
        f"{result.algorithm.model_id} {finding.label} #{index + 1}",
        64 - len(CORNERSTONE_TAG) - len(tool) - 2,
    )
    probability = hd.sr.Measurement(
        name=probability_concept(finding), value=float(finding.probability), unit=NO_UNITS
    )
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier),
        referenced_segment=reference,
        finding_type=finding_code,
        finding_category=coded(summary.category),
        algorithm_id=algorithm_id,
        measurements=[probability, *sizes],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding_code, value=PRESENT)],
    )
    # the probability NUM INFERRED FROM the outline (TID 300 row 8 via TID 320), added after
    # highdicom built the group: its ROI templates refuse coordinates under a measurement
    inferred = hd.sr.Measurement(
        name=probability_concept(finding),
        value=float(finding.probability),
        unit=NO_UNITS,
        referenced_coordinates=[region],
    )
    num = next(
        item
        for item in group[0].ContentSequence
        if item.ValueType == "NUM" and _concept(item) == probability_concept(finding).value
    )
    num.ContentSequence = inferred[0].ContentSequence
    return [group]


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
    frame = referenced_frame(source, image.frame)
    return None if frame is None else [frame]


def _hotspot_coordinates(
    image: ImageResult, heatmap: Heatmap, source: Dataset
) -> tuple[hd.sr.CoordinatesForMeasurement, str]:
    """The hotspot as SCOORD (111030, DCM, "Image Region") on the source image (and frame): a
    closed POLYLINE around it (Cornerstone tool PlanarFreehandROI), or a POINT at its peak when
    the polygon is degenerate (tool Probe)."""
    hotspot = heatmap.hotspot
    if hotspot is None:
        raise OutputError(f"heatmap {heatmap.label!r} has no hotspot")
    rows, cols = _int(source.get("Rows")), _int(source.get("Columns"))
    frames = _frames(image, source)
    polygon = _polygon_points(hotspot.polygon, rows, cols)
    if polygon is not None:
        graphic_type, data, tool = hd.sr.GraphicTypeValues.POLYLINE, polygon, "PlanarFreehandROI"
    else:
        point = np.array([[hotspot.peak_col + 0.5, hotspot.peak_row + 0.5]], dtype=np.float64)
        if rows and cols:
            point = np.clip(point, 0.0, [cols, rows])
        graphic_type, data, tool = hd.sr.GraphicTypeValues.POINT, point, "Probe"
    item = hd.sr.CoordinatesForMeasurement(
        graphic_type=graphic_type,
        graphic_data=data,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=image.sop_instance_uid,
            referenced_frame_numbers=frames,
        ),
    )
    if frames:
        item.PixelOriginInterpretation = "FRAME"
    return item, tool


def _set_content(item: hd.sr.ContentItem, children: Sequence[hd.sr.ContentItem]) -> None:
    """``item.ContentSequence = children``: highdicom wraps them in its ContentSequence, though its
    ``__setattr__`` is annotated for pydicom elements and sequences only."""
    item.ContentSequence = children  # type: ignore[assignment]


def _int(value: Any) -> int:
    """A non-negative int of a data set value (as pydicom gives it: any type); 0 when it is none."""
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def _polygon_points(polygon: Sequence[tuple[float, float]], rows: int, cols: int) -> np.ndarray | None:
    """(row, col) pixel centres -> closed (column, row) SCOORD points, or None when fewer than 3
    distinct points remain."""
    if len(polygon) < 3:
        return None
    points = np.array([(c + 0.5, r + 0.5) for r, c in polygon], dtype=np.float64)
    if rows and cols:
        points = np.clip(points, 0.0, [cols, rows])
    return closed_polygon(points, _MAX_POLYGON_POINTS)


def _qualitative_evaluations(
    result: AnalysisResult, findings: Sequence[LabelScore], note: str = ""
) -> hd.sr.ContainerContentItem | None:
    """TID 1500 row 12 "Qualitative Evaluations": for each finding without an image region
    (negative, normal, or positive without a hotspot) a CODE <finding> = Present | Absent (row 13)
    and a TEXT <finding> with its probability and operating threshold (row 14); then the
    research-use comment for research models. None when there is nothing to say.

    These findings are not measurement groups: a TID 1501 group without an image region makes
    OHIF 3.13 fail on the whole report (it reads the first region of every group)."""
    items: list[hd.sr.ContentItem] = []
    model = ascii_text(result.algorithm.model_id, 64)
    version = ascii_text(result.algorithm.version, 16)
    for finding in findings:
        name = coded(finding.code)
        items.append(
            hd.sr.CodeContentItem(
                name=name,
                value=PRESENT if finding.positive else ABSENT,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
        verdict = "at or above" if finding.probability >= finding.threshold else "below"
        text = (
            f"{'Present' if finding.positive else 'Absent'}: probability {finding.probability:.4g}, "
            f"{verdict} the operating threshold {finding.threshold:.4g} ({model} {version})"
        )
        if result.segmentation is not None:  # a segment: present when pixels remain
            text = (
                f"{'Present' if finding.positive else 'Absent'}: "
                + ("segmented" if finding.positive else "no pixel left after post-processing")
                + f"; highest pixel probability {finding.probability:.4g} (pixel threshold "
                f"{finding.threshold:.4g}, {model} {version})"
            )
        items.append(
            hd.sr.TextContentItem(
                name=name, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    if note:
        items.append(
            hd.sr.TextContentItem(
                name=COMMENT,
                value=ascii_text(note, 1024),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if result.algorithm.research_use_only:
        items.append(_research_notice(result))
    if not items:
        return None
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    _set_content(container, items)
    return container


def _research_notice(result: AnalysisResult) -> hd.sr.TextContentItem:
    """The research-use comment (TID 1500 row 14 TEXT)."""
    algorithm = result.algorithm
    text = (
        f"{NOT_FOR_DIAGNOSIS}. Produced by the research model {ascii_text(algorithm.name, 64)} "
        f"{ascii_text(algorithm.version, 16)} ({ascii_text(algorithm.model_id, 64)}); "
        "not validated for clinical use."
    )
    return hd.sr.TextContentItem(
        name=COMMENT, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _concept(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _used_designators(item: Dataset) -> set[str]:
    """Coding scheme designators used in a content tree."""
    found: set[str] = set()
    for elem in item:
        if elem.keyword == "CodingSchemeDesignator" and elem.value:
            found.add(str(elem.value))
        elif elem.VR == "SQ":
            for sub in elem.value:
                found |= _used_designators(sub)
    return found


# ---------------------------------------------------------------------------------------------
# Image library (TID 1600), built here rather than by highdicom: highdicom's entry descriptors
# require Pixel Spacing / Imager Pixel Spacing, Patient Orientation, position and orientation,
# which real images lack or state invalidly (a CR with 0\0 spacing, enhanced objects that keep
# them in functional groups). Every descriptor of TID 1602-1604 except the modality is optional:
# an invalid or missing value is left out.

_CROSS_SECTIONAL = {"CT", "MR", "PT", "NM"}
_PROJECTION = {"CR", "DX", "MG", "RF", "XA", "IO", "PX", "RG"}
# Hand-typed: pydicom's ``codes`` lacks the first and the third, and means "mm" and "Source
# (attribute)" by the other two (TID 1602-1604 and viewers use these meanings).
_PIXELS = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")
_MM = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
_DIRECTION = hd.sr.CodedConcept("{-1:1}", "UCUM", "{-1:1}")
SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")


def acquisition_modality(ds: Dataset) -> hd.sr.CodedConcept | None:
    """The CID 29 code of the source's Modality, else of its SOP class (highdicom's mapping), or
    None (a secondary capture of no stated modality: CID 29 has no code for it)."""
    code = _CID29.get(str(ds.get("Modality") or "").strip().upper())
    if code is None:
        try:
            from highdicom.sr.templates import _get_coded_modality

            guess = _get_coded_modality(str(ds.SOPClassUID))
            code = _CID29.get(guess.value)
        except (ValueError, KeyError, AttributeError):
            code = None
    return None if code is None else hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)


def image_library(
    images: Sequence[ImageResult], sources: Mapping[str, Dataset]
) -> hd.sr.ContainerContentItem | None:
    """The Image Library of the shown images: one entry per instance (its shown frames referenced),
    grouped by modality and Frame of Reference; images with no CID 29 modality are left out (they
    stay in the evidence). None when no image is left."""
    frames: dict[str, list[int]] = {}
    for image in images:
        if image.sop_instance_uid in sources:
            listed = frames.setdefault(image.sop_instance_uid, [])
            frame = _frames(image, sources[image.sop_instance_uid])
            if frame and frame[0] not in listed:
                listed.append(frame[0])
    groups: dict[tuple[str, str], list[hd.sr.ImageContentItem]] = {}
    for uid, shown in frames.items():
        ds = sources[uid]
        modality = acquisition_modality(ds)
        if modality is None:
            log.debug("an image with no acquisition modality is left out of the image library")
            continue
        entry = hd.sr.ImageContentItem(
            name=SOURCE,
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=uid,
            referenced_frame_numbers=sorted(shown) or None,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        geometry = plane_geometry(ds, shown[0] if len(shown) == 1 else None)
        _set_content(entry, _library_descriptors(ds, modality, geometry, several_frames=len(shown) > 1))
        groups.setdefault((modality.value, geometry.frame_of_reference_uid or ""), []).append(entry)
    if not groups:
        return None
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    _set_content(library, [])
    for (_, frame_of_reference), entries in groups.items():
        group = hd.sr.ContainerContentItem(
            name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        _set_content(group, [])
        if frame_of_reference:  # the descriptor the group's entries share (as highdicom does)
            group.ContentSequence.append(
                hd.sr.UIDRefContentItem(
                    name=codes.DCM.FrameOfReferenceUID,
                    value=frame_of_reference,
                    relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
                )
            )
        group.ContentSequence.extend(entries)
        library.ContentSequence.append(group)
    return library


def _library_descriptors(
    ds: Dataset, modality: hd.sr.CodedConcept, geometry: PlaneGeometry, several_frames: bool
) -> list[hd.sr.ContentItem]:
    """TID 1602 (modality, Frame of Reference, rows, columns) and TID 1603/1604 descriptors, each
    only when the source states a valid value (position only for one frame)."""
    ctx = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
    out: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=codes.DCM.Modality, value=modality, relationship_type=ctx)
    ]
    if geometry.frame_of_reference_uid:
        out.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID,
                value=geometry.frame_of_reference_uid,
                relationship_type=ctx,
            )
        )
    for name, keyword in ((codes.DCM.PixelDataRows, "Rows"), (codes.DCM.PixelDataColumns, "Columns")):
        pixels = _int(ds.get(keyword))
        if pixels:
            out.append(hd.sr.NumContentItem(name=name, value=pixels, unit=_PIXELS, relationship_type=ctx))
    kind = modality.value
    spacing = None
    if kind in _PROJECTION:
        if geometry.patient_orientation:
            row, col = geometry.patient_orientation
            out.append(
                hd.sr.TextContentItem(name=codes.DCM.PatientOrientationRow, value=row, relationship_type=ctx)
            )
            out.append(
                hd.sr.TextContentItem(
                    name=codes.DCM.PatientOrientationColumn, value=col, relationship_type=ctx
                )
            )
        spacing = geometry.imager_pixel_spacing or geometry.pixel_spacing
    elif kind in _CROSS_SECTIONAL:
        spacing = geometry.pixel_spacing if geometry.spacing_source == "PixelSpacing" else None
    if spacing:
        out.append(
            hd.sr.NumContentItem(
                name=codes.DCM.HorizontalPixelSpacing, value=spacing[1], unit=_MM, relationship_type=ctx
            )
        )
        out.append(
            hd.sr.NumContentItem(
                name=codes.DCM.VerticalPixelSpacing, value=spacing[0], unit=_MM, relationship_type=ctx
            )
        )
    if kind in _CROSS_SECTIONAL:
        if geometry.position and not several_frames:
            for name, value in zip(
                (
                    codes.DCM.ImagePositionPatientX,
                    codes.DCM.ImagePositionPatientY,
                    codes.DCM.ImagePositionPatientZ,
                ),
                geometry.position,
                strict=True,
            ):
                out.append(hd.sr.NumContentItem(name=name, value=value, unit=_MM, relationship_type=ctx))
        if geometry.orientation:
            names = (
                codes.DCM.ImageOrientationPatientRowX,
                codes.DCM.ImageOrientationPatientRowY,
                codes.DCM.ImageOrientationPatientRowZ,
                codes.DCM.ImageOrientationPatientColumnX,
                codes.DCM.ImageOrientationPatientColumnY,
                codes.DCM.ImageOrientationPatientColumnZ,
            )
            for name, value in zip(names, geometry.orientation, strict=True):
                out.append(
                    hd.sr.NumContentItem(name=name, value=value, unit=_DIRECTION, relationship_type=ctx)
                )
    return out
