"""HL7 v2.5.1 ORU^R01 to a RIS over MLLP: one message per finished job.

The message (built by :func:`build_oru`, a pure function of the analysis result and the study's
attributes) carries:

- MSH with the configured applications/facilities and a message control ID derived from the job, so
  a resend after a lost ACK is recognisably the same message;
- PID (patient ID with its issuer, name, birth date, sex), ORC/OBR (OBR-3 the report's id, OBR-4
  the model, OBR-18 the accession number, OBR-25 F) and a ZDS with the Study Instance UID (IHE RAD);
- the model identification as OBX (DCM 111001 Algorithm Name, 111003 Algorithm Version) and in
  OBX-18 of each finding;
- one OBX per finding: its code (OBX-3), its probability (NM, UCUM "1"), the operating threshold
  (OBX-7), and the abnormal flag A/N (OBX-8);
- the urgent triage flag in a configurable field (``hl7.triage_field``, default OBR-27.6);
- an NTE "not for diagnostic use" for research models.

The sender (:class:`MllpDestination`) waits for the ACK: AA/CA is delivered; AE/CE (the receiver
found an error in the message) is permanent; AR/CR (rejected, e.g. the receiver is not ready) and
no answer are retried by the outbox. Messages hold patient data: nothing here logs them.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from datetime import datetime
from pathlib import Path

from node.prometheus import NodeMetrics
from node.send import Delivery, OutgoingFile, StudyContext
from node.settings import DestinationSettings, Hl7Settings
from node.types import AnalysisResult, OutputIdentity

log = logging.getLogger(__name__)
START, END = b"\x0b", b"\x1c\x0d"
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))
ALGORITHM_NAME = ("111001", "Algorithm Name", "DCM")
ALGORITHM_VERSION = ("111003", "Algorithm Version", "DCM")


def escape(text: str) -> str:
    """Escape HL7 delimiters in one value; line breaks become spaces."""
    for raw, escaped in _ESCAPES:
        text = text.replace(raw, escaped)
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def _components(*values: str) -> str:
    """A field of components, each escaped; trailing empty components dropped."""
    parts = [escape(v) for v in values]
    while parts and not parts[-1]:
        parts.pop()
    return "^".join(parts)


def control_id(message_uid: str) -> str:
    """MSH-10 (at most 20 characters in 2.5.1): a digest of the message's UID."""
    return hashlib.sha256(message_uid.encode()).hexdigest()[:20].upper()


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S") + "+0000"


