"""End to end with Orthanc as the PACS, for a 3-D segmentation model (``segmentation.dimensions: 3``,
sliding-window inference over the series' volume): a CT phantom series with a liver mass goes from
Orthanc to a node that routes abdominal CT to a 3-D model (the bundled ct-liver-seg wrapped into an
NCDHW graph, built at test time); the node's DICOM Segmentation and SR come back into the study,
both pass dciodvfy, the SEG references every source slice and its mask matches the generator's
truth."""

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
from tests.outputs.seg3d_models import liver_seg_3d

pytestmark = pytest.mark.slow
pytest.importorskip("onnx")

ROUTES = """version: 1
rules:
  - name: ct-liver-seg-3d
    description: abdominal CT to the 3-D liver lesion segmentation model
    match: {modality: CT, body_part: [ABDOMEN, LIVER]}
    models: ct-liver-seg-3d
    grouping: series
"""


def test_3d_segmentation_job_sends_seg_and_sr_to_orthanc(tmp_path: Path) -> None:
    models = tmp_path / "models"
    liver_seg_3d(models / "ct-liver-seg-3d")
    routes = tmp_path / "routes.yaml"
    routes.write_text(ROUTES)
    orthanc_port = free_port()
    config = node_config(
        tmp_path, orthanc_port, routing={"rules_file": str(routes)}, models={"directory": str(models)}
    )
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
        assert job.model_id == "ct-liver-seg-3d" and job.state == JobState.DONE, job.error
        result = job.recorded_result()
        assert result is not None and result.segments is not None
        assert {o.kind for o in result.outputs} >= {"seg", "sr"}
        mass = next(s for s in result.segments if s.label == "mass")
        assert mass.pixels > 0 and (mass.volume_mm3 or 0) > 0

        series = orthanc.wait_for_series(
            study, lambda ss: {"SEG", "SR"} <= {s["MainDicomTags"].get("Modality") for s in ss}
        )
        by_modality = {s["MainDicomTags"].get("Modality"): s for s in series}
        descriptions = [s["MainDicomTags"].get("SeriesDescription", "") for s in series]
        assert any("heatmap" in d.lower() for d in descriptions), descriptions  # the mask overlaid (SC)
        seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
        seg_path.write_bytes(orthanc.instance_file(by_modality["SEG"]["Instances"][0]))
        sr_path.write_bytes(orthanc.instance_file(by_modality["SR"]["Instances"][0]))
        validate(seg_path)
        validate(sr_path)
        seg, sr = hd.seg.segread(seg_path), pydicom.dcmread(sr_path)
        assert seg.StudyInstanceUID == sr.StudyInstanceUID == truth.study_instance_uid
        uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for s in seg.ReferencedSeriesSequence
            for item in s.ReferencedInstanceSequence
        }
        assert referenced == set(uids)
        labels = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
        mass_number = next(n for n, name in labels.items() if name == "mass")
        rendered = render_study("ct", seed, "malignant", **options)
        predicted, expected = [], []
        for uid, image in zip(uids, rendered.images, strict=True):
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
