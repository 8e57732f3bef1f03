"""End to end: a positive chest phantom C-STOREd to the node reaches three destinations of the new
kinds at once: its DICOM objects over STOW-RS into Orthanc's DICOMweb plugin (basic
authentication), an HL7 v2 ORU^R01 over MLLP into python-hl7's MLLP server, and a FHIR transaction
Bundle (bearer token) into a FHIR endpoint that validates it with fhir.resources. The message and the
Bundle are parsed back; the study API shows each destination's delivery state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from node.app import build_node
from node.settings import load_settings
from node.store.tables import Job, JobState, OutboxItem, OutboxState
from node.synth import generate_study
from tests.helpers import free_port, raw_store_file, write_config
from tests.send.conftest import DicomwebOrthanc
from tests.send.peers import FhirReceiver, MllpReceiver

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _wait_sent(node, timeout: float = 240.0) -> tuple[Job, list[OutboxItem]]:
    deadline = time.monotonic() + timeout
    while True:
        with Session(node.engine) as s:
            jobs = list(s.exec(select(Job)))
            rows = list(s.exec(select(OutboxItem)))
        if jobs and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs):
            assert len(jobs) == 1, [(j.model_id, j.state) for j in jobs]
            return jobs[0], rows
        assert time.monotonic() < deadline, [(j.model_id, j.state, j.error) for j in jobs]
        time.sleep(0.5)


def test_positive_chest_study_to_dicomweb_hl7_and_fhir(tmp_path):
    archive = DicomwebOrthanc(tmp_path / "orthanc", free_port(), {"node": "stow-secret"})
    ris = MllpReceiver()
    ehr = FhirReceiver(token="ehr-token")
    config = write_config(
        tmp_path,
        models={"directory": str(ROOT / "models" / "onnx"), "providers": ["CPUExecutionProvider"]},
        web={"enabled": False},
        outputs={"send_to": "origin"},
        destinations=[
            {"name": "archive", "kind": "dicomweb", "url": archive.url, "username": "node",
             "password": "stow-secret", "parametric_map": False, "backoff_initial_s": 0.5},
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port,
             "hl7": {"receiving_application": "RIS", "receiving_facility": "RADIOLOGY"}},
            {"name": "ehr", "kind": "fhir", "url": ehr.url, "token": "ehr-token"},
        ],
    )  # fmt: skip
    node = build_node(load_settings(config))
    node.start()
    try:
        truth = generate_study("cxr", tmp_path / "phantom", seed=11, label="tuberculosis", scale=0.5)
        for path in sorted((tmp_path / "phantom").glob("*.dcm")):
            assert raw_store_file(node.scp.port, path) == 0
        job, rows = _wait_sent(node)
        assert job.state == JobState.DONE, job.error
        findings = {f.label: f for f in job.recorded_result().findings}
        assert findings["tuberculosis"].positive, findings

        by_destination: dict[str, list[OutboxItem]] = {}
        for row in rows:
            by_destination.setdefault(row.destination, []).append(row)
        assert all(r.state == OutboxState.SENT for r in rows)
        assert [r.kind for r in by_destination["ris"]] == ["hl7"]
        assert [r.kind for r in by_destination["ehr"]] == ["fhir"]
        objects = by_destination["archive"]
        assert {"sr", "sc"} <= {r.kind for r in objects} and "pm" not in {r.kind for r in objects}
        assert sorted(archive.instance_uids()) == sorted(r.sop_instance_uid for r in objects)  # each once

        (oru,) = ris.received
        assert str(oru.segment("MSH")(9)) == "ORU^R01^ORU_R01"
        assert str(oru.segment("ZDS")(1)(1)(1)) == truth.study_instance_uid
        assert str(oru.segment("OBR")(27)(1)(6)) == "S"  # urgent: tuberculosis is a triage finding
        tb = next(s for s in oru.segments("OBX") if str(s(3)(1)(1)) == "56717001")
        assert str(tb(8)) == "A"
        assert abs(float(str(tb(5))) - findings["tuberculosis"].probability) < 1e-3

        (bundle,) = ehr.bundles
        resources = [e.resource for e in bundle.entry]
        (report,) = [r for r in resources if r.get_resource_type() == "DiagnosticReport"]
        observations = [r for r in resources if r.get_resource_type() == "Observation"]
        assert len(report.result) == len(observations) == len(findings)
        (study,) = [r for r in resources if r.get_resource_type() == "ImagingStudy"]
        assert study.identifier[0].value == f"urn:oid:{truth.study_instance_uid}"
        positive = [o for o in observations if o.interpretation[0].coding[0].code == "A"]
        assert [o.code.coding[0].code for o in positive] == ["56717001"]

        detail = TestClient(node.web_app()).get(f"/api/v1/studies/{truth.study_instance_uid}").json()
        shown = {(o["destination"], o["kind"], o["state"]) for j in detail["jobs"] for o in j["outputs"]}
        assert {("ris", "hl7", "sent"), ("ehr", "fhir", "sent"), ("archive", "sr", "sent")} <= shown
    finally:
        node.stop()
        archive.stop()
        ris.stop()
        ehr.stop()