class _Segment:
    """A segment as fields by number (HL7 counts from 1; MSH-1 is the field separator)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fields: dict[int, str] = {}

    def __setitem__(self, number: int, value: str) -> None:
        self.fields[number] = value

    def set_component(self, number: int, component: int | None, value: str) -> None:
        if component is None:
            self.fields[number] = escape(value)
            return
        parts = self.fields.get(number, "").split("^") if self.fields.get(number) else []
        parts += [""] * (component - len(parts))
        parts[component - 1] = escape(value)
        self.fields[number] = "^".join(parts)

    def render(self) -> str:
        top = max(self.fields, default=0)
        if self.name == "MSH":  # MSH-1 is the separator itself, MSH-2 the encoding characters
            return "MSH|" + "|".join(self.fields.get(i, "") for i in range(2, top + 1))
        return self.name + "".join("|" + self.fields.get(i, "") for i in range(1, top + 1))


def build_oru(
    result: AnalysisResult,
    study: StudyContext,
    identity: OutputIdentity,
    settings: Hl7Settings,
    message_uid: str,
    urgent: bool,
    now: datetime,
) -> str:
    """The ORU^R01 (segments separated by CR) for one finished job."""
    algo = result.algorithm
    msh = _Segment("MSH")
    msh[2] = "^~\\&"
    msh[3], msh[4] = escape(settings.sending_application), escape(settings.sending_facility)
    msh[5], msh[6] = escape(settings.receiving_application), escape(settings.receiving_facility)
    msh[7], msh[9], msh[10] = _ts(now), "ORU^R01^ORU_R01", control_id(message_uid)
    msh[11], msh[12], msh[18] = settings.processing_id, "2.5.1", "UNICODE UTF-8"
    pid = _Segment("PID")
    pid[1] = "1"
    pid[3] = _components(study.patient_id, "", "", study.issuer_of_patient_id)
    pid[5] = _components(*study.patient_name.split("^")[:5])
    pid[7], pid[8] = escape(study.birth_date), escape(study.sex)
    orc = _Segment("ORC")
    orc[1], orc[3], orc[5] = "RE", _components(message_uid, identity.device_name), "CM"
    obr = _Segment("OBR")
    obr[1], obr[3] = "1", _components(message_uid, identity.device_name)
    obr[4] = _components(algo.model_id, f"{algo.name} {algo.version}", "99PACSNODE")
    obr[7] = escape(study.study_date + study.study_time)
    obr[18], obr[22], obr[24], obr[25] = escape(study.accession_number), _ts(now), "RAD", "F"
    segments = [msh, pid, orc, obr]
    triage = settings.triage_field
    name, _, place = triage.partition("-")
    number, _, component = place.partition(".")
    target = next(s for s in segments if s.name == name)
    target.set_component(
        int(number),
        int(component) if component else None,
        settings.triage_urgent if urgent else settings.triage_routine,
    )
    zds = _Segment("ZDS")
    zds[1] = _components(study.study_uid, "", "Application", "DICOM")
    equipment = _components(f"{algo.model_id} {algo.version}", algo.manufacturer, identity.device_uid, "ISO")
    observed = _ts(now)
    obx: list[_Segment] = []
    for code, value in ((ALGORITHM_NAME, algo.name), (ALGORITHM_VERSION, algo.version)):
        seg = _Segment("OBX")
        seg[2], seg[3], seg[5], seg[11], seg[14] = "ST", _components(*code), escape(value), "F", observed
        obx.append(seg)
    for index, finding in enumerate(result.findings, start=1):
        seg = _Segment("OBX")
        seg[2] = "NM"
        seg[3] = _components(finding.code.value, finding.code.meaning, finding.code.scheme_designator)
        seg[4] = str(index)
        seg[5] = f"{finding.probability:.4f}"
        seg[6] = "1^^UCUM"
        seg[7] = f"<{finding.threshold:g}"
        seg[8] = "A" if finding.positive and not finding.normal else "N"
        seg[11], seg[14], seg[18] = "F", observed, equipment
        obx.append(seg)
    for set_id, seg in enumerate(obx, start=1):
        seg[1] = str(set_id)
    lines = [s.render() for s in (*segments, zds, *obx)]
    if algo.research_use_only:
        lines.append("NTE|1|L|Research model, not for diagnostic use")
    return "\r".join(lines) + "\r"


class MllpDestination:
    """Sends HL7 v2 messages over MLLP (one connection per batch) and reads each ACK."""

    def __init__(self, settings: DestinationSettings, metrics: NodeMetrics | None = None) -> None:
        assert settings.host is not None and settings.port is not None  # the settings validator makes sure
        self.settings = settings
        self.name = settings.name
        self.metrics = metrics or NodeMetrics()

    def send(self, files: list[OutgoingFile]) -> list[Delivery]:
        """Deliver each message and wait for its ACK; never raises for a peer failure."""
        if not files:
            return []
        started = time.perf_counter()
        results = self._send(files)
        failed = [r for r in results if not r.ok]
        reason = "connection" if failed and failed[0].detail.startswith("not reachable") else "status"
        self.metrics.delivery(
            self.name, time.perf_counter() - started, len(results) - len(failed), len(failed), reason
        )
        return results

    def _send(self, files: list[OutgoingFile]) -> list[Delivery]:
        s = self.settings
        timeout = s.hl7.timeout_s
        try:
            conn = socket.create_connection((s.host, s.port), timeout=timeout)
        except OSError as exc:
            log.warning(
                "destination %s (%s:%s): not reachable (%s)", self.name, s.host, s.port, type(exc).__name__
            )
            return [Delivery(f.path, False, f"not reachable: {type(exc).__name__}") for f in files]
        results: list[Delivery] = []
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for index, item in enumerate(files):
                try:
                    results.append(self._exchange(conn, item.path))
                except OSError as exc:
                    detail = f"no ACK: {type(exc).__name__}"
                    results += [Delivery(f.path, False, detail) for f in files[index:]]
                    break
        return results

    def _exchange(self, conn: socket.socket, path: Path) -> Delivery:
        body = path.read_bytes()
        sent_id = _field(body, b"MSH", 10)
        conn.sendall(START + body + END)
        answer = _read_frame(conn, 1 << 20)
        return _judge(path, answer, sent_id)


def _read_frame(conn: socket.socket, limit: int) -> bytes:
    """One MLLP frame's content (ConnectionError when the peer closes first)."""
    data = b""
    while END not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the ACK")
        data += chunk
        if len(data) > limit:
            raise ConnectionError("ACK too large")
    start = data.find(START)
    return data[start + 1 if start >= 0 else 0 : data.index(END)]


def _field(message: bytes, segment: bytes, number: int) -> str:
    """One field of the first ``segment`` (MSH counted as HL7 does), "" when absent."""
    for line in message.replace(b"\n", b"\r").split(b"\r"):
        if line.startswith(segment + b"|"):
            parts = line.split(b"|")
            index = number - 1 if segment == b"MSH" else number
            return parts[index].decode("utf-8", "replace") if index < len(parts) else ""
    return ""


def _judge(path: Path, ack: bytes, sent_id: str) -> Delivery:
    """What an ACK says about the message it answers. Only codes are kept, never texts (a
    receiver may quote the message)."""
    import hl7

    try:
        parsed = hl7.parse(ack.decode("utf-8", "replace"))
        msa = parsed.segment("MSA")
    except (KeyError, IndexError, ValueError, hl7.ParseException):
        return Delivery(path, False, "the answer is not an HL7 ACK")
    code = str(msa(1)).upper()
    answered = str(msa(2)) if len(msa) > 2 else ""
    if answered and answered != sent_id:
        return Delivery(path, False, "the ACK answers another message (MSA-2)")
    error = ""
    try:
        err = parsed.segment("ERR")
        error = f" (ERR-3 {str(err(3)(1)(1))[:16]})" if len(err) > 3 and str(err(3)) else ""
    except (KeyError, IndexError):
        pass
    if code in ("AA", "CA"):
        return Delivery(path, True, f"ACK {code}")
    if code in ("AE", "CE"):
        return Delivery(path, False, f"ACK {code}: the receiver found an error in the message{error}", True)
    if code in ("AR", "CR"):
        return Delivery(path, False, f"ACK {code}: rejected, will retry{error}")
    return Delivery(path, False, "unknown acknowledgment code")
