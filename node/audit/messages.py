"""DICOM audit messages (PS3.15 Annex A.5): XML built from plain values, one builder per event.

The messages follow the DICOM Audit Message Schema (A.5.1, RELAX NG; a transcription lives in
``tests/audit/dicom-audit.rng`` and every message the node builds is validated against it in
tests) and the event-specific restrictions of A.5.3. They DO carry patient identifiers (the
patient's ID and name, the Study Instance UID): that is their purpose. They go to the audit
repository only (:mod:`node.audit.syslog`), never to the node's ordinary log.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum


class Outcome(IntEnum):
    """EventOutcomeIndicator (A.5.2)."""

    SUCCESS = 0
    MINOR_FAILURE = 4  # action restarted, e.g. an invalid password on a first try
    SERIOUS_FAILURE = 8  # action terminated
    MAJOR_FAILURE = 12  # the reporting application is now unavailable


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value (csd-code, codeSystemName, originalText: the schema's CodedValueType)."""

    code: str
    system: str
    meaning: str

    def put(self, element: ET.Element) -> ET.Element:
        """Write this code's attributes on ``element``; return it."""
        element.set("csd-code", self.code)
        element.set("codeSystemName", self.system)
        element.set("originalText", self.meaning)
        return element


# Event IDs (DCM, PS3.16 CID 400) and event types (CID 401)
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
PROCEDURE_RECORD = Code("110111", "DCM", "Procedure Record")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
# Active participant roles (CID 402)
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
# Participant object ID types (A.5.1.2.4 and CID 404)
ID_PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
ID_STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
ID_NODE = Code("110182", "DCM", "Node ID")

# NetworkAccessPointTypeCode
NAP_MACHINE_NAME = "1"
NAP_IP_ADDRESS = "2"


def aetitles(*titles: str) -> str:
    """The AlternativeUserID of a DICOM application (A.5.2.2): ``AETITLES=AE1;AE2``."""
    return "AETITLES=" + ";".join(t.strip() for t in titles if t.strip())


def address_type(address: str) -> str:
    """NetworkAccessPointTypeCode for an address: 2 (IP address) or 1 (machine name)."""
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return NAP_MACHINE_NAME
    return NAP_IP_ADDRESS


@dataclass(frozen=True, slots=True)
class Participant:
    """An ActiveParticipant: a user, a process or a node taking part in the event."""

    user_id: str
    requestor: bool
    roles: tuple[Code, ...] = ()
    alternative_user_id: str = ""
    user_name: str = ""
    address: str = ""  # NetworkAccessPointID (IP address or host name)


@dataclass(frozen=True, slots=True)
class AuditSource:
    """AuditSourceIdentification: who reports (A.5.2: the node's configured source ID)."""

    source_id: str
    enterprise_site_id: str = ""
    type_code: str = "4"  # Application Server process tier in a multi-tier system


