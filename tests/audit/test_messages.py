"""Audit messages against the DICOM audit message schema (PS3.15 A.5.1), the RFC 5424 header and
RFC 5425 framing, the settings, and a sender that keeps messages while the repository is away."""

from __future__ import annotations

import socket
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from node.audit import AuditTrail, build_audit
from node.audit import messages as m
from node.audit.syslog import BOM, SyslogSender, format_message, octet_counted
from node.errors import ConfigError
from node.settings import load_settings
from tests.audit.conftest import assert_valid, validator
from tests.helpers import free_port

SOURCE = m.AuditSource("PACSNODE@node.example", "HOSPITAL")
NODE = m.Participant(
    "PACSNODE@node.example", False, (m.ROLE_DESTINATION,), m.aetitles("PACSNODE"), "", "10.1.2.3"
)
PEER = m.Participant("MODALITY", True, (m.ROLE_SOURCE,), m.aetitles("MODALITY"), "", "192.0.2.7")
STUDY = m.study("1.2.3.4", {"1.2.840.10008.5.1.4.1.1.2": 3, "1.2.840.10008.5.1.4.1.1.7": 1}, ["ACC1"])
PATIENT = m.patient("PID-1", "Doe^Jane")


def _event(root: object) -> dict[str, str]:
    return dict(root.find("EventIdentification").attrib)  # type: ignore[attr-defined]


def test_application_activity_start_and_stop() -> None:
    for started, code in ((True, "110120"), (False, "110121")):
        xml = m.application_activity(started, NODE, SOURCE, m.Participant("pacsnode", True))
        root = assert_valid(xml)
        assert root.find("EventIdentification/EventID").get("csd-code") == "110100"
        assert root.find("EventIdentification/EventTypeCode").get("csd-code") == code
        assert _event(root)["EventActionCode"] == "E"


@pytest.mark.parametrize("action", ["C", "R"])
def test_instances_transferred(action: str) -> None:
    xml = m.instances_transferred(action, PEER, NODE, SOURCE, [STUDY], PATIENT)
    root = assert_valid(xml)
    assert _event(root) | {"EventDateTime": ""} == {
        "EventActionCode": action,
        "EventDateTime": "",
        "EventOutcomeIndicator": "0",
    }
    objects = root.findall("ParticipantObjectIdentification")
    assert [o.get("ParticipantObjectID") for o in objects] == ["1.2.3.4", "PID-1"]
    assert objects[1].findtext("ParticipantObjectName") == "Doe^Jane"
    classes = {s.get("UID"): s.get("NumberOfInstances") for s in objects[0].iter("SOPClass")}
    assert classes == {"1.2.840.10008.5.1.4.1.1.2": "3", "1.2.840.10008.5.1.4.1.1.7": "1"}
    assert objects[0].find(".//Accession").get("Number") == "ACC1"


@pytest.mark.parametrize("outcome", list(m.Outcome))
def test_every_outcome_indicator_validates(outcome: m.Outcome) -> None:
    xml = m.user_authentication(True, m.Participant("it", True, address="::1"), NODE, SOURCE, outcome, "why")
    root = assert_valid(xml)
    assert _event(root)["EventOutcomeIndicator"] == str(int(outcome))
    assert root.findtext("EventIdentification/EventOutcomeDescription") == "why"


def test_user_authentication_and_security_alert() -> None:
    logout = assert_valid(m.user_authentication(False, m.Participant("it", True), NODE, SOURCE))
    assert logout.find("EventIdentification/EventTypeCode").get("originalText") == "Logout"
    subject = m.ParticipantObject("EVIL@192.0.2.9", m.ID_NODE, "EVIL", type_code="2")
    alert = assert_valid(m.security_alert(m.NODE_AUTHENTICATION, NODE, SOURCE, [subject], PEER))
    assert alert.find("EventIdentification/EventID").get("csd-code") == "110113"
    assert _event(alert)["EventOutcomeIndicator"] == "4"


def test_the_schema_refuses_what_the_standard_refuses() -> None:
    """The validator is not a rubber stamp: an unknown outcome, a missing source, a participant
    object with neither name nor query are refused."""
    from lxml import etree

    schema = validator()
    good = m.instances_transferred("C", PEER, NODE, SOURCE, [STUDY], PATIENT)
    assert schema.validate(etree.fromstring(good))  # type: ignore[attr-defined]
    bad_outcome = good.replace(b'EventOutcomeIndicator="0"', b'EventOutcomeIndicator="3"')
    no_source = etree.fromstring(good)
    no_source.remove(no_source.find("AuditSourceIdentification"))
    no_name = etree.fromstring(good)
    for name in no_name.iter("ParticipantObjectName"):
        name.getparent().remove(name)
    for doc in (etree.fromstring(bad_outcome), no_source, no_name):
        assert not schema.validate(doc)  # type: ignore[attr-defined]


def test_values_are_tokens_and_escaped() -> None:
    odd = m.patient("PID\t<1>&", "Doe^Jane\n<script>")
    root = assert_valid(m.instances_transferred("C", PEER, NODE, SOURCE, [STUDY], odd))
    patient = root.findall("ParticipantObjectIdentification")[1]
    assert patient.get("ParticipantObjectID") == "PID <1>&"
    assert patient.findtext("ParticipantObjectName") == "Doe^Jane <script>"


def test_event_datetime_is_utc_with_zone() -> None:
    when = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    assert m.event_datetime(when) == "2026-03-04T05:06:07.891Z"


