"""End to end with Orthanc as the PACS, for the presentation states and the Key Object Selection:
a chest phantom with a tuberculosis-like lesion goes from Orthanc to the node (reference cxr
model, CPU); the SR, the heatmap capture, a Grayscale Softcopy Presentation State outlining the
finding on the radiograph and a Key Object Selection flagging it come back into the study.
Orthanc stores them; the copies it returns are valid by dciodvfy and DCMTK's dcmpschk, and every
object the KOS names (image, state, SR) is in Orthanc."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pydicom
import pytest

from node.app import build_node
from node.settings import load_settings
from node.store.tables import JobState
from node.synth import generate_study
from tests.e2e.test_orthanc import node_config, validate, wait_jobs
from tests.helpers import free_port, need
from tests.orthanc import Orthanc

pytestmark = pytest.mark.slow


def test_chest_positive_sends_sr_sc_gsps_and_kos_to_orthanc(tmp_path: Path) -> None:
    orthanc_port = free_port()
    node = build_node(load_settings(node_config(tmp_path, orthanc_port)))
    node.start()
    orthanc = Orthanc(tmp_path / "orthanc", node.scp.port, dicom_port=orthanc_port)
    try:
        truth = generate_study("cxr", tmp_path / "cxr", seed=7, label="tuberculosis", scale=0.5)
        (study,) = orthanc.upload(sorted((tmp_path / "cxr").glob("*.dcm")))
        orthanc.send_to_node(study)
        (job,) = wait_jobs(node, {truth.study_instance_uid})
        assert job.state == JobState.DONE, job.error
        result = job.recorded_result()
        assert result is not None and any(
            f.label == "tuberculosis" and f.positive for f in result.findings
        ), result
        kinds = [o.kind for o in result.outputs]
        assert {"sr", "sc", "gsps", "kos"} <= set(kinds) and kinds.count("kos") == 1, kinds

        series = orthanc.wait_for_series(
            study, lambda ss: {"SR", "PR", "KO"} <= {s["MainDicomTags"].get("Modality") for s in ss}
        )
        by_modality = {s["MainDicomTags"].get("Modality"): s for s in series}
        files = {}
        for modality in ("SR", "PR", "KO"):
            (instance,) = by_modality[modality]["Instances"]
            path = tmp_path / f"{modality}.dcm"
            path.write_bytes(orthanc.instance_file(instance))
            files[modality] = path
            validate(path)
        check = subprocess.run([need("dcmpschk"), str(files["PR"])], capture_output=True, text=True)
        assert "Test passed" in check.stdout + check.stderr, check.stdout + check.stderr

        sr, pr, ko = (pydicom.dcmread(files[m]) for m in ("SR", "PR", "KO"))
        source = pydicom.dcmread(sorted((tmp_path / "cxr").glob("*.dcm"))[0], stop_before_pixels=True)
        assert pr.StudyInstanceUID == ko.StudyInstanceUID == truth.study_instance_uid
        assert pr.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
            source.SOPInstanceUID
        )
        annotation = pr.GraphicAnnotationSequence[0]
        assert annotation.GraphicObjectSequence[0].GraphicType == "POLYLINE"
        assert annotation.TextObjectSequence[0].UnformattedTextValue.startswith("tuberculosis: p=")
        assert float(pr.SoftcopyVOILUTSequence[0].WindowWidth) == pytest.approx(float(source.WindowWidth))

        (image,) = [i for i in ko.ContentSequence if i.ValueType == "IMAGE"]
        (composite,) = [i for i in ko.ContentSequence if i.ValueType == "COMPOSITE"]
        ref = image.ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == pr.SOPInstanceUID
        assert composite.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sr.SOPInstanceUID
        stored = {uid for s in orthanc.study_series(study) for uid in _instance_uids(orthanc, s["Instances"])}
        assert {str(source.SOPInstanceUID), str(pr.SOPInstanceUID), str(sr.SOPInstanceUID)} <= stored
    finally:
        orthanc.stop()
        node.stop()


def _instance_uids(orthanc: Orthanc, instances: list[str]) -> list[str]:
    """SOP Instance UIDs of Orthanc instances (by their Orthanc ids)."""
    out = []
    for instance in instances:
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance)), stop_before_pixels=True)
        out.append(str(ds.SOPInstanceUID))
    return out


def test_ct_mr_and_mammography_states_and_kos_are_stored_and_valid(tmp_path: Path) -> None:
    """The reference ct-liver, mr-brain (series level: the top slices) and mammo models: one state
    per marked image, one KOS per study naming exactly those images and states, all valid as
    Orthanc returns them."""
    studies = {
        "ct-liver": ("ct", "malignant", {"slices": 16}),
        "mr-brain": ("mr", "tumour", {"slices": 12}),
        "mammo": ("mammo", "malignant", {"scale": 0.25}),
    }
    orthanc_port = free_port()
    node = build_node(load_settings(node_config(tmp_path, orthanc_port)))
    node.start()
    orthanc = Orthanc(tmp_path / "orthanc", node.scp.port, dicom_port=orthanc_port)
    checker = need("dcmpschk")
    try:
        ids = {}
        for model_id, (kind, label, options) in studies.items():
            truth = generate_study(kind, tmp_path / model_id, seed=7, label=label, **options)
            (study,) = orthanc.upload(sorted((tmp_path / model_id).glob("*.dcm")))
            ids[truth.study_instance_uid] = (model_id, study)
            orthanc.send_to_node(study)
        jobs = wait_jobs(node, set(ids))
        for job in jobs:
            model_id, study = ids[job.study_uid]
            assert job.state == JobState.DONE, f"{model_id}: {job.error}"
            kinds = [o.kind for o in job.recorded_result().outputs]
            assert kinds.count("kos") == 1 and kinds.count("gsps") >= 1, f"{model_id}: {kinds}"
            series = orthanc.wait_for_series(
                study,
                lambda ss, n=kinds.count("gsps"): (
                    any(s["MainDicomTags"].get("Modality") == "PR" and len(s["Instances"]) == n for s in ss)
                    and any(s["MainDicomTags"].get("Modality") == "KO" for s in ss)
                ),
            )
            by_modality = {s["MainDicomTags"].get("Modality"): s for s in series}
            states = []
            for i, instance in enumerate(by_modality["PR"]["Instances"]):
                path = tmp_path / f"{model_id}-pr{i}.dcm"
                path.write_bytes(orthanc.instance_file(instance))
                validate(path)
                check = subprocess.run([checker, str(path)], capture_output=True, text=True)
                assert "Test passed" in check.stdout + check.stderr, (
                    f"{model_id}: {check.stdout}{check.stderr}"
                )
                states.append(pydicom.dcmread(path))
            (instance,) = by_modality["KO"]["Instances"]
            path = tmp_path / f"{model_id}-ko.dcm"
            path.write_bytes(orthanc.instance_file(instance))
            validate(path)
            ko = pydicom.dcmread(path)
            images = [i.ReferencedSOPSequence[0] for i in ko.ContentSequence if i.ValueType == "IMAGE"]
            by_image = {
                str(s.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID): s
                for s in states
            }
            assert {str(r.ReferencedSOPInstanceUID) for r in images} == set(by_image), model_id
            for ref in images:
                nested = ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                assert nested == by_image[str(ref.ReferencedSOPInstanceUID)].SOPInstanceUID, model_id
    finally:
        orthanc.stop()
        node.stop()
