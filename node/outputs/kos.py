"""The key images of a job as a Key Object Selection Document (TID 2010), so a PACS flags them.

One per job with a positive finding (none otherwise), in a new series of the source study
(Modality KO, deterministic UIDs):

- Document Title (113000, DCM, "Of Interest") from CID 7010: the images a reader should look at
  (the other CID 7010 titles are about quality, teaching, therapy or export workflows);
- the node as device observer (TID 1002, as in the SR);
- a Key Object Description naming each positive finding, its highest image probability and the
  model, with the research-use line for research models;
- one IMAGE item per key image (the images of :func:`node.outputs.gsps.marked_images`, in their
  order; the marked frames of multi-frame sources named), each referencing its presentation
  state when one was written (Image Reference Macro, nested Referenced SOP Sequence), so a
  viewer that opens the key image through the KOS draws the outline;
- a COMPOSITE item referencing the job's SR when there is one;
- every referenced object in the Current Requested Procedure Evidence Sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from node.outputs import OutputError
from node.outputs.common import (
    NODE_MODEL_NAME,
    NOT_FOR_DIAGNOSIS,
    algorithm_equipment,
    ascii_text,
    clean_header,
    evidence_reference,
    node_observer,
    referenced_frame,
    series_description,
    sources_by_uid,
)
from node.outputs.gsps import Mark, marked_images
from node.outputs.identity import output_uid
from node.types import AnalysisResult, OutputIdentity

log = logging.getLogger(__name__)

KOS_SERIES_NUMBER = 9904
OF_INTEREST = hd.sr.CodedConcept.from_code(codes.DCM.OfInterest)
_CONCEPT_NAME = Tag(0x0040, 0xA043)


def build_key_object_selection(
    result: AnalysisResult,
    sources: Sequence[Dataset],
    identity: OutputIdentity,
    sr: Dataset | None = None,
    presentation_states: Sequence[Dataset] = (),
) -> Dataset | None:
    """The Key Object Selection Document of ``result`` (see the module doc), or None when no
    positive finding is on an image. ``sr`` and ``presentation_states`` are the job's SR and
    presentation states, referenced when given. Raises :class:`~node.outputs.OutputError` when
    the document cannot be built."""
    by_uid = sources_by_uid(sources)
    marks = marked_images(result, by_uid)
    if not marks:
        return None
    frames: dict[str, list[int]] = {}
    for mark in marks:
        uid = mark.image.sop_instance_uid
        listed = frames.setdefault(uid, [])
        frame = referenced_frame(by_uid[uid], mark.image.frame)
        if frame is not None and frame not in listed:
            listed.append(frame)
    states = {
        str(ps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID): ps
        for ps in presentation_states
        if "ReferencedSeriesSequence" in ps
    }
    algorithm = result.algorithm
    key_sources = [by_uid[uid] for uid in frames]
    first = clean_header(key_sources[0])
    referenced = [first, *(_reference(ds) for ds in key_sources[1:])]
    if sr is not None:
        referenced.append(evidence_reference(sr))
    evidence = [*referenced, *(evidence_reference(ps) for ps in states.values() if _in(ps, frames))]
    observer = node_observer(identity)
    try:
        content = hd.ko.KeyObjectSelection(
            document_title=OF_INTEREST,
            referenced_objects=referenced,
            observer_device_context=observer,
            description=description(result, marks),
        )
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=evidence,
            content=content,
            series_instance_uid=output_uid(identity, result, "kos", "series"),
            series_number=KOS_SERIES_NUMBER,
            sop_instance_uid=output_uid(identity, result, "kos", "instance"),
            instance_number=1,
            manufacturer=ascii_text(identity.manufacturer, 64) or "pacs-node",
            institution_name=ascii_text(identity.institution_name, 64) or None,
            contributing_equipment=[algorithm_equipment(algorithm, identity)],
        )
        _add_frames_and_states(kos, frames, states)
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputError(f"key object selection could not be built: {exc}") from exc
    kos.SeriesDescription = series_description("AI key images", algorithm)
    kos.ManufacturerModelName = NODE_MODEL_NAME
    kos.SoftwareVersions = ascii_text(identity.software_version, 64) or "0"
    kos.DeviceUID = identity.device_uid
    log.debug("KOS built: %d key images, model %s", len(frames), algorithm.model_id)
    return kos


def description(result: AnalysisResult, marks: Sequence[Mark]) -> str:
    """The Key Object Description: each positive finding with its highest image probability, the
    model, and for research models the research-use line (at most 1024 characters)."""
    best: dict[str, float] = {}
    for mark in marks:
        label = mark.finding.label
        best[label] = max(best.get(label, 0.0), mark.probability)
    algorithm = result.algorithm
    found = ", ".join(f"{label} (p={p:.2f})" for label, p in best.items())
    text = (
        f"AI findings on these images: {found}; {algorithm.name or algorithm.model_id} {algorithm.version}."
    )
    if algorithm.research_use_only:
        text += f" {NOT_FOR_DIAGNOSIS}."
    return ascii_text(text, 1024)


def _reference(ds: Dataset) -> Dataset:
    """The UIDs of an image plus Rows and Columns (highdicom writes an IMAGE item only for data
    sets that have them; other ones become COMPOSITE items)."""
    out = evidence_reference(ds)
    out.Rows, out.Columns = ds.get("Rows") or 1, ds.get("Columns") or 1
    return out


def _in(state: Dataset, frames: dict[str, list[int]]) -> bool:
    uid = str(state.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID)
    return uid in frames


def _add_frames_and_states(root: Dataset, frames: dict[str, list[int]], states: dict[str, Dataset]) -> None:
    """Name the marked frames of multi-frame key images and nest the reference to each key
    image's presentation state in its IMAGE item (Image Reference Macro, PS3.3 Table 10-3).

    The IMAGE and COMPOSITE items lose the Concept Name highdicom gives them ("Source"): TID 2010
    rows 8 and 10 have none, and PixelMed's validator reports one as an error."""
    for item in root.ContentSequence:
        if item.ValueType in ("IMAGE", "COMPOSITE") and _CONCEPT_NAME in item:
            del item[_CONCEPT_NAME]
        if item.ValueType != "IMAGE":
            continue
        ref = item.ReferencedSOPSequence[0]
        uid = str(ref.ReferencedSOPInstanceUID)
        if frames.get(uid):
            ref.ReferencedFrameNumber = sorted(frames[uid])
        state = states.get(uid)
        if state is not None:
            nested = Dataset()
            nested.ReferencedSOPClassUID = state.SOPClassUID
            nested.ReferencedSOPInstanceUID = state.SOPInstanceUID
            ref.ReferencedSOPSequence = [nested]