@dataclass(frozen=True, slots=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: a patient, a study, a node."""

    object_id: str
    id_type: Code
    name: str  # ParticipantObjectName (the schema wants a name or a query)
    type_code: str = ""  # 1 person, 2 system object, 3 organization, 4 other
    role: str = ""  # 1 patient, 3 report, ...
    lifecycle: str = ""  # ParticipantObjectDataLifeCycle
    sop_classes: Mapping[str, int] = field(default_factory=dict)  # SOP Class UID -> instances
    accession_numbers: tuple[str, ...] = ()


def patient(patient_id: str, patient_name: str) -> ParticipantObject:
    """The patient of a study (A.5.3: Patient, type 1 person, role 1 patient, ID type 2)."""
    return ParticipantObject(
        object_id=patient_id or "(none)",
        id_type=ID_PATIENT_NUMBER,
        name=patient_name,
        type_code="1",
        role="1",
    )


def study(
    study_uid: str,
    sop_classes: Mapping[str, int],
    accession_numbers: Sequence[str] = (),
    lifecycle: str = "",
) -> ParticipantObject:
    """A study with the instances per SOP class (type 2 system object, role 3 report)."""
    return ParticipantObject(
        object_id=study_uid,
        id_type=ID_STUDY_INSTANCE_UID,
        name=study_uid,
        type_code="2",
        role="3",
        lifecycle=lifecycle,
        sop_classes=dict(sop_classes),
        accession_numbers=tuple(a for a in accession_numbers if a),
    )


def event_datetime(when: datetime | None = None) -> str:
    """EventDateTime: UTC with the zone, milliseconds (A.5.2.5, xsd:dateTime)."""
    moment = (when or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _token(text: str) -> str:
    """An xsd:token value: no leading, trailing or repeated whitespace, no control characters."""
    cleaned = "".join(c if c.isprintable() else " " for c in str(text))
    return " ".join(cleaned.split())


def _participant(root: ET.Element, p: Participant) -> None:
    element = ET.SubElement(root, "ActiveParticipant")
    element.set("UserID", _token(p.user_id) or "(unknown)")
    if p.alternative_user_id:
        element.set("AlternativeUserID", _token(p.alternative_user_id))
    if p.user_name:
        element.set("UserName", _token(p.user_name))
    element.set("UserIsRequestor", "true" if p.requestor else "false")
    if p.address:
        element.set("NetworkAccessPointID", _token(p.address))
        element.set("NetworkAccessPointTypeCode", address_type(p.address))
    for role in p.roles:
        role.put(ET.SubElement(element, "RoleIDCode"))


def _object(root: ET.Element, o: ParticipantObject) -> None:
    element = ET.SubElement(root, "ParticipantObjectIdentification")
    element.set("ParticipantObjectID", _token(o.object_id) or "(none)")
    if o.type_code:
        element.set("ParticipantObjectTypeCode", o.type_code)
    if o.role:
        element.set("ParticipantObjectTypeCodeRole", o.role)
    if o.lifecycle:
        element.set("ParticipantObjectDataLifeCycle", o.lifecycle)
    o.id_type.put(ET.SubElement(element, "ParticipantObjectIDTypeCode"))
    ET.SubElement(element, "ParticipantObjectName").text = _token(o.name) or "(none)"
    if o.sop_classes or o.accession_numbers:
        description = ET.SubElement(element, "ParticipantObjectDescription")
        for number in o.accession_numbers:
            ET.SubElement(description, "Accession").set("Number", _token(number))
        for uid, count in sorted(o.sop_classes.items()):
            sop = ET.SubElement(description, "SOPClass")
            sop.set("UID", _token(uid))
            sop.set("NumberOfInstances", str(int(count)))


def build(
    event: Code,
    outcome: Outcome,
    participants: Sequence[Participant],
    source: AuditSource,
    objects: Sequence[ParticipantObject] = (),
    *,
    action: str = "",
    event_types: Sequence[Code] = (),
    outcome_description: str = "",
    when: datetime | None = None,
) -> bytes:
    """One AuditMessage as UTF-8 XML (one line: syslog collectors keep it as one record)."""
    if not participants:
        raise ValueError("an audit message needs at least one active participant")
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification")
    if action:
        ident.set("EventActionCode", action)
    ident.set("EventDateTime", event_datetime(when))
    ident.set("EventOutcomeIndicator", str(int(outcome)))
    event.put(ET.SubElement(ident, "EventID"))
    for event_type in event_types:
        event_type.put(ET.SubElement(ident, "EventTypeCode"))
    if outcome_description:
        ET.SubElement(ident, "EventOutcomeDescription").text = outcome_description
    for p in participants:
        _participant(root, p)
    src = ET.SubElement(root, "AuditSourceIdentification")
    if source.enterprise_site_id:
        src.set("AuditEnterpriseSiteID", _token(source.enterprise_site_id))
    src.set("AuditSourceID", _token(source.source_id))
    ET.SubElement(src, "AuditSourceTypeCode").set("csd-code", source.type_code)
    for o in objects:
        _object(root, o)
    return b'<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(
        root, encoding="utf-8", xml_declaration=False
    )


# --- the events (A.5.3) -------------------------------------------------------------------------


def application_activity(
    started: bool,
    application: Participant,
    source: AuditSource,
    launcher: Participant | None = None,
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
    when: datetime | None = None,
) -> bytes:
    """Application Activity (A.5.3.1): the node started or stopped."""
    participants = [application] + ([launcher] if launcher is not None else [])
    return build(
        APPLICATION_ACTIVITY,
        outcome,
        participants,
        source,
        action="E",
        event_types=[APPLICATION_START if started else APPLICATION_STOP],
        outcome_description=outcome_description,
        when=when,
    )


def instances_transferred(
    action: str,
    sender: Participant,
    receiver: Participant,
    source: AuditSource,
    studies: Sequence[ParticipantObject],
    the_patient: ParticipantObject,
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
    when: datetime | None = None,
) -> bytes:
    """DICOM Instances Transferred (A.5.3.4): ``action`` C when the node received (created)
    them, R when it sent them (read) to a destination. One patient per message."""
    if action not in ("C", "R", "U"):
        raise ValueError("DICOM Instances Transferred: the action is C, R or U")
    return build(
        INSTANCES_TRANSFERRED,
        outcome,
        [sender, receiver],
        source,
        [*studies, the_patient],
        action=action,
        outcome_description=outcome_description,
        when=when,
    )


def user_authentication(
    login: bool,
    user: Participant,
    authenticator: Participant,
    source: AuditSource,
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
    when: datetime | None = None,
) -> bytes:
    """User Authentication (A.5.3.13): a login or logout, succeeded or not."""
    return build(
        USER_AUTHENTICATION,
        outcome,
        [user, authenticator],
        source,
        action="E",
        event_types=[LOGIN if login else LOGOUT],
        outcome_description=outcome_description,
        when=when,
    )


def security_alert(
    alert: Code,
    reporter: Participant,
    source: AuditSource,
    subjects: Sequence[ParticipantObject],
    performer: Participant | None = None,
    outcome: Outcome = Outcome.MINOR_FAILURE,
    outcome_description: str = "",
    when: datetime | None = None,
) -> bytes:
    """Security Alert (A.5.3.11), e.g. Node Authentication: an association refused by the
    allow-list (outcome 4: the node refused it and goes on)."""
    participants = [reporter] + ([performer] if performer is not None else [])
    return build(
        SECURITY_ALERT,
        outcome,
        participants,
        source,
        subjects,
        action="E",
        event_types=[alert],
        outcome_description=outcome_description,
        when=when,
    )


def procedure_record(
    action: str,
    user: Participant,
    application: Participant,
    source: AuditSource,
    studies: Sequence[ParticipantObject],
    the_patient: ParticipantObject,
    outcome: Outcome = Outcome.SUCCESS,
    outcome_description: str = "",
    when: datetime | None = None,
) -> bytes:
    """Procedure Record (A.5.3, DCM 110111): a record about the procedure created (C) or updated
    (U). The node sends it for a radiologist's feedback on a finding of the study's analysis
    (PS3.15 has no event of its own for that). The user is the requestor; one patient per message."""
    if action not in ("C", "R", "U", "D"):
        raise ValueError("Procedure Record: the action is C, R, U or D")
    return build(
        PROCEDURE_RECORD,
        outcome,
        [user, application],
        source,
        [*studies, the_patient],
        action=action,
        outcome_description=outcome_description,
        when=when,
    )
