"""A segmentation model's masks as a DICOM Segmentation (highdicom ``hd.seg.Segmentation``).

One SEG per job, BINARY (or FRACTIONAL of type PROBABILITY when the manifest says
``segmentation.output: fractional``: each kept pixel carries its probability, 0..1 stored as
0..255, 0 outside the kept mask), in a new series of the source study, deterministic UIDs from the
job seed:

- one segment per label that has pixels (numbered 1..m in manifest label order, see
  :func:`segment_numbers`; empty labels are left out, and a result with no pixels at all makes no
  SEG: the SR says so), each with its segmented property category and type (the manifest's SNOMED
  CT codes), the anatomic region when the manifest names one, algorithm type AUTOMATIC and the
  Algorithm Identification (the model's name and version, family (123110, DCM, "Artificial
  Intelligence"));
- every analysed source image (every frame of a multi-frame one) is a source image of the SEG
  (Referenced Series / Source Image Sequence); frames without any segment pixel are omitted from
  the pixel data, as highdicom does by default;
- the model as Contributing Equipment; for research models the series description ends with
  "not for diagnosis" and the Content Description says "Research use only - not for diagnosis".

Supported sources: a series of single-frame images of one size, or one multi-frame image whose
every frame was analysed. Anything else raises :class:`~node.outputs.OutputError` naming why.
The pixel array handed to highdicom covers every analysed frame: one byte per pixel and segment
for BINARY, four (float32) for FRACTIONAL.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from node.outputs import OutputError
from node.outputs.common import (
    NODE_MODEL_NAME,
    NOT_FOR_DIAGNOSIS,
    algorithm_equipment,
    ascii_text,
    clean_header,
    coded,
    series_description,
)
from node.outputs.identity import output_uid
from node.types import AnalysisResult, OutputIdentity, SegmentationResult

log = logging.getLogger(__name__)

#: Series number of the SEG series (the SR is 9900, the SCs 9901, parametric maps 9902).
SEG_SERIES_NUMBER = 9903
SEG_SOP_CLASS_UID = str(SegmentationStorage)
#: CID 7162 (Surface Processing Algorithm Families): (123110, DCM, "Artificial Intelligence").
ARTIFICIAL_INTELLIGENCE = hd.sr.CodedConcept.from_code(codes.cid7162.ArtificialIntelligence)
#: A FRACTIONAL SEG stores probabilities 0..1 as 0..MAX_FRACTIONAL_VALUE.
MAX_FRACTIONAL_VALUE = 255


def segment_numbers(segmentation: SegmentationResult) -> dict[str, int]:
    """The SEG segment number of each label that has pixels (1..m, manifest label order)."""
    return {s.label: i + 1 for i, s in enumerate(segmentation.present)}


def seg_instance_uid(identity: OutputIdentity, result: AnalysisResult) -> str:
    """The SOP Instance UID the SEG of ``result`` gets (deterministic, see ``output_uid``)."""
    return output_uid(identity, result, "seg", "instance")


def build_seg(result: AnalysisResult, sources: Sequence[Dataset], identity: OutputIdentity) -> Dataset | None:
    """The DICOM Segmentation of ``result`` (see the module doc), or None when no segment has a
    pixel. ``sources`` are the analysed instances (pixel data may be absent). Raises
    :class:`OutputError` when the result has no segmentation or the sources cannot carry one."""
    segmentation = result.segmentation
    if segmentation is None:
        raise OutputError("build_seg needs a segmentation result")
    present = segmentation.present
    if not present:
        log.info("model %s: no segment has pixels; no SEG", result.algorithm.model_id)
        return None
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = {f.sop_instance_uid for f in segmentation.frames} - set(by_uid)
    if missing:
        raise OutputError(f"{len(missing)} segmented image(s) are not among the source instances")
    images, pixel_array = _source_images_and_pixels(segmentation, by_uid)
    algorithm = result.algorithm
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=ascii_text(algorithm.name or algorithm.model_id, 64),
        family=ARTIFICIAL_INTELLIGENCE,
        version=ascii_text(algorithm.version, 64) or "0",
        source=ascii_text(algorithm.manufacturer, 64) or None,
        parameters={"parameters": ascii_text(algorithm.parameters, 64)}
        if algorithm.parameters.strip()
        else None,
    )
    region = [coded(segmentation.anatomic_region)] if segmentation.anatomic_region else None
    numbers = segment_numbers(segmentation)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=numbers[s.label],
            segment_label=ascii_text(s.label, 64),
            segmented_property_category=coded(s.category),
            segmented_property_type=coded(s.code),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
            tracking_uid=output_uid(identity, result, "seg", "tracking", s.label),
            tracking_id=ascii_text(f"{algorithm.model_id} {s.label}", 64),
            anatomic_regions=region,
        )
        for s in present
    ]
    description = series_description(ascii_text(segmentation.series_description, 40), algorithm)
    content = f"{ascii_text(algorithm.model_id, 40)} {ascii_text(algorithm.version, 16)}"
    if algorithm.research_use_only:
        content = NOT_FOR_DIAGNOSIS
    if segmentation.fractional:
        seg_type: dict = {
            "segmentation_type": hd.seg.SegmentationTypeValues.FRACTIONAL,
            "fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            "max_fractional_value": MAX_FRACTIONAL_VALUE,
        }
    else:
        seg_type = {"segmentation_type": hd.seg.SegmentationTypeValues.BINARY}
    try:
        seg = hd.seg.Segmentation(
            source_images=images,
            pixel_array=pixel_array,
            **seg_type,
            segment_descriptions=descriptions,
            series_instance_uid=output_uid(identity, result, "seg", "series"),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=seg_instance_uid(identity, result),
            instance_number=1,
            manufacturer=ascii_text(identity.manufacturer, 64) or "pacs-node",
            manufacturer_model_name=NODE_MODEL_NAME,
            software_versions=ascii_text(identity.software_version, 64) or "0",
            device_serial_number=ascii_text(identity.device_name, 64) or "0",
            content_description=content[:64],
            content_label="AI_SEGMENTATION",
            series_description=description,
            contributing_equipment=[algorithm_equipment(algorithm, identity)],
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise OutputError(f"segmentation could not be built: {exc}") from exc
    seg.DeviceUID = identity.device_uid
    if identity.institution_name:
        seg.InstitutionName = ascii_text(identity.institution_name, 64)
    log.debug(
        "SEG built (%s): %d segments over %d source frames, model %s",
        "FRACTIONAL" if segmentation.fractional else "BINARY",
        len(descriptions),
        len(segmentation.frames),
        algorithm.model_id,
    )
    return seg


def _source_images_and_pixels(
    segmentation: SegmentationResult, by_uid: dict[str, Dataset]
) -> tuple[list[Dataset], np.ndarray]:
    """Header copies of the source images and the (frames, rows, cols, segments) array in the
    order highdicom wants: one frame per single-frame source (in the result's spatial order), or
    the frames of one multi-frame source in frame order. bool masks, or for a fractional result
    float32 probabilities of the kept pixels."""
    frames = segmentation.frames
    keep = [s.number - 1 for s in segmentation.present]
    shapes = {(f.rows, f.cols) for f in frames}
    if len(shapes) != 1:
        raise OutputError(
            f"the segmented frames differ in size ({len(shapes)} sizes); one SEG needs one size"
        )
    rows, cols = shapes.pop()
    multi = [f for f in frames if f.frame is not None]
    if multi:
        uids = {f.sop_instance_uid for f in frames}
        if len(uids) != 1 or len(multi) != len(frames):
            raise OutputError(
                "a SEG is made from one multi-frame image or from single-frame images, not a mix"
            )
        ds = by_uid[frames[0].sop_instance_uid]
        count = int(ds.get("NumberOfFrames") or 1)
        numbers = sorted(int(f.frame or 0) for f in frames)
        if numbers != list(range(1, count + 1)):
            raise OutputError(f"the SEG of a multi-frame image needs all its {count} frames analysed")
        ordered = sorted(frames, key=lambda f: int(f.frame or 0))
        images = [clean_header(ds)]
    else:
        if len({f.sop_instance_uid for f in frames}) != len(frames):
            raise OutputError("an image appears twice among the segmented frames")
        ordered = list(frames)
        images = [clean_header(by_uid[f.sop_instance_uid]) for f in ordered]
    fractional = segmentation.fractional
    pixels = np.zeros((len(ordered), rows, cols, len(keep)), dtype=np.float32 if fractional else bool)
    for i, frame in enumerate(ordered):
        if frame.masks is None:
            continue
        if not fractional:
            pixels[i] = np.moveaxis(frame.masks[keep], 0, -1)
            continue
        if frame.probabilities is None:
            raise OutputError("a fractional segmentation result has a frame with masks but no probabilities")
        values = np.where(frame.masks, np.clip(frame.probabilities, 0.0, 1.0), 0.0)
        pixels[i] = np.moveaxis(values[keep], 0, -1)
    return images, pixels
