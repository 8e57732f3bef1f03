"""One study's life audited into a real rsyslog on loopback (UDP and TCP; TLS with client
certificates through rsyslog's gtls driver): node start, an association refused by the allow-list,
the study received from DCMTK storescu, its results exported to DCMTK storescp, a failed and a good
sign-in, sign-out, node stop. Every message is an RFC 5424 record that rsyslog parsed (PRI 85,
APP-NAME, MSGID DICOM+RFC3881) whose MSG validates against the DICOM audit message schema; none
of the patient's identifiers reach the node's own log."""

from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pynetdicom import AE
from sqlmodel import Session, select

from node.app import Node, build_node
from node.settings import load_settings
from node.store.tables import OutboxItem, OutboxState
from node.synth import generate_study
from node.web.auth import hash_token
from tests.audit.conftest import Received, Rsyslog, assert_valid
from tests.helpers import REPO, StoreSCP, free_port, need, write_config

TOKEN = "audit-admin-token"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _models(folder: Path) -> Path:
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "cxr").symlink_to(REPO / "models" / "onnx" / "cxr")
    return models


def _event(r: Received) -> tuple[str, str, str]:
    """(EventID, first EventTypeCode or '', EventActionCode) of a received message."""
    root = assert_valid(r.xml)
    ident = root.find("EventIdentification")
    kind = ident.find("EventTypeCode")
    return (
        ident.find("EventID").get("originalText"),
        kind.get("originalText") if kind is not None else "",
        (ident.get("EventActionCode") or ""),
    )


def _wait_sent(node: Node, timeout: float = 120.0) -> list[OutboxItem]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(node.engine) as s:
            items = list(s.exec(select(OutboxItem)))
        if items and all(i.state == OutboxState.SENT for i in items):
            return items
        if any(i.state == OutboxState.FAILED for i in items):
            raise AssertionError([i.last_error for i in items])
        time.sleep(0.2)
    raise TimeoutError("outputs not sent")


def _login_logout(node: Node) -> None:
    client = TestClient(node.web_app(), client=("127.0.0.7", 50000), follow_redirects=False)
    csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore[union-attr]
    assert (
        client.post("/login", data={"token": "wrong", "csrf": csrf}).headers["location"] == "/login?error=1"
    )
    assert client.post("/login", data={"token": TOKEN, "csrf": csrf}).status_code == 303
    assert client.post("/logout", data={"csrf": csrf}).status_code == 303