def test_rfc5424_header_and_rfc5425_framing() -> None:
    when = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    msg = format_message(
        b"<x/>", app_name="pacs-node", msgid="DICOM+RFC3881", hostname="h", procid="42", when=when
    )
    assert msg == b"<85>1 2026-03-04T05:06:07.000Z h pacs-node 42 DICOM+RFC3881 - " + BOM + b"<x/>"
    spaced = format_message(b"", app_name="pacs node", msgid="", hostname="", procid="")
    assert spaced.split(b" ")[2:7] == [b"-", b"pacsnode", b"-", b"-", b"-"]
    assert octet_counted(b"abc def") == b"7 abc def"
    assert octet_counted("é".encode()) == b"2 \xc3\xa9"  # octets, not characters


def test_settings_defaults_and_checks(tmp_path: Path) -> None:
    settings = load_settings(None)
    assert settings.audit.enabled is False
    assert not build_audit(settings).enabled
    AuditTrail.disabled().instance_received(object(), "1.2", "1.2.3", tmp_path)  # a no-op
    with pytest.raises(ConfigError, match="tls_cert_file"):
        load_settings(None, audit={"enabled": True, "tls_cert_file": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError, match="transport"):
        load_settings(None, audit={"transport": "http"})
    enabled = build_audit(
        load_settings(None, audit={"enabled": True, "transport": "udp", "source_id": "SRC"})
    )
    assert enabled.enabled and enabled.source.source_id == "SRC" and enabled.sender is not None
    assert enabled.sender.port == 514


def test_sender_keeps_messages_until_the_repository_answers() -> None:
    """TCP: nothing listens at first; the message is kept and delivered once a server is up."""
    port = free_port()
    sender = SyslogSender("127.0.0.1", port, "tcp", hostname="h", retry_max_s=0.3)
    sender.start()
    sender.submit(b"<first/>")
    sender.submit(lambda: b"<second/>")
    assert not sender.flush(0.5)  # nobody listens yet
    got = bytearray()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                while got.count(b"/>") < 2:
                    got.extend(conn.recv(65536))

        thread = threading.Thread(target=accept)
        thread.start()
        assert sender.flush(10)
        thread.join(10)
    sender.close(1)
    first, rest = bytes(got).split(b" ", 1)
    assert int(first) == rest.index(b"<first/>") + len(b"<first/>")
    assert b"<second/>" in rest and sender.sent == 2


def test_a_full_queue_drops_the_oldest_and_a_bad_builder_is_skipped() -> None:
    sender = SyslogSender("127.0.0.1", 9, "udp", queue_size=10)
    for i in range(12):
        sender.submit(f"<m{i}/>".encode())
    assert sender.dropped == 2 and len(sender._queue) == 10

    def broken() -> bytes:
        raise ValueError("PID-SECRET")

    assert sender._body(broken) is None and sender.failed == 1


class _Collect:
    """A sender stand-in: builders run at once, bodies kept."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def submit(self, item: object) -> None:
        body = item() if callable(item) else item
        if body is not None:
            self.bodies.append(body)  # type: ignore[arg-type]


def test_results_exported_outcomes_per_batch_and_messages_kinds_skipped(tmp_path: Path) -> None:
    """One message per patient of a batch: 0 all taken, 4 some refused, 8 none; a file that is
    not DICOM still gives a valid message; HL7/FHIR destinations are not wrapped."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from node.send import Delivery, OutgoingFile
    from node.settings import DestinationSettings

    def sr(name: str, patient_id: str) -> Path:
        ds = pydicom.Dataset()
        ds.PatientID, ds.PatientName, ds.StudyInstanceUID = patient_id, "Doe^Jane", "1.2.3"
        ds.AccessionNumber, ds.SOPClassUID, ds.SOPInstanceUID = (
            "ACC9",
            "1.2.840.10008.5.1.4.1.1.88.34",
            generate_uid(),
        )
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            ds.SOPClassUID,
            ds.SOPInstanceUID,
        )
        path = tmp_path / name
        ds.save_as(path, enforce_file_format=True)
        return path

    collect = _Collect()
    trail = AuditTrail(collect, "SRC", "PACSNODE")  # type: ignore[arg-type]
    dest = DestinationSettings(name="pacs", ae_title="PACS", host="10.0.0.9", port=104)
    files = [OutgoingFile(sr(f"{i}.dcm", "P1"), "1.2.840.10008.5.1.4.1.1.88.34", "") for i in range(2)]
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    for oks, expected in (((True, True), "0"), ((True, False), "4"), ((False, False), "8")):
        collect.bodies.clear()
        trail.results_exported(dest, files, [Delivery(f.path, ok) for f, ok in zip(files, oks, strict=True)])
        (body,) = collect.bodies
        root = assert_valid(body)
        assert root.find("EventIdentification").get("EventOutcomeIndicator") == expected
        assert root.find("EventIdentification").get("EventActionCode") == "R"
        receiver = root.findall("ActiveParticipant")[1]
        assert (receiver.get("UserID"), receiver.get("NetworkAccessPointID")) == ("PACS", "10.0.0.9")
    collect.bodies.clear()
    trail.results_exported(dest, [OutgoingFile(junk, "1.2.3", "")], [Delivery(junk, True)])
    assert_valid(collect.bodies[0])
    hl7 = DestinationSettings(name="ris", kind="hl7", host="ris", port=2575)
    inner = type("Inner", (), {"name": "x"})()
    assert trail.wrap(hl7, inner) is inner  # type: ignore[arg-type]
    assert trail.wrap(dest, inner) is not inner  # type: ignore[arg-type]
    assert AuditTrail.disabled().wrap(dest, inner) is inner  # type: ignore[arg-type]
