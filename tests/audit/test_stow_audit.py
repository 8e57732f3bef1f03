"""Instances received over STOW-RS are audited like those of a C-STORE association (issue 18's
audit list): per study of a request, one DICOM Instances Transferred (C) message to a real rsyslog
on loopback, the HTTP client (its token's name, its address) as the requestor and source, the
node as destination, the study with its instances per SOP class, the patient read from the
stored file; outcome 0 when everything was stored, 4 when some of the study's instances were
refused, 8 when none was. Every message validates against the DICOM audit message schema; the
node's log holds none of the patient's identifiers."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.audit.conftest import Rsyslog, assert_valid
from tests.helpers import make_series
from tests.web.test_dicomweb import ADMIN, RELATED, TOKENS, _serve, body

pytestmark = pytest.mark.timeout(120)


def _transferred(rs: Rsyslog, count: int, timeout: float = 15.0) -> list:
    """The first ``count`` DICOM Instances Transferred messages (validated), in arrival order."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            root
            for root in (assert_valid(r.xml) for r in rs.messages())
            if root.find("EventIdentification/EventID").get("csd-code") == "110104"
        ]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise TimeoutError(f"{count} DICOM Instances Transferred messages did not arrive")


def _study_of(root) -> tuple:  # noqa: ANN001 - an lxml element
    study, patient = root.findall("ParticipantObjectIdentification")
    return study, patient


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_stow_rs_instances_are_audited(
    transport: str, rsyslog: Rsyslog, make_node, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:  # noqa: ANN001
    caplog.set_level(logging.DEBUG)
    node = make_node(
        web={"tokens": TOKENS},
        storage={"duplicates": "refuse"},
        audit={
            "enabled": True,
            "host": "127.0.0.1",
            "port": rsyslog.udp if transport == "udp" else rsyslog.tcp,
            "transport": transport,
            "source_id": "PACSNODE@stow-test",
        },
    )
    ours = make_series(tmp_path / "a", 3)
    for path in ours:  # CT_small has no accession number
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = "ACC-STOW-77"
        ds.save_as(path)
    (theirs,) = make_series(tmp_path / "b", 1)
    first = pydicom.dcmread(ours[0], stop_before_pixels=True)
    other = pydicom.dcmread(theirs, stop_before_pixels=True)
    values = [str(first.PatientID), str(first.PatientName), str(first.AccessionNumber)]
    assert all(values)
    headers = {"Content-Type": RELATED, "Authorization": f"Bearer {ADMIN}"}
    changed = pydicom.dcmread(ours[0])
    changed.SeriesDescription = "other content, same SOP Instance UID"  # refused: duplicates refuse
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)

    for url in _serve(node):
        # request 1: two of study A stored, one of study B refused (A900: not the path's study),
        # and a part that is no DICOM file (no study to name: not audited)
        one = httpx.post(
            f"{url}/dicomweb/studies/{first.StudyInstanceUID}",
            content=body(ours[0].read_bytes(), ours[1].read_bytes(), theirs.read_bytes(), b"not dicom"),
            headers=headers,
        )
        assert one.status_code == 202, one.text
        a_ok, b_refused = _transferred(rsyslog, 2)
        # request 2: one more of study A stored, the changed copy of A's first refused (0111)
        two = httpx.post(
            f"{url}/dicomweb/studies",
            content=body(ours[2].read_bytes(), changed_path.read_bytes()),
            headers=headers,
        )
        assert two.status_code == 202, two.text
        a_partly = _transferred(rsyslog, 3)[2]
    time.sleep(0.5)  # a message for the part without a study would show up now
    assert len(_transferred(rsyslog, 3)) == 3

    expected = {  # root -> (study, outcome, instances stored, description)
        0: (a_ok, first.StudyInstanceUID, "0", 2, ""),
        1: (b_refused, other.StudyInstanceUID, "8", 0, "1 of 1 instances refused"),
        2: (a_partly, first.StudyInstanceUID, "4", 1, "1 of 2 instances refused"),
    }
    for root, study_uid, outcome, stored, description in expected.values():
        ident = root.find("EventIdentification")
        assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("C", outcome)
        assert (ident.findtext("EventOutcomeDescription") or "") == description
        source, destination = root.findall("ActiveParticipant")
        assert (source.get("UserID"), source.get("UserIsRequestor"), source.get("NetworkAccessPointID")) == (
            "pacs",  # the admin token's name
            "true",
            "127.0.0.1",
        )
        assert source.find("RoleIDCode").get("originalText") == "Source Role ID"
        assert destination.get("UserID") == "PACSNODE@stow-test"
        assert destination.get("UserIsRequestor") == "false"
        assert destination.find("RoleIDCode").get("originalText") == "Destination Role ID"
        study, patient = _study_of(root)
        assert study.get("ParticipantObjectID") == study_uid
        assert sum(int(s.get("NumberOfInstances")) for s in study.iter("SOPClass")) == stored
        if stored:
            assert {s.get("UID") for s in study.iter("SOPClass")} == {str(first.SOPClassUID)}
            assert study.find(".//Accession").get("Number") == values[2]
            assert (patient.get("ParticipantObjectID"), patient.findtext("ParticipantObjectName")) == tuple(
                values[:2]
            )
        else:  # nothing of the study was stored: no file to read the patient from
            assert patient.get("ParticipantObjectID") == "(none)"

    for record in caplog.records:  # the node's log: no patient identifiers, no audit XML
        text = record.getMessage()
        for value in values:
            assert value not in text, (record.name, text)
        assert "AuditMessage" not in text
