"""The headline real-world cases end to end, with Orthanc as the PACS the results go back to:

- a real CR chest radiograph (MONOCHROME1, JPEG 2000, PixelSpacing 0\\0, no ImagerPixelSpacing),
  sent to the node with DCMTK ``dcmsend``, comes back into its study in Orthanc as an SR and a
  heatmap secondary capture;
- a real enhanced MR (10 frames) uploaded to Orthanc and C-STOREd by Orthanc to the node is
  analysed on all its frames, and its SR references the frames;
- a real head CT without BodyPartExamined (WG04 693) is not sent to the liver model.
"""

from __future__ import annotations

import subprocess
import time

import pydicom
import pytest
from sqlmodel import Session, select

from node.app import build_node
from node.settings import load_settings
from node.store.tables import Job, JobState, Series
from tests.e2e.test_orthanc import node_config, validate, wait_jobs
from tests.helpers import free_port, need
from tests.orthanc import Orthanc
from tests.realfiles.corpus import derived

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pacs_and_node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e-real")
    orthanc_port = free_port()
    node = build_node(load_settings(node_config(folder, orthanc_port)))
    node.start()
    orthanc = Orthanc(folder / "orthanc", node.scp.port, dicom_port=orthanc_port)
    yield orthanc, node, folder
    orthanc.stop()
    node.stop()


def _orthanc_study(orthanc: Orthanc, study_uid: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        rsp = orthanc.http.post("/tools/lookup", content=study_uid)
        rsp.raise_for_status()
        found = [r["ID"] for r in rsp.json() if r["Type"] == "Study"]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"study not in Orthanc after {timeout} s"
        time.sleep(0.5)


def _sr_references(sr: pydicom.Dataset) -> list[tuple[str, list[int]]]:
    """(SOP Instance UID, frames) of every IMAGE reference in the SR content tree."""
    found = []

    def walk(items) -> None:
        for item in items:
            for ref in item.get("ReferencedSOPSequence") or []:
                frames = ref.get("ReferencedFrameNumber")
                if frames is None:
                    frames = []
                elif not isinstance(frames, (list, pydicom.multival.MultiValue)):
                    frames = [frames]
                found.append((str(ref.ReferencedSOPInstanceUID), [int(f) for f in frames]))
            walk(item.get("ContentSequence") or [])

    walk(sr.ContentSequence)
    return found


def test_real_cr_chest_sent_with_dcmsend_comes_back_as_sr_and_heatmap(pacs_and_node, tmp_path):
    orthanc, node, folder = pacs_and_node
    path = derived("RG1_J2KI.dcm")(tmp_path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert str(ds.PixelSpacing) == "[0.000, 0.000]" and "ImagerPixelSpacing" not in ds
    proc = subprocess.run(
        [need("dcmsend"), "-aec", "PACSNODE", "127.0.0.1", str(node.scp.port), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (job,) = wait_jobs(node, {str(ds.StudyInstanceUID)}, timeout=300)
    assert job.model_id == "cxr" and job.state == JobState.DONE, job.error
    assert job.attempts == 1

    # the node stored the CR to itself only: Orthanc gets the outputs into a study of the same UID
    study = _orthanc_study(orthanc, str(ds.StudyInstanceUID))
    series = orthanc.wait_for_series(
        study,
        lambda ss: (
            {"SR"} <= {s["MainDicomTags"].get("Modality") for s in ss}
            and any("heatmap" in s["MainDicomTags"].get("SeriesDescription", "").lower() for s in ss)
        ),
        timeout=120,
    )
    modalities = {s["MainDicomTags"].get("Modality") for s in series}
    assert "SR" in modalities, modalities
    sr_series = next(s for s in series if s["MainDicomTags"].get("Modality") == "SR")
    sr_path = folder / "cr-sr.dcm"
    sr_path.write_bytes(orthanc.instance_file(sr_series["Instances"][0]))
    validate(sr_path)
    sr = pydicom.dcmread(sr_path)
    assert any(uid == str(ds.SOPInstanceUID) for uid, _ in _sr_references(sr))
    heatmap = next(s for s in series if "heatmap" in s["MainDicomTags"].get("SeriesDescription", "").lower())
    sc_path = folder / "cr-sc.dcm"
    sc_path.write_bytes(orthanc.instance_file(heatmap["Instances"][0]))
    validate(sc_path)


def test_real_enhanced_mr_is_analysed_on_all_frames(pacs_and_node, tmp_path):
    orthanc, node, folder = pacs_and_node
    path = derived("emri_small.dcm")(tmp_path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    frames = int(ds.NumberOfFrames)
    assert frames == 10
    (study,) = orthanc.upload([path])
    orthanc.send_to_node(study)
    (job,) = wait_jobs(node, {str(ds.StudyInstanceUID)}, timeout=300)
    assert job.model_id == "mr-brain" and job.state == JobState.DONE, job.error
    assert job.recorded_result().frames == frames
    series = orthanc.wait_for_series(
        study, lambda ss: "SR" in {s["MainDicomTags"].get("Modality") for s in ss}, timeout=120
    )
    sr_series = next(s for s in series if s["MainDicomTags"].get("Modality") == "SR")
    sr_path = folder / "emr-sr.dcm"
    sr_path.write_bytes(orthanc.instance_file(sr_series["Instances"][0]))
    validate(sr_path)
    refs = [
        f for uid, fs in _sr_references(pydicom.dcmread(sr_path)) if uid == str(ds.SOPInstanceUID) for f in fs
    ]
    assert refs and all(1 <= f <= frames for f in refs), f"SR references frames {refs} of {frames}"


def test_real_head_ct_without_body_part_is_not_sent_to_the_liver_model(pacs_and_node, tmp_path):
    orthanc, node, _ = pacs_and_node
    path = derived("693_UNCI.dcm")(tmp_path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert "BodyPartExamined" not in ds or not ds.BodyPartExamined
    (study,) = orthanc.upload([path])
    orthanc.send_to_node(study)
    deadline = time.monotonic() + 120
    while True:
        with Session(node.engine) as s:
            row = s.get(Series, str(ds.SeriesInstanceUID))
            jobs = list(s.exec(select(Job).where(Job.study_uid == str(ds.StudyInstanceUID))))
        if row is not None and row.state in ("routed", "not routed"):
            break
        assert time.monotonic() < deadline, "the head CT was never routed or refused"
        time.sleep(0.3)
    assert "ct-liver" not in {j.model_id for j in jobs}, row.route_note
    assert row.state == "not routed" and row.route_note.startswith("not routed"), row.route_note
