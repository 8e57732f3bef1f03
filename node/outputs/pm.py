"""Heatmaps as data: one DICOM Parametric Map per shown image that has heatmaps (IHE AIR).

Each map has the source image's size and geometry (the heatmaps are already in source pixels):
one frame per label (the labels are the map's channels, told apart by the LUT Label of their
Real World Value Mapping). The heatmap values (0..1) are stored as they are, as 32-bit floats
(Float Pixel Data), with an identity Real World Value Mapping (slope 1, intercept 0, unit
(1, UCUM, "no units")) and a VOI window over 0..1.

Sources a map cannot represent are skipped with a log line, never failing the job (the SR and the
secondary captures still go out): heatmaps whose size is not the source image's. A frame of a
multi-frame source gets a map of its own that references that frame (Derivation Image Sequence,
Referenced Frame Number), with that frame's geometry from the functional groups.

Geometry is validated first (:func:`node.outputs.common.clean_header`): spacing of 0\\0, negative,
the wrong count or not numbers, orientation that is not two unit vectors, and the like are never
copied; a source without a valid Frame of Reference, position, orientation and pixel spacing
gets the nominal geometry described below, with a note in the Derivation Description.

The quantity is the visual-explanation code of the manifest's heatmap method (see
:func:`node.outputs.common.explanation_concept`): (130403, DCM, "Gradient-weighted class
activation") for Grad-CAM, (130402, DCM, "Class activation") for CAMs computed in the graph,
(130404, DCM, "Saliency") for occlusion and patch maps.

Geometry: CT/MR sources give highdicom their Frame of Reference, plane position, orientation and
pixel spacing. Projection images (CR/DX/MG) have no patient coordinate system, but the Parametric
Map IOD requires a Frame of Reference and plane position/orientation: the map then gets a nominal
geometry in a new Frame of Reference of its own (UID shared with no other object, so no spatial
relation to anything is claimed): the image at the origin, rows and columns along the main
directions of the source's Patient Orientation, spacing from PixelSpacing, else ImagerPixelSpacing
(detector plane, not corrected for magnification), else a nominal 1 mm. The Derivation
Description says so. The map overlays its source pixel for pixel either way (same rows/columns,
referenced in the Derivation Image Sequence).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom._standard_utils import is_multiframe_image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from node.outputs import OutputError
from node.outputs.common import (
    NODE_MODEL_NAME,
    PM_SERIES_NUMBER,
    algorithm_equipment,
    ascii_text,
    clean_header,
    explanation_concept,
    referenced_frame,
    series_description,
    set_series_laterality,
    sources_by_uid,
)
from node.outputs.identity import output_uid
from node.types import AnalysisResult, Heatmap, ImageResult, OutputIdentity

log = logging.getLogger(__name__)

NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
#: Nominal spacing (mm) for projection images that state none.
NOMINAL_SPACING = (1.0, 1.0)


def build_parametric_maps(
    result: AnalysisResult, sources: Sequence[Dataset], identity: OutputIdentity
) -> list[Dataset]:
    """One Parametric Map per shown image with heatmaps, all in one new series of the study.

    Images the map cannot represent are skipped with a log line (see the module doc). Raises
    :class:`~node.outputs.OutputError` when a shown image's source is missing or highdicom refuses
    the map.
    """
    by_uid = sources_by_uid(sources)
    series_uid = output_uid(identity, result, "pm", "series")
    description = series_description("AI map", result.algorithm)
    shown = [im for im in result.images if im.heatmaps]
    missing = [im for im in shown if im.sop_instance_uid not in by_uid]
    if missing:
        raise OutputError(f"{len(missing)} shown image(s) not among the source instances")
    representable = []
    for image in shown:
        reason = unrepresentable(image, by_uid[image.sop_instance_uid])
        if reason:
            log.info("model %s: no parametric map for one image: %s", result.algorithm.model_id, reason)
        else:
            representable.append(image)
    shown_sources = [by_uid[im.sop_instance_uid] for im in representable]
    out: list[Dataset] = []
    for image in representable:
        source = by_uid[image.sop_instance_uid]
        ref = clean_header(source, image.frame, flatten=True)
        pm = _parametric_map(result, image, ref, identity, series_uid, description, len(out) + 1)
        frame = referenced_frame(source, image.frame)
        if frame is not None:
            _reference_frame(pm, frame)
        set_series_laterality(pm, shown_sources)
        out.append(pm)
    log.debug("%d parametric maps built for model %s", len(out), result.algorithm.model_id)
    return out


def unrepresentable(image: ImageResult, source: Dataset) -> str | None:
    """Why ``image`` gets no parametric map, or None when it can have one."""
    try:
        rows, cols = int(source.get("Rows") or 0), int(source.get("Columns") or 0)
    except (TypeError, ValueError):
        rows, cols = 0, 0
    if not rows or not cols:
        return "source has no Rows/Columns"
    for heatmap in image.heatmaps:
        shape = np.shape(heatmap.values)
        if shape != (rows, cols):
            return f"heatmap {heatmap.label!r} is {shape}, the source image is {(rows, cols)}"
    return None


_DIRECTIONS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}


def _nominal_geometry(ref: Dataset, frame_of_reference_uid: str) -> tuple[Dataset, str]:
    """A copy of a projection image's header with the plane geometry the Parametric Map IOD
    requires: a new Frame of Reference of its own (shared with nothing), the image at the origin,
    rows and columns along the main directions of Patient Orientation (else L and P), spacing from
    PixelSpacing, ImagerPixelSpacing or a nominal 1 mm. Returns it and a note for the Derivation
    Description."""
    out = Dataset()
    out.update(ref)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if keyword in out:
            del out[keyword]  # incomplete patient geometry: none of it is claimed
    orientation = ref.get("PatientOrientation")
    row_dir, col_dir = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    if orientation is not None and not isinstance(orientation, str) and len(orientation) == 2:
        first, second = (str(v)[:1].upper() for v in orientation)
        if first in _DIRECTIONS and second in _DIRECTIONS and first != second:
            a, b = _DIRECTIONS[first], _DIRECTIONS[second]
            if abs(sum(x * y for x, y in zip(a, b, strict=True))) < 1e-6:
                row_dir, col_dir = a, b
    spacing = ref.get("PixelSpacing") or ref.get("ImagerPixelSpacing")
    note = "; no complete patient geometry: nominal plane geometry in a Frame of Reference of its own"
    if spacing is None or len(spacing) != 2:
        spacing = NOMINAL_SPACING
        note += ", nominal 1 mm pixel spacing (the source states none)"
    elif "PixelSpacing" not in ref:
        note += ", pixel spacing from Imager Pixel Spacing (detector plane)"
    out.FrameOfReferenceUID = frame_of_reference_uid
    out.PositionReferenceIndicator = None
    out.ImagePositionPatient = [0.0, 0.0, 0.0]
    out.ImageOrientationPatient = [*row_dir, *col_dir]
    out.PixelSpacing = [float(v) for v in spacing]
    if "SliceThickness" not in out:
        out.SliceThickness = None  # highdicom reads it; a projection has none
    return out, note


def _lut_label(heatmap: Heatmap, index: int) -> str:
    label = "".join(ch if ch.isalnum() else "_" for ch in ascii_text(heatmap.label)).upper()
    return (label or f"MAP{index + 1}")[:16]


def _parametric_map(
    result: AnalysisResult,
    image: ImageResult,
    ref: Dataset,
    identity: OutputIdentity,
    series_uid: str,
    description: str,
    number: int,
) -> Dataset:
    """The Parametric Map of one image (checked by :func:`unrepresentable`), labels as channels."""
    algorithm = result.algorithm
    channels = []
    mappings = []
    seen: set[str] = set()
    for index, heatmap in enumerate(image.heatmaps):
        values = np.asarray(heatmap.values, dtype=np.float32)
        channels.append(np.clip(np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0))
        label = _lut_label(heatmap, index)
        while label in seen:
            label = f"{label[:13]}{index + 1:03d}"
        seen.add(label)
        concept = explanation_concept(heatmap.method)
        mappings.append(
            hd.pm.RealWorldValueMapping(
                lut_label=label,
                lut_explanation=ascii_text(f"{concept.meaning} map of {heatmap.label}", 64),
                unit=NO_UNITS,
                value_range=(0.0, 1.0),
                slope=1.0,
                intercept=0.0,
                quantity_definition=concept,
            )
        )
    pixels = np.stack(channels, axis=-1)[None].astype(np.float32)  # (frames=1, rows, cols, channels)
    geometry_note = ""
    if not all(
        ref.get(k)
        for k in ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    ):
        ref, geometry_note = _nominal_geometry(
            ref, output_uid(identity, result, "pm", "for", image.sop_instance_uid)
        )
    thickness = ref.get("SliceThickness")
    pixel_measures = hd.PixelMeasuresSequence(
        pixel_spacing=[float(v) for v in ref.PixelSpacing],
        slice_thickness=float(thickness) if thickness not in (None, "") else None,
    )
    orientation = hd.PlaneOrientationSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_orientation=[float(v) for v in ref.ImageOrientationPatient],
    )
    position = hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        image_position=[float(v) for v in ref.ImagePositionPatient],
    )
    if "SliceThickness" not in ref:
        ref.SliceThickness = None  # highdicom reads it
    if is_multiframe_image(ref):
        # highdicom reads a multi-frame source's geometry from its functional groups: give the
        # flattened reference (one frame, validated values) exactly those
        shared = Dataset()
        shared.PixelMeasuresSequence = pixel_measures
        shared.PlaneOrientationSequence = orientation
        frame_item = Dataset()
        frame_item.PlanePositionSequence = position
        ref.SharedFunctionalGroupsSequence = [shared]
        ref.PerFrameFunctionalGroupsSequence = [frame_item]
        ref.NumberOfFrames = 1
    methods = sorted({h.method for h in image.heatmaps})
    try:
        pm = hd.pm.ParametricMap(
            source_images=[ref],
            pixel_array=pixels,
            series_instance_uid=series_uid,
            series_number=PM_SERIES_NUMBER,
            sop_instance_uid=output_uid(identity, result, "pm", image.sop_instance_uid, image.frame),
            instance_number=number,
            manufacturer=ascii_text(identity.manufacturer, 64) or "pacs-node",
            manufacturer_model_name=NODE_MODEL_NAME,
            software_versions=ascii_text(identity.software_version, 64) or "0",
            device_serial_number=ascii_text(identity.device_name, 64) or "0",
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[[m] for m in mappings],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
            transfer_syntax_uid=ExplicitVRLittleEndian,
            content_description=ascii_text(f"{', '.join(methods)} heatmaps of {algorithm.model_id}", 64),
            content_label="AI_HEATMAP",
            content_qualification=(
                hd.ContentQualificationValues.RESEARCH
                if algorithm.research_use_only
                else hd.ContentQualificationValues.PRODUCT
            ),
            contributing_equipment=[algorithm_equipment(algorithm, identity)],
            derivation=explanation_concept(image.heatmaps[0].method),
            series_description=description,
            pixel_measures=pixel_measures,
            # explicit geometry (validated above): highdicom would read that of a multi-frame
            # source from its functional groups, which the flattened reference does not have
            plane_orientation=orientation,
            plane_positions=[position],
            institution_name=ascii_text(identity.institution_name, 64) or None,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise OutputError(f"parametric map could not be built: {exc}") from exc
    pm.DeviceUID = identity.device_uid  # General Equipment: the node
    groups = [*pm.SharedFunctionalGroupsSequence, *pm.get("PerFrameFunctionalGroupsSequence", [])]
    for item in (d for group in groups for d in group.get("DerivationImageSequence") or []):
        item.DerivationDescription = ascii_text(
            f"{', '.join(methods)} heatmaps by {algorithm.name} {algorithm.version}, in source pixels"
            + geometry_note,
            1024,
        )
    return pm


def _reference_frame(pm: Dataset, frame: int) -> None:
    """Make the map's references to its source name the source ``frame`` (1-based)."""
    groups = [*pm.SharedFunctionalGroupsSequence, *pm.get("PerFrameFunctionalGroupsSequence", [])]
    for derivation in (d for group in groups for d in group.get("DerivationImageSequence") or []):
        for item in derivation.get("SourceImageSequence") or []:
            item.ReferencedFrameNumber = frame
    for item in pm.get("SourceImageSequence") or []:
        item.ReferencedFrameNumber = frame
