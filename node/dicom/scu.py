"""C-ECHO and C-STORE as a client (SCU): files are sent as stored, without decoding them."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.dicom import status
from node.errors import NodeError

log = logging.getLogger(__name__)
MAX_CONTEXTS = 128  # presentation contexts one association may propose


class AssociationError(NodeError):
    """The peer could not be reached or rejected the association."""


@dataclass(frozen=True, slots=True)
class FileToSend:
    """A Part 10 file and the presentation context it needs."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(slots=True)
class SendReport:
    """What happened to each file sent."""

    sent: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def _nodelay(event: Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def nodelay_handlers() -> list:
    """Event handlers that set TCP_NODELAY on an association's socket once it is connected."""
    return [(evt.EVT_CONN_OPEN, _nodelay)]


def _ae(calling_aet: str) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    ae.network_timeout = 60
    return ae


def _associate(ae: AE, host: str, port: int, called_aet: str) -> Association:
    assoc = ae.associate(host, port, ae_title=called_aet, evt_handlers=nodelay_handlers())
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise AssociationError(f"association with {called_aet}@{host}:{port} {reason}")
    return assoc


def echo(host: str, port: int, calling_aet: str = "PACSNODE-SCU", called_aet: str = "ANY-SCP") -> int:
    """Send a C-ECHO; return the DIMSE status (raises AssociationError if no association)."""
    ae = _ae(calling_aet)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, host, port, called_aet)
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in rsp:
        raise AssociationError("no C-ECHO response (timeout or abort)")
    return int(rsp.Status)


def collect_files(paths: Iterable[Path]) -> Iterator[FileToSend]:
    """Every readable DICOM Part 10 file under ``paths`` (folders searched recursively)."""
    for path in paths:
        candidates = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for candidate in candidates:
            try:
                ds = dcmread(candidate, stop_before_pixels=True, specific_tags=["SOPClassUID"])
                meta = ds.file_meta
                yield FileToSend(candidate, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            except (InvalidDicomError, AttributeError, OSError):
                log.info("skipping %s: not a DICOM Part 10 file", candidate.name)


def send_files(
    files: list[FileToSend],
    host: str,
    port: int,
    calling_aet: str = "PACSNODE-SCU",
    called_aet: str = "ANY-SCP",
) -> SendReport:
    """C-STORE ``files`` over as few associations as the 128-context limit allows."""
    report = SendReport()
    batch: list[FileToSend] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in contexts and len(contexts) == MAX_CONTEXTS:
            _send_batch(batch, contexts, host, port, calling_aet, called_aet, report)
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(item)
    if batch:
        _send_batch(batch, contexts, host, port, calling_aet, called_aet, report)
    return report


def _send_batch(
    batch: list[FileToSend],
    contexts: set[tuple[str, str]],
    host: str,
    port: int,
    calling_aet: str,
    called_aet: str,
    report: SendReport,
) -> None:
    ae = _ae(calling_aet)
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, [syntax])
    try:
        assoc = _associate(ae, host, port, called_aet)
    except AssociationError as exc:
        report.failed.extend((f.path, str(exc)) for f in batch)
        return
    try:
        for item in batch:
            if not assoc.is_established:
                report.failed.append((item.path, "association lost"))
                continue
            rsp = assoc.send_c_store(item.path)
            code = int(rsp.Status) if "Status" in rsp else None
            if code is not None and status.stored(code):
                report.sent.append(item.path)
            else:
                comment = str(rsp.get("ErrorComment", "")) if code is not None else "no response"
                label = status.name(code) if code is not None else "no response"
                report.failed.append((item.path, f"{label} {comment}".strip()))
    finally:
        if assoc.is_established:
            assoc.release()
