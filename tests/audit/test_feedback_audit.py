"""Feedback given is audited (issue 18): each stored verdict sends a DICOM Procedure Record audit
message (DCM 110111; PS3.15 A.5 has no event of its own for feedback) to a real rsyslog: action C
for a first verdict, U when it replaced the user's previous one, the radiologist (the token's
name, the client's address) as the requestor, the study and its patient (read from the stored
files). The message validates against the DICOM audit message schema; the node's own log holds
none of the patient's identifiers; a refused verdict sends nothing."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from node.audit import messages as m
from node.store.tables import JobState, utcnow
from node.synth import generate_study
from node.web.auth import hash_token
from tests.audit.conftest import Rsyslog, assert_valid
from tests.helpers import add_job, raw_store_file

TOKEN = "radiologist-token"


def _procedure_records(rs: Rsyslog, count: int, timeout: float = 15.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            root
            for root in (assert_valid(r.xml) for r in rs.messages())
            if root.find("EventIdentification/EventID").get("csd-code") == "110111"
        ]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"{count} Procedure Record messages did not arrive")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_feedback_given_is_audited(
    transport: str, rsyslog: Rsyslog, make_node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    node = make_node(
        web={"tokens": [{"name": "dr-rad", "sha256": hash_token(TOKEN), "role": "read"}]},
        audit={
            "enabled": True,
            "host": "127.0.0.1",
            "port": rsyslog.udp if transport == "udp" else rsyslog.tcp,
            "transport": transport,
            "source_id": "PACSNODE@feedback-test",
        },
        runner={"workers": 1},
    )
    node.runner.stop()
    study = generate_study("cxr", tmp_path / "study", seed=3, label="pneumonia", scale=0.5)
    files = sorted((tmp_path / "study").glob("*.dcm"))
    for f in files:
        assert raw_store_file(node.scp.port, f) == 0
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    values = [str(first.PatientID), str(first.PatientName), str(first.AccessionNumber)]
    finding = {"label": "pneumonia", "probability": 0.87, "positive": True, "normal": False, "triage": True}
    result = {"model": "cxr", "version": "1.0.0", "findings": [finding], "outputs": []}
    with Session(node.engine) as s:
        job = add_job(
            s,
            key="cxr|series|x",
            state=JobState.DONE,
            model_id="cxr",
            study_uid=study.study_instance_uid,
            result=json.dumps(result),
            finished_at=utcnow(),
        )
    client = TestClient(node.web_app(), client=("127.0.0.9", 50000))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"/api/v1/jobs/{job.id}/feedback"
    assert (
        client.post(url, json={"label": "pneumonia", "verdict": "agree"}, headers=headers).status_code == 201
    )
    assert client.post(url, json={"label": "pneumonia", "verdict": "disagree", "comment": "atelectasis"},
                       headers=headers).status_code == 201  # fmt: skip
    assert (
        client.post(url, json={"label": "effusion", "verdict": "agree"}, headers=headers).status_code == 422
    )
    created, updated = _procedure_records(rsyslog, 2)
    time.sleep(0.5)  # a message for the refused verdict would show up now
    assert len(_procedure_records(rsyslog, 2)) == 2

    for root, action in ((created, "C"), (updated, "U")):
        ident = root.find("EventIdentification")
        assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == (action, "0")
        assert ident.find("EventID").get("originalText") == "Procedure Record"
        user, application = root.findall("ActiveParticipant")
        assert (user.get("UserID"), user.get("UserIsRequestor"), user.get("NetworkAccessPointID")) == (
            "dr-rad",
            "true",
            "127.0.0.9",
        )
        assert application.get("UserID") == "PACSNODE@feedback-test"
        assert application.get("AlternativeUserID") == "AETITLES=PACSNODE"
        assert application.find("RoleIDCode").get("csd-code") == m.ROLE_APPLICATION.code
        study_object, patient = root.findall("ParticipantObjectIdentification")
        assert study_object.get("ParticipantObjectID") == study.study_instance_uid
        assert study_object.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
        assert study_object.find(".//Accession").get("Number") == values[2]
        assert (patient.get("ParticipantObjectID"), patient.findtext("ParticipantObjectName")) == tuple(
            values[:2]
        )
        assert patient.get("ParticipantObjectTypeCodeRole") == "1"

    for record in caplog.records:  # the node's log: no patient identifiers, no audit XML
        text = record.getMessage()
        for value in values:
            assert value not in text, (record.name, text)
        assert "AuditMessage" not in text


def test_procedure_record_without_the_study_files_still_validates() -> None:
    """The study was pruned (or its file is unreadable): the message names no patient, and is still
    a valid message."""
    from node.audit.events import AuditTrail

    trail = AuditTrail.disabled()
    person = m.Participant(user_id="dr-rad", requestor=True, address="10.0.0.1")
    for sample, action in ((None, "C"), (Path("/nonexistent/file.dcm"), "U")):
        root = assert_valid(trail._feedback(person, "1.2.3.4", sample, action))
        assert root.find("EventIdentification").get("EventActionCode") == action
        assert root.findall("ParticipantObjectIdentification")[1].get("ParticipantObjectID") == "(none)"
