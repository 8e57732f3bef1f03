"""The node's audit events: one small API the hook points call (app start/stop, an association's
instances, a STOW-RS request's instances, an association refused, results exported, sign-in and
sign-out, feedback given).

Every method returns at once and never raises: the message is built and sent by the sender's
thread (:class:`node.audit.syslog.SyslogSender`). With ``audit.enabled`` false the methods do
nothing. What the messages hold (patient ID and name, study UIDs) never reaches the node's log.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.errors import InvalidDicomError

from node.audit import messages as m
from node.audit.syslog import SyslogSender

if TYPE_CHECKING:
    from node.send import Delivery, Destination, OutgoingFile
    from node.settings import AuditSettings, DestinationSettings, Settings

log = logging.getLogger(__name__)


def _read_patient(path: Path) -> tuple[str, str, str, str]:
    """(study UID, patient ID, patient name, accession number) of a Part 10 file."""
    import pydicom

    ds = pydicom.dcmread(
        path,
        stop_before_pixels=True,
        specific_tags=["StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"],
    )

    def text(keyword: str) -> str:
        try:
            return str(ds.get(keyword, "") or "").strip()
        except (TypeError, ValueError):
            return ""

    return text("StudyInstanceUID"), text("PatientID"), text("PatientName"), text("AccessionNumber")


def _destination_peer(destination: DestinationSettings) -> tuple[str, str]:
    """(UserID, network access point) of a destination: its AE title (C-STORE) or URL (STOW-RS),
    its host."""
    from urllib.parse import urlsplit

    url = getattr(destination, "url", None) or ""
    user = getattr(destination, "ae_title", None) or url or destination.name
    host = getattr(destination, "host", None) or (urlsplit(url).hostname if url else "") or ""
    return str(user), str(host)


@dataclass
class _StudyTally:
    """What one association brought of one study."""

    sop_classes: Counter[str] = field(default_factory=Counter)
    sample: Path | None = None  # one stored file of the study (its patient attributes)


@dataclass
class StowStudy:
    """What one STOW-RS request brought of one study: instances per SOP class (stored ones),
    how many were stored and refused, and where to find one stored file (called when the
    message is built)."""

    sop_classes: Counter[str] = field(default_factory=Counter)
    stored: int = 0
    refused: int = 0
    sample: Callable[[], Path | None] | None = None


@dataclass
class _AssociationTally:
    calling_aet: str
    address: str
    called_aet: str
    studies: dict[str, _StudyTally] = field(default_factory=dict)


class AuditTrail:
    """Builds and queues the node's audit messages; a disabled trail does nothing."""

    def __init__(
        self,
        sender: SyslogSender | None,
        source_id: str,
        ae_title: str,
        enterprise_site_id: str = "",
        host_address: str = "",
    ) -> None:
        self.sender = sender
        self.source = m.AuditSource(source_id, enterprise_site_id)
        self.ae_title = ae_title
        self.host_address = host_address or socket.gethostname()
        self._associations: weakref.WeakKeyDictionary[Any, _AssociationTally] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    @classmethod
    def disabled(cls) -> AuditTrail:
        """A trail that records nothing (``audit.enabled`` false)."""
        return cls(None, "pacs-node", "PACSNODE")

    @property
    def enabled(self) -> bool:
        """True when messages are sent."""
        return self.sender is not None

    def start(self) -> None:
        """Start the sender's thread."""
        if self.sender is not None:
            self.sender.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, then stop."""
        if self.sender is not None:
            self.sender.close(timeout_s)

    def open(self) -> None:
        """Start sending, beginning with Application Start (the node's start)."""
        self.start()
        self.application_started()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Application Stop, then send what is queued and stop (the node's stop)."""
        self.application_stopped()
        self.close(timeout_s)

    def _submit(self, build: Callable[[], bytes | None]) -> None:
        if self.sender is not None:
            self.sender.submit(build)

    # -- participants ------------------------------------------------------------------------

    def _node(self, requestor: bool, roles: tuple[m.Code, ...] = ()) -> m.Participant:
        """This node as an active participant (UserID: the audit source ID, its AE title)."""
        return m.Participant(
            user_id=self.source.source_id,
            requestor=requestor,
            roles=roles,
            alternative_user_id=m.aetitles(self.ae_title),
            address=self.host_address,
        )

    @staticmethod
    def _peer(aet: str, address: str, requestor: bool, role: m.Code) -> m.Participant:
        return m.Participant(
            user_id=aet.strip() or "(no AE title)",
            requestor=requestor,
            roles=(role,),
            alternative_user_id="" if "://" in aet else m.aetitles(aet),
            address=address,
        )

    # -- application activity ---------------------------------------------------------------

    def application_started(self) -> None:
        """Application Activity / Application Start."""
        launcher = self._launcher()
        self._submit(
            lambda: m.application_activity(
                True, self._node(False, (m.ROLE_APPLICATION,)), self.source, launcher
            )
        )

    def application_stopped(self) -> None:
        """Application Activity / Application Stop."""
        launcher = self._launcher()
        self._submit(
            lambda: m.application_activity(
                False, self._node(False, (m.ROLE_APPLICATION,)), self.source, launcher
            )
        )

    @staticmethod
    def _launcher() -> m.Participant:
        """Who started the node: the operating-system user of the process."""
        try:
            import pwd

            user = pwd.getpwuid(os.getuid()).pw_name
        except (ImportError, KeyError):
            user = str(os.getuid()) if hasattr(os, "getuid") else "(unknown)"
        return m.Participant(user_id=user, requestor=True, roles=(m.ROLE_APPLICATION_LAUNCHER,))

    # -- associations ----------------------------------------------------------------------

    def instance_received(self, assoc: Any, sop_class_uid: str, study_uid: str, path: Path) -> None:
        """One instance stored on ``assoc``: tallied per study, sent when the association ends."""
        if self.sender is None:
            return
        requestor = assoc.requestor
        with self._lock:
            tally = self._associations.get(assoc)
            if tally is None:
                tally = self._associations[assoc] = _AssociationTally(
                    str(requestor.ae_title), str(requestor.address), str(assoc.acceptor.ae_title)
                )
            study = tally.studies.setdefault(study_uid, _StudyTally())
            study.sop_classes[sop_class_uid] += 1
            if study.sample is None:
                study.sample = path

    def association_ended(self, assoc: Any) -> None:
        """The association closed: one DICOM Instances Transferred (C) per study it brought."""
        if self.sender is None:
            return
        with self._lock:
            tally = self._associations.pop(assoc, None)
        if tally is None or not tally.studies:
            return
        for study_uid, study in tally.studies.items():
            self._submit(lambda s=study_uid, t=study: self._received(tally, s, t))  # type: ignore[misc]

    def _received(self, tally: _AssociationTally, study_uid: str, study: _StudyTally) -> bytes:
        patient_id = patient_name = accession = ""
        if study.sample is not None:
            try:
                _, patient_id, patient_name, accession = _read_patient(study.sample)
            except (OSError, ValueError, InvalidDicomError) as exc:  # gone: the message still goes
                log.warning("audit: patient attributes unreadable (%s)", type(exc).__name__)
        return m.instances_transferred(
            "C",
            self._peer(tally.calling_aet, tally.address, True, m.ROLE_SOURCE),
            self._node(False, (m.ROLE_DESTINATION,)),
            self.source,
            [m.study(study_uid, study.sop_classes, [accession])],
            m.patient(patient_id, patient_name),
        )

    def stow_received(
        self,
        user: str,
        address: str,
        studies: Mapping[str, StowStudy],
    ) -> None:
        """One DICOM Instances Transferred (C) per study a STOW-RS request brought (PS3.15 A.5.3.4;
        the HTTP client, named by its token or ``STOW-RS``, is the source and requestor): outcome 0
        when every instance of the study was stored, 4 when some were refused, 8 when none was
        stored. ``sample`` of a study is called in the sender's thread for one stored file (its
        patient's ID and name, the accession number)."""
        if self.sender is None:
            return
        source = m.Participant(
            user_id=user.strip() or "(unknown)", requestor=True, roles=(m.ROLE_SOURCE,), address=address
        )
        for study_uid, study in studies.items():
            self._submit(lambda u=study_uid, s=study: self._stow(source, u, s))  # type: ignore[misc]

    def _stow(self, source: m.Participant, study_uid: str, study: StowStudy) -> bytes:
        patient_id = patient_name = accession = ""
        sample = study.sample() if study.sample is not None and study.stored else None
        if sample is not None:
            try:
                _, patient_id, patient_name, accession = _read_patient(sample)
            except (OSError, ValueError, InvalidDicomError) as exc:  # gone: the message still goes
                log.warning("audit: patient attributes unreadable (%s)", type(exc).__name__)
        if not study.refused:
            outcome, description = m.Outcome.SUCCESS, ""
        else:
            outcome = m.Outcome.MINOR_FAILURE if study.stored else m.Outcome.SERIOUS_FAILURE
            description = f"{study.refused} of {study.refused + study.stored} instances refused"
        return m.instances_transferred(
            "C",
            source,
            self._node(False, (m.ROLE_DESTINATION,)),
            self.source,
            [m.study(study_uid, study.sop_classes, [accession])],
            m.patient(patient_id, patient_name),
            outcome=outcome,
            outcome_description=description,
        )

    def association_refused(self, calling_aet: str, address: str, reason: str) -> None:
        """Security Alert / Node Authentication: an association refused by the allow-list."""
        subject = m.ParticipantObject(
            object_id=f"{calling_aet.strip() or '(no AE title)'}@{address}",
            id_type=m.ID_NODE,
            name=calling_aet.strip() or "(no AE title)",
            type_code="2",
        )
        performer = self._peer(calling_aet, address, True, m.ROLE_SOURCE)
        self._submit(
            lambda: m.security_alert(
                m.NODE_AUTHENTICATION,
                self._node(False),
                self.source,
                [subject],
                performer=performer,
                outcome=m.Outcome.MINOR_FAILURE,
                outcome_description=reason,
            )
        )

    # -- results -----------------------------------------------------------------------------

    def results_exported(
        self, destination: DestinationSettings, files: Sequence[OutgoingFile], outcomes: Sequence[Delivery]
    ) -> None:
        """DICOM Instances Transferred (R) to a destination: one per patient of the batch,
        outcome 0 when every file was taken, 4 when some were not, 8 when none was."""
        if self.sender is None or not files:
            return
        pairs = list(zip(files, outcomes, strict=False))
        self._submit(lambda: None if not pairs else self._exported(destination, pairs))

    def _exported(self, destination: DestinationSettings, pairs: list[tuple[OutgoingFile, Delivery]]) -> None:
        by_patient: dict[tuple[str, str], dict[str, Any]] = {}
        for outgoing, delivery in pairs:
            try:
                study_uid, patient_id, patient_name, accession = _read_patient(outgoing.path)
            except (OSError, ValueError, InvalidDicomError) as exc:
                log.warning("audit: an exported file is unreadable (%s)", type(exc).__name__)
                study_uid = patient_id = patient_name = accession = ""
            entry = by_patient.setdefault(
                (patient_id, patient_name), {"studies": {}, "ok": 0, "failed": 0, "accession": {}}
            )
            entry["studies"].setdefault(study_uid or "(unknown)", Counter())[outgoing.sop_class_uid] += 1
            entry["accession"].setdefault(study_uid or "(unknown)", accession)
            entry["ok" if delivery.ok else "failed"] += 1
        for (patient_id, patient_name), entry in by_patient.items():
            ok, failed = entry["ok"], entry["failed"]
            outcome = (
                m.Outcome.SUCCESS
                if not failed
                else m.Outcome.MINOR_FAILURE
                if ok
                else m.Outcome.SERIOUS_FAILURE
            )
            described = (
                "" if not failed else f"{failed} of {ok + failed} objects not accepted by the destination"
            )
            body = m.instances_transferred(
                "R",
                self._node(True, (m.ROLE_SOURCE,)),
                self._peer(*_destination_peer(destination), False, m.ROLE_DESTINATION),
                self.source,
                [
                    m.study(uid, classes, [entry["accession"][uid]])
                    for uid, classes in entry["studies"].items()
                ],
                m.patient(patient_id, patient_name),
                outcome=outcome,
                outcome_description=described,
            )
            assert self.sender is not None
            self.sender.submit(body)

    def wrap(self, settings: DestinationSettings, destination: Destination) -> Destination:
        """``destination`` with an audit message after each batch; itself when disabled, or when
        it takes study-level messages (HL7, FHIR) rather than DICOM instances."""
        if self.sender is None or not getattr(settings, "takes_objects", True):
            return destination
        return AuditedDestination(destination, settings, self)

    # -- users -------------------------------------------------------------------------------

    def user_login(self, user: str | None, address: str, ok: bool, reason: str = "") -> None:
        """User Authentication / Login: ``user`` None (an unknown token) for a failure."""
        self._user(True, user, address, ok, reason)

    def user_logout(self, user: str | None, address: str) -> None:
        """User Authentication / Logout."""
        self._user(False, user, address, True, "")

    def _user(self, login: bool, user: str | None, address: str, ok: bool, reason: str) -> None:
        person = m.Participant(user_id=user or "(unknown)", requestor=True, address=address)
        outcome = m.Outcome.SUCCESS if ok else m.Outcome.MINOR_FAILURE
        self._submit(
            lambda: m.user_authentication(
                login,
                person,
                self._node(False),
                self.source,
                outcome=outcome,
                outcome_description="" if ok else reason,
            )
        )

    # -- feedback ----------------------------------------------------------------------------

    def feedback_given(
        self, user: str, address: str, study_uid: str, sample: Path | None, replaced: bool
    ) -> None:
        """Procedure Record, C (a first verdict) or U (it replaced the user's previous one): a
        radiologist's feedback on a finding of the study, stored. ``sample``: one stored file of
        the study, read (in the sender's thread) for the patient's ID and name; None when the
        study's files are gone (the message then names no patient)."""
        if self.sender is None:
            return
        person = m.Participant(user_id=user or "(unknown)", requestor=True, address=address)
        self._submit(lambda: self._feedback(person, study_uid, sample, "U" if replaced else "C"))

    def _feedback(self, person: m.Participant, study_uid: str, sample: Path | None, action: str) -> bytes:
        patient_id = patient_name = accession = ""
        if sample is not None:
            try:
                _, patient_id, patient_name, accession = _read_patient(sample)
            except (OSError, ValueError, InvalidDicomError) as exc:  # gone: the message still goes
                log.warning("audit: patient attributes unreadable (%s)", type(exc).__name__)
        return m.procedure_record(
            action,
            person,
            self._node(False, (m.ROLE_APPLICATION,)),
            self.source,
            [m.study(study_uid, {}, [accession])],
            m.patient(patient_id, patient_name),
        )


class AuditedDestination:
    """A destination whose batches are audited (Results exported)."""

    def __init__(self, inner: Destination, settings: DestinationSettings, audit: AuditTrail) -> None:
        self.inner, self.settings, self.audit = inner, settings, audit
        self.name = inner.name

    def send(self, files: list[OutgoingFile]) -> list[Delivery]:
        """Send through the wrapped destination, then queue the audit message."""
        outcomes = self.inner.send(files)
        self.audit.results_exported(self.settings, files, outcomes)
        return outcomes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def tls_context(audit: AuditSettings) -> ssl.SSLContext:
    """The client TLS context towards the audit repository (BCP 195: TLS 1.2 or later)."""
    context = ssl.create_default_context(cafile=str(audit.tls_ca_file) if audit.tls_ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if audit.tls_cert_file is not None and audit.tls_key_file is not None:
        context.load_cert_chain(str(audit.tls_cert_file), str(audit.tls_key_file))
    return context


def build_audit(settings: Settings) -> AuditTrail:
    """The audit trail the settings ask for (disabled unless ``audit.enabled``)."""
    audit = settings.audit
    if not audit.enabled:
        return AuditTrail.disabled()
    hostname = socket.getfqdn() or socket.gethostname()
    source_id = audit.source_id or f"{settings.dicom.ae_title}@{hostname}"
    port = audit.port or (6514 if audit.transport == "tls" else 514)
    sender = SyslogSender(
        audit.host,
        port,
        audit.transport,
        app_name=audit.app_name,
        msgid=audit.msgid,
        hostname=hostname,
        ssl_context=tls_context(audit) if audit.transport == "tls" else None,
        server_name=audit.tls_server_name,
        queue_size=audit.queue_size,
    )
    return AuditTrail(sender, source_id, settings.dicom.ae_title, audit.enterprise_site_id, hostname)