def _life(folder: Path, audit: dict, caplog: pytest.LogCaptureFixture) -> tuple[list[str], object, Node]:
    """Run the study's life; returns (patient values, study truth, node)."""
    storescu = need("storescu")
    dest_port = free_port()
    dest = StoreSCP(folder / "dest", dest_port)
    config = write_config(
        folder,
        dicom={"allowed_calling_aets": ["MODALITY"]},
        models={"directory": str(_models(folder)), "providers": ["CPUExecutionProvider"]},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "DEST",
                "host": "127.0.0.1",
                "port": dest_port,
                "parametric_map": False,
            }
        ],
        outputs={"send_to": "all"},
        web={"tokens": [{"name": "it-admin", "sha256": hash_token(TOKEN), "role": "admin"}]},
        audit={"enabled": True, "host": "127.0.0.1", "source_id": "PACSNODE@audit-test", **audit},
    )
    caplog.set_level(logging.DEBUG)
    node = build_node(load_settings(config))
    node.start()
    try:
        truth = generate_study("cxr", folder / "study", seed=11, label="pneumonia", scale=0.5)
        files = sorted((folder / "study").glob("*.dcm"))
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        values = [str(first.PatientID), str(first.PatientName), str(first.AccessionNumber)]
        evil = AE(ae_title="EVIL")
        evil.add_requested_context(CT_IMAGE)
        assert not evil.associate("127.0.0.1", node.scp.port, ae_title="PACSNODE").is_established
        subprocess.run(
            [
                storescu,
                "-aet",
                "MODALITY",
                "-aec",
                "PACSNODE",
                "127.0.0.1",
                str(node.scp.port),
                *map(str, files),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        _wait_sent(node)
        _login_logout(node)
    finally:
        node.stop()
        dest.stop()
    return values, truth, node


def _check(
    rs: Rsyslog, values: list[str], truth: object, caplog: pytest.LogCaptureFixture, inputs: set[str]
) -> None:
    got = rs.wait(8)
    time.sleep(0.5)  # anything more would show up now
    got = rs.messages()
    for r in got:
        assert (r.pri, r.version, r.app_name, r.msgid, r.sd) == ("85", "1", "pacs-node", "DICOM+RFC3881", "-")
        assert r.msg.startswith("\ufeff<?xml")
    assert {r.input for r in got} == inputs
    events = [_event(r) for r in got]
    assert events[0] == ("Application Activity", "Application Start", "E")
    assert events[-1] == ("Application Activity", "Application Stop", "E")
    by_kind: dict[tuple[str, str, str], list[Received]] = {}
    for event, r in zip(events, got, strict=True):
        by_kind.setdefault(event, []).append(r)
    (alert,) = by_kind[("Security Alert", "Node Authentication", "E")]
    alert_root = assert_valid(alert.xml)
    assert alert_root.find("EventIdentification").get("EventOutcomeIndicator") == "4"
    assert alert_root.find("ParticipantObjectIdentification").findtext("ParticipantObjectName") == "EVIL"

    (received,) = by_kind[("DICOM Instances Transferred", "", "C")]  # one study, one association
    root = assert_valid(received.xml)
    source, destination = root.findall("ActiveParticipant")
    assert (source.get("UserID"), source.get("UserIsRequestor"), source.get("NetworkAccessPointID")) == (
        "MODALITY",
        "true",
        "127.0.0.1",
    )
    assert source.find("RoleIDCode").get("csd-code") == "110153"
    assert destination.get("AlternativeUserID") == "AETITLES=PACSNODE"
    assert destination.find("RoleIDCode").get("csd-code") == "110152"
    study, patient = root.findall("ParticipantObjectIdentification")
    assert study.get("ParticipantObjectID") == truth.study_instance_uid  # type: ignore[attr-defined]
    assert sum(int(s.get("NumberOfInstances")) for s in study.iter("SOPClass")) == len(
        list(rs.out.parent.parent.glob("study/*.dcm"))
    )
    assert (patient.get("ParticipantObjectID"), patient.findtext("ParticipantObjectName")) == tuple(
        values[:2]
    )
    assert root.find(".//Accession").get("Number") == values[2]

    exported = by_kind[("DICOM Instances Transferred", "", "R")]
    exported_studies = set()
    for r in exported:
        root = assert_valid(r.xml)
        assert root.find("EventIdentification").get("EventOutcomeIndicator") == "0"
        sender, receiver = root.findall("ActiveParticipant")
        assert (
            sender.get("UserIsRequestor") == "true" and sender.find("RoleIDCode").get("csd-code") == "110153"
        )
        assert receiver.get("UserID") == "DEST" and receiver.find("RoleIDCode").get("csd-code") == "110152"
        study, patient = root.findall("ParticipantObjectIdentification")
        exported_studies.add(study.get("ParticipantObjectID"))
        assert patient.get("ParticipantObjectID") == values[0]
    assert exported_studies == {truth.study_instance_uid}  # type: ignore[attr-defined]

    logins = [assert_valid(r.xml) for r in by_kind[("User Authentication", "Login", "E")]]
    outcomes = sorted(
        (
            x.find("EventIdentification").get("EventOutcomeIndicator"),
            x.find("ActiveParticipant").get("UserID"),
        )
        for x in logins
    )
    assert outcomes == [("0", "it-admin"), ("4", "(unknown)")]
    assert logins[0].find("ActiveParticipant").get("NetworkAccessPointID") == "127.0.0.7"
    (logout,) = by_kind[("User Authentication", "Logout", "E")]
    assert assert_valid(logout.xml).find("ActiveParticipant").get("UserID") == "it-admin"

    # the node's own log carries none of the patient's identifiers (nor the audit XML)
    for record in caplog.records:
        text = record.getMessage()
        for value in values:
            assert value not in text, (record.name, text)
        assert "AuditMessage" not in text


@pytest.mark.timeout(300)
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_study_life_audited_over_udp_and_tcp(
    transport: str, rsyslog: Rsyslog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = rsyslog.udp if transport == "udp" else rsyslog.tcp
    values, truth, _ = _life(tmp_path, {"transport": transport, "port": port}, caplog)
    _check(rsyslog, values, truth, caplog, {"imudp" if transport == "udp" else "imtcp"})


@pytest.mark.timeout(300)
def test_study_life_audited_over_tls(
    rsyslog_tls: Rsyslog, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 5425 over TLS to rsyslog's gtls driver, which requires the node's client certificate."""
    certs = rsyslog_tls.certs
    assert certs is not None
    audit = {
        "transport": "tls",
        "port": rsyslog_tls.tls,
        "tls_ca_file": str(certs.ca),
        "tls_cert_file": str(certs.client_cert),
        "tls_key_file": str(certs.client_key),
        "tls_server_name": "localhost",
    }
    values, truth, _ = _life(tmp_path, audit, caplog)
    _check(rsyslog_tls, values, truth, caplog, {"imtcp"})
