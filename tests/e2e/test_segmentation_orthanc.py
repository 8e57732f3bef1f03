"""End to end with Orthanc as the PACS, for a segmentation model: a CT phantom series with a liver
mass is uploaded to Orthanc and C-STOREd to a node that routes abdominal CT to ct-liver-seg; the
node's DICOM Segmentation and SR come back into the same study, Orthanc stores both, the SR's
segment group references the SEG's segment, and the SEG's mask overlaps the generator's truth."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from node.app import build_node
from node.inference.postprocess import dice
from node.settings import load_settings
from node.store.tables import JobState
from node.synth import generate_study, render_study
from tests.e2e.test_orthanc import node_config, validate, wait_jobs
from tests.helpers import free_port
from tests.orthanc import Orthanc

pytestmark = pytest.mark.slow

ROUTES = """version: 1
rules:
  - name: ct-liver-seg
    description: abdominal CT to the liver lesion segmentation model
    match: {modality: CT, body_part: [ABDOMEN, LIVER]}
    models: ct-liver-seg
    grouping: series
"""


def test_segmentation_job_sends_seg_and_sr_to_orthanc(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    orthanc_port = free_port()
    config = node_config(tmp_path, orthanc_port, routing={"rules_file": str(routes)})
    node = build_node(load_settings(config))
    node.start()
    orthanc = Orthanc(tmp_path / "orthanc", node.scp.port, dicom_port=orthanc_port)
    try:
        seed, options = 7, {"slices": 16, "size": 256}
        truth = generate_study(
            "ct", tmp_path / "ct", seed=seed, label="malignant", write_masks=False, **options
        )
        files = sorted((tmp_path / "ct").glob("*.dcm"))
        (study,) = orthanc.upload(files)
        orthanc.send_to_node(study)
        (job,) = wait_jobs(node, {truth.study_instance_uid})
        assert job.model_id == "ct-liver-seg" and job.state == JobState.DONE, job.error
        result = job.recorded_result()
        assert result is not None and result.segments is not None
        assert {o.kind for o in result.outputs} >= {"seg", "sr"}
        mass = next(s for s in result.segments if s.label == "mass")
        assert mass.pixels > 0 and (mass.volume_mm3 or 0) > 0 and (mass.area_mm2 or 0) > 0

        series = orthanc.wait_for_series(
            study,
            lambda ss: {"SEG", "SR"} <= {s["MainDicomTags"].get("Modality") for s in ss},
        )
        by_modality = {s["MainDicomTags"].get("Modality"): s for s in series}
        descriptions = [s["MainDicomTags"].get("SeriesDescription", "") for s in series]
        assert any("heatmap" in d.lower() for d in descriptions), descriptions  # the mask overlaid
        seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
        seg_path.write_bytes(orthanc.instance_file(by_modality["SEG"]["Instances"][0]))
        sr_path.write_bytes(orthanc.instance_file(by_modality["SR"]["Instances"][0]))
        validate(seg_path)
        validate(sr_path)
        seg, sr = hd.seg.segread(seg_path), pydicom.dcmread(sr_path)
        assert seg.StudyInstanceUID == sr.StudyInstanceUID == truth.study_instance_uid
        labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
        assert "mass" in labels.values()
        refs = [
            item.ReferencedSOPSequence[0]
            for item in _walk(sr)
            if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121191"
        ]
        assert refs and all(r.ReferencedSOPInstanceUID == seg.SOPInstanceUID for r in refs)
        assert {labels[int(r.ReferencedSegmentNumber)] for r in refs} == {
            s.label for s in result.segments if s.pixels
        }

        # the stored mask against the generator's truth, slice by slice
        rendered = render_study("ct", seed, "malignant", **options)
        predicted, expected = [], []
        mass_number = next(n for n, name in labels.items() if name == "mass")
        for path, image in zip(files, rendered.images, strict=True):
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            try:
                mask = seg.get_pixels_by_source_instance([uid], segment_numbers=[mass_number])[0, :, :, 0]
            except (ValueError, KeyError, IndexError):  # a frame without pixels is not stored
                mask = np.zeros(image.mask.shape, dtype=bool)
            predicted.append(mask.astype(bool))
            expected.append(image.mask > 0)
        assert dice(np.stack(predicted), np.stack(expected)) >= 0.5
    finally:
        orthanc.stop()
        node.stop()


def _walk(item: pydicom.Dataset):
    for child in item.get("ContentSequence") or []:
        yield child
        yield from _walk(child)
