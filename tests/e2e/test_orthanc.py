"""End to end with Orthanc as the PACS: phantom studies of the four modalities are uploaded to
Orthanc, Orthanc C-STOREs them to the node, and the node's SR, heatmap SCs and parametric maps
come back into the same studies. The SR's probabilities must be the model's."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from sqlmodel import Session, select

from node.app import build_node
from node.settings import load_settings
from node.store.tables import Job, JobState, OutboxItem, OutboxState, Series
from node.synth import generate_study
from tests.helpers import free_port, need, write_config
from tests.orthanc import Orthanc

ROOT = Path(__file__).resolve().parents[2]
STUDIES = {
    "cxr": ("cxr", "tuberculosis", {"scale": 0.5}),
    "mammo": ("mammo", "malignant", {"scale": 0.25}),
    "ct-liver": ("ct", "malignant", {"slices": 16}),
    "mr-brain": ("mr", "tumour", {"slices": 12}),
}
pytestmark = pytest.mark.slow


def node_config(folder: Path, destination_port: int, **extra: dict) -> Path:
    sections = {
        "models": {"directory": str(ROOT / "models" / "onnx")},
        "routing": {"rules_file": str(ROOT / "config" / "routes.yaml")},
        "assembly": {"series_quiet_s": 1.0, "poll_interval_s": 0.2},
        "destinations": [
            {
                "name": "orthanc",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": destination_port,
                "backoff_initial_s": 0.5,
                "backoff_max_s": 1.0,
            }
        ],
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(sections.get(key), dict):
            sections[key] = {**sections[key], **value}  # type: ignore[dict-item]
        else:
            sections[key] = value
    return write_config(folder, **sections)  # type: ignore[arg-type]


def wait_jobs(node, study_uids: set[str], timeout: float = 300.0) -> list[Job]:
    deadline = time.monotonic() + timeout
    while True:
        with Session(node.engine) as s:
            jobs = [j for j in s.exec(select(Job)) if j.study_uid in study_uids]
        finished = [j for j in jobs if j.state in (JobState.DONE, JobState.FAILED)]
        if jobs and len(finished) == len(jobs) and {j.study_uid for j in jobs} == study_uids:
            return jobs
        if time.monotonic() > deadline:
            raise TimeoutError(f"jobs not finished: {[(j.model_id, j.state, j.error) for j in jobs]}")
        time.sleep(0.5)


_TEXT_PROBABILITY = re.compile(r"probability ([0-9.]+(?:e-?[0-9]+)?)")


def sr_probabilities(ds: pydicom.Dataset) -> list[float]:
    """Every probability in an SR content tree: the NUM with unit "1" of a finding with an image
    region (a measurement group), and the "probability p" of the TEXT beside the qualitative
    evaluation of a finding without one."""
    found: list[float] = []

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "NUM" and "MeasuredValueSequence" in item:
                mv = item.MeasuredValueSequence[0]
                if mv.MeasurementUnitsCodeSequence[0].CodeValue == "1":
                    found.append(float(mv.NumericValue))
            if item.ValueType == "TEXT" and (match := _TEXT_PROBABILITY.search(str(item.TextValue))):
                found.append(float(match.group(1)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return found


def validate(path: Path) -> None:
    out = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
    assert not errors, f"dciodvfy {path.name}: {errors}"


@pytest.fixture(scope="module")
def pacs_and_node(tmp_path_factory):
    folder = tmp_path_factory.mktemp("e2e")
    orthanc_port = free_port()
    config = node_config(folder, orthanc_port)
    node = build_node(load_settings(config))
    node.start()
    orthanc = Orthanc(folder / "orthanc", node.scp.port, dicom_port=orthanc_port)
    yield orthanc, node, folder
    orthanc.stop()
    node.stop()


def test_four_modalities_round_trip_through_orthanc(pacs_and_node):
    orthanc, node, folder = pacs_and_node
    by_model: dict[str, tuple[str, str]] = {}
    for model_id, (kind, label, options) in STUDIES.items():
        truth = generate_study(kind, folder / "phantoms" / model_id, seed=7, label=label, **options)
        files = sorted((folder / "phantoms" / model_id).glob("*.dcm"))
        (orthanc_study,) = orthanc.upload(files)
        by_model[model_id] = (orthanc_study, truth.study_instance_uid)
    for orthanc_study, _ in by_model.values():
        orthanc.send_to_node(orthanc_study)

    jobs = wait_jobs(node, {uid for _, uid in by_model.values()})
    assert {j.model_id for j in jobs} == set(STUDIES)
    for job in jobs:
        assert job.state == JobState.DONE, f"{job.model_id}: {job.error}"
        timings = job.stage_timings()
        assert {"preprocessing", "inferring", "writing"} <= set(timings)

    for job in jobs:
        orthanc_study, study_uid = by_model[job.model_id]
        series = orthanc.wait_for_series(
            orthanc_study, lambda ss: any(s["MainDicomTags"].get("Modality") == "SR" for s in ss)
        )
        modalities = [s["MainDicomTags"].get("Modality") for s in series]
        descriptions = [s["MainDicomTags"].get("SeriesDescription", "") for s in series]
        assert "SR" in modalities, f"{job.model_id}: no SR in {modalities}"
        assert any("heatmap" in d.lower() for d in descriptions), (
            f"{job.model_id}: no heatmap series {descriptions}"
        )
        sr_series = next(s for s in series if s["MainDicomTags"].get("Modality") == "SR")
        sr_path = folder / f"{job.model_id}-sr.dcm"
        sr_path.write_bytes(orthanc.instance_file(sr_series["Instances"][0]))
        sr = pydicom.dcmread(sr_path)
        assert sr.StudyInstanceUID == study_uid
        produced = sorted(f.probability for f in job.recorded_result().findings)
        reported = sorted(sr_probabilities(sr))
        assert len(reported) == len(produced), f"{job.model_id}: SR {reported} vs model {produced}"
        assert all(abs(a - b) < 1e-3 for a, b in zip(reported, produced, strict=True)), (
            f"{job.model_id}: SR {reported} vs model {produced}"
        )
        validate(sr_path)
        findings = {f.label: f for f in job.recorded_result().findings}
        expected = STUDIES[job.model_id][1]
        assert findings[expected].positive, f"{job.model_id}: {expected} not found: {findings}"

    with Session(node.engine) as s:
        items = list(s.exec(select(OutboxItem)))
    assert items and all(i.state == OutboxState.SENT for i in items)
    assert len({(i.destination, i.sop_instance_uid) for i in items}) == len(items)


REAL_FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "image_dfl.dcm"]


def test_pydicom_real_images_are_routed_or_explained(pacs_and_node, tmp_path):
    from tests.helpers import fresh_copy, raw_store_file, sample_file

    orthanc, node, _ = pacs_and_node
    sent = {}
    # CT_small (a chest slice) as sent, and as a series whose header says ABDOMEN
    for name, body_part in [*((n, None) for n in REAL_FILES), ("CT_small.dcm", "ABDOMEN")]:
        label = f"{name} {body_part}" if body_part else name
        copy = fresh_copy(
            sample_file(name),
            tmp_path / label.replace(" ", "-"),
            study_uid=pydicom.uid.generate_uid(),
            series_uid=pydicom.uid.generate_uid(),
            body_part=body_part,
        )
        assert raw_store_file(node.scp.port, copy) == 0
        sent[label] = pydicom.dcmread(copy, stop_before_pixels=True)
    deadline = time.monotonic() + 120
    while True:
        with Session(node.engine) as s:
            rows = {r.series_uid: r for r in s.exec(select(Series))}
            states = {n: rows.get(str(ds.SeriesInstanceUID)) for n, ds in sent.items()}
        if all(r is not None and r.state in ("routed", "not routed") for r in states.values()):
            break
        assert time.monotonic() < deadline, {n: r.state if r else None for n, r in states.items()}
        time.sleep(0.3)
    for name, row in states.items():
        assert row is not None
        if row.state == "not routed":
            assert row.route_note.startswith("not routed"), f"{name}: {row.route_note}"
    assert states["CT_small.dcm"].state == "not routed", "a chest CT naming no body part reached a model"
    assert "chest" in states["CT_small.dcm"].route_note.lower(), states["CT_small.dcm"].route_note
    study_uids = {str(sent[n].StudyInstanceUID) for n, r in states.items() if r and r.state == "routed"}
    assert study_uids == {str(sent["CT_small.dcm ABDOMEN"].StudyInstanceUID)}, states
    jobs = wait_jobs(node, study_uids)
    for job in jobs:
        assert job.state == JobState.DONE, f"{job.model_id}: {job.error}"


def test_outputs_wait_while_destination_is_down_then_arrive_once(tmp_path):
    orthanc_port = free_port()  # nothing listens here yet
    config = node_config(tmp_path, orthanc_port)
    node = build_node(load_settings(config))
    node.start()
    orthanc = None
    try:
        phantom = tmp_path / "mr"
        truth = generate_study("mr", phantom, seed=3, label="tumour", slices=8)
        from tests.helpers import raw_store_file

        for f in sorted(phantom.glob("*.dcm")):
            assert raw_store_file(node.scp.port, f) == 0
        deadline = time.monotonic() + 120
        while True:
            with Session(node.engine) as s:
                items = list(s.exec(select(OutboxItem)))
                job = s.exec(select(Job)).first()
            if items and all(i.attempts >= 2 for i in items):
                break
            assert time.monotonic() < deadline, f"no retries seen: {[(i.state, i.attempts) for i in items]}"
            time.sleep(0.3)
        assert all(i.state == OutboxState.PENDING for i in items)
        assert job is not None and job.state == JobState.SENDING
        assert "association" in items[0].last_error
        # IT sees the backlog meanwhile: on the status page and in the JSON API
        from fastapi.testclient import TestClient

        with TestClient(node.web_app()) as web:
            page = web.get("/").text
            assert f"Outbox pending / failed<b>{len(items)} / " in page.replace("\n", "")
            outbox = web.get("/api/v1/outbox?state=pending").json()
            assert outbox["counts"].get("pending") == len(items)
            assert {i["sop_instance_uid"] for i in outbox["items"]} == {i.sop_instance_uid for i in items}

        orthanc = Orthanc(tmp_path / "orthanc", node.scp.port, dicom_port=orthanc_port)
        (done,) = wait_jobs(node, {truth.study_instance_uid}, timeout=120)
        assert done.state == JobState.DONE
        with Session(node.engine) as s:
            items = list(s.exec(select(OutboxItem)))
        assert all(i.state == OutboxState.SENT for i in items)
        stats = orthanc.http.get("/statistics").json()
        assert stats["CountInstances"] == len(items)  # each output exactly once, nothing else
    finally:
        if orthanc is not None:
            orthanc.stop()
        node.stop()
