"""The C-STORE / C-ECHO SCP: receives instances and answers success only once they are durable."""

from __future__ import annotations

import copy
import logging
import re
import socket
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomIO
from pydicom.filewriter import write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # the SOP classes are generated at import
    Verification,
    uid_to_service_class,
)

from node.allowlist import AllowList
from node.audit import AuditTrail
from node.budget import DEFAULT_BUDGET, Budget
from node.dicom import status
from node.dicom.committer import IngestCommitter
from node.dicom.ingest import InstanceFiler
from node.dicom.inspect import Header, inspect_dataset
from node.dicom.sop_classes import storage_sop_classes
from node.dicom.spool import Spool
from node.dicom.tls import server_context
from node.dicom.transport import Gate, GatedServer, NetworkLimits, shown_ae, start_gated_server
from node.errors import IngestError
from node.prometheus import NodeMetrics
from node.settings import DicomSettings

log = logging.getLogger(__name__)

TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]
_PREAMBLE = b"\x00" * 128 + b"DICM"


class _SharedContext(PresentationContext):
    """A supported presentation context that copies cheaply.

    pynetdicom deep-copies the server's supported contexts for every association; with ~170
    storage contexts of 16 transfer syntaxes each, re-validating every UID made that ~20 ms of CPU
    per association. The UIDs are immutable strings, so a copy can share them: only the list that
    holds them is copied.
    """

    def __deepcopy__(self, memo: dict[int, object]) -> _SharedContext:
        clone = copy.copy(self)
        clone._transfer_syntax = list(self._transfer_syntax)
        return clone

    @classmethod
    def of(cls, context: PresentationContext) -> _SharedContext:
        """The same context as a cheaply copied one."""
        shared = cls()
        shared.__dict__.update(context.__dict__)
        shared._transfer_syntax = list(context._transfer_syntax)
        return shared


_PLAIN = re.compile(r"[ -\[\]-~]+")  # printable ASCII, no backslash: one value, encoded as is


def _element(elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 with a 16-bit length."""
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """The File Meta group pydicom's ``write_file_meta_info(..., enforce_standard=True)`` writes for
    pynetdicom's ``event.file_meta`` with these UIDs and Source AE Title, byte for byte, encoded
    directly (~20x cheaper). Values that are not plain ASCII go through pydicom."""
    values = (sop_class_uid, sop_instance_uid, transfer_syntax, source_ae)
    if not all(_PLAIN.fullmatch(v) for v in values):
        return _pydicom_file_meta(*values)

    def uid(text: str) -> bytes:
        raw = text.encode("ascii")
        return raw + b"\0" if len(raw) % 2 else raw

    def text(value: str) -> bytes:
        raw = value.encode("ascii")
        return raw + b" " if len(raw) % 2 else raw

    body = b"".join(
        (
            struct.pack("<HH2s2xL", 2, 1, b"OB", 2) + b"\x00\x01",
            _element(0x0002, b"UI", uid(sop_class_uid)),
            _element(0x0003, b"UI", uid(sop_instance_uid)),
            _element(0x0010, b"UI", uid(transfer_syntax)),
            _element(0x0012, b"UI", uid(PYNETDICOM_IMPLEMENTATION_UID)),
            _element(0x0013, b"SH", text(PYNETDICOM_IMPLEMENTATION_VERSION)),
            _element(0x0016, b"AE", text(source_ae)),
        )
    )
    return struct.pack("<HH2sHL", 2, 0, b"UL", 4, len(body)) + body


def _pydicom_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """file_meta_bytes by pydicom (how the SCP wrote it before)."""
    file_meta = create_file_meta(
        sop_class_uid=UID(sop_class_uid),
        sop_instance_uid=UID(sop_instance_uid),
        transfer_syntax=UID(transfer_syntax),
    )
    file_meta.SourceApplicationEntityTitle = source_ae
    meta = BytesIO()
    write_file_meta_info(DicomIO(meta), file_meta, enforce_standard=True)
    return meta.getvalue()


def _failure(code: int, comment: str) -> Dataset:
    """A C-STORE response status with an error comment (LO: at most 64 characters, no backslash)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = re.sub(r"[^ -\[\]-~]", "?", comment)[:64]
    return ds


# A placeholder for a request SOP Instance UID pynetdicom cannot carry (empty, over 64 characters):
# the response echoes it, and the request is answered with a failure.
_PLACEHOLDER_UID = "0"
# A storage SOP class put in place of the request's when a C-STORE arrives on a context that is not
# storage, so that pynetdicom runs the storage service (which answers it with a failure) instead of
# the context's (Verification would answer a C-STORE as a successful C-ECHO)
_PLACEHOLDER_STORAGE_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage


@dataclass(frozen=True, slots=True)
class _GarbledRequest:
    """What a C-STORE request's command set said where pynetdicom could not use it (shown safely)."""

    sop_class: str | None = None
    sop_instance: str | None = None
    # the request came on a context that is not storage (Verification): its abstract syntax's name,
    # and the request's own SOP Class UID to echo in the response (when it can be carried)
    context: str | None = None
    requested_class: str | None = None


def _shown(value: object) -> str:
    """A request UID as it may appear in logs and error comments: digits and dots only (anything
    else becomes '?': a garbled UID field could hold any bytes), at most 24 characters."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    text = re.sub(r"[^0-9.]", "?", str(value if value is not None else ""))
    return (text[:23] + "~") if len(text) > 24 else text


def _uid_name(uid: str) -> str:
    """A short name for a SOP class UID: its keyword (CTImageStorage) when pydicom knows it."""
    keyword = UID(uid).keyword if uid else ""
    return keyword or _shown(uid)


def _storage_dispatchable(value: object) -> bool:
    """True when pynetdicom would run the storage service for this request SOP Class UID (one
    value, 1 to 64 characters, a storage class it knows); otherwise it aborts the association or
    drops the request unanswered."""
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return False
    return uid_to_service_class(value) is StorageServiceClass


def _misread_by_sender(shown: str) -> bool:
    """True for a request SOP Class UID that is no UID at all (fewer than two components, e.g. the
    '31' of a UN-encoded UID read as text), as opposed to a real UID of a non-storage class."""
    return "?" not in shown and "~" not in shown and shown.count(".") == 0


def _uid_carriable(value: object) -> bool:
    """True when pynetdicom accepts this request SOP Instance UID (one value, 1 to 64 characters)."""
    return isinstance(value, str) and 0 < len(value) <= 64


def configured_ae(s: DicomSettings) -> AE:
    """A pynetdicom AE with the node's association settings (``dicom``: AE title, largest PDU,
    association limit, timeouts), without contexts; the node's gate checks the called AE title."""
    ae = AE(ae_title=s.ae_title)
    ae.maximum_pdu_size = s.max_pdu
    ae.maximum_associations = s.max_associations
    ae.acse_timeout = s.acse_timeout_s
    ae.dimse_timeout = s.dimse_timeout_s
    ae.network_timeout = s.network_timeout_s
    ae.require_called_aet = False  # the gate checks it (dicom.require_called_ae_title)
    return ae


class StorageSCP:
    """Listens for associations; files every instance durably before answering."""

    def __init__(
        self,
        settings: DicomSettings,
        spool: Spool,
        committer: IngestCommitter,
        metrics: NodeMetrics | None = None,
        budget: Budget = DEFAULT_BUDGET,
        audit: AuditTrail | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit or AuditTrail.disabled()  # the audit trail (node.audit)
        self.budget = budget
        self.spool = spool
        self.committer = committer
        self.metrics = metrics or NodeMetrics()
        self.allowed = AllowList.parse(settings.allowed_calling_aets)
        self._tls = server_context(settings.tls, settings.network_timeout_s) if settings.tls.enabled else None
        # limits, the allow-list and slot counts, applied before pynetdicom reads past the A-ASSOCIATE-RQ
        self.gate = Gate(NetworkLimits.of(settings), self.allowed, self.metrics, self.audit)
        self._server: GatedServer | None = None
        self._tls_server: GatedServer | None = None
        # per association: message id -> what its garbled request said (see _on_dimse_received)
        self._garbled: weakref.WeakKeyDictionary[Association, dict[int, _GarbledRequest]] = (
            weakref.WeakKeyDictionary()
        )
        self._garbled_lock = threading.Lock()
        # the durable tail, shared with STOW-RS; concurrent stores of one SOP Instance UID (by
        # either) are serialised by its locks (see store)
        self.filer = InstanceFiler(spool, committer)
        self._instance_locks = self.filer.locks

    def start(self) -> None:
        """Bind and serve in background threads."""
        s = self.settings
        ae = configured_ae(s)
        if not self.allowed:  # the gate checks the allow-list (AE titles and addresses)
            log.warning("dicom.allowed_calling_aets is empty: every calling AE title is accepted")
        # the acceptor may support any number of contexts (the 128 limit is on what a requestor proposes)
        for sop_class in storage_sop_classes():
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_DIMSE_RECV, self._on_dimse_received),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_CONN_CLOSE, lambda event: self.audit.association_ended(event.assoc)),  # audit
        ]
        tls_only = self._tls is not None and s.tls.port is None
        main_context = self._tls if tls_only else None
        contexts = [_SharedContext.of(cx) for cx in ae.supported_contexts]
        self._server = start_gated_server(
            ae,
            (s.host, s.port),
            self.gate,
            handlers,
            contexts,
            ssl_context=main_context,
            reuse_port=s.reuse_port,
        )
        kind = "TLS" if tls_only else "plain TCP"
        log.info("DICOM SCP %s listening on %s:%d (%s)", s.ae_title, s.host, self.port, kind)
        if self._tls is not None and s.tls.port is not None:
            self._tls_server = start_gated_server(
                ae,
                (s.host, s.tls.port),
                self.gate,
                handlers,
                contexts,
                ssl_context=self._tls,
                reuse_port=s.reuse_port,
            )
            log.info("DICOM SCP %s listening on %s:%d (TLS)", s.ae_title, s.host, s.tls.port)

    def stop(self) -> None:
        """Stop accepting and close the listening socket."""
        for server in (self._tls_server, self._server):
            if server is not None:
                server.shutdown()
                server.server_close()
        self._server = self._tls_server = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int | None:
        """The port that speaks TLS: the separate TLS port, the main one when TLS-only, or None."""
        if self._tls is None:
            return None
        if self.settings.tls.port is None:
            return self.port
        if self._tls_server is None:
            return self.settings.tls.port
        return int(self._tls_server.server_address[1])

    def is_listening(self) -> bool:
        """True while the server sockets are open."""
        servers = [self._server]
        if self._tls is not None and self.settings.tls.port is not None:
            servers.append(self._tls_server)
        return all(srv is not None and srv.socket is not None and srv.socket.fileno() >= 0 for srv in servers)

    @staticmethod
    def _on_connect(event: Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def has_free_slot(self) -> bool:
        """True while another association could be accepted (dicom.max_associations)."""
        return self.gate.has_free_slot()

    def _on_accepted(self, event: Event) -> None:
        self.metrics.association(event.assoc.requestor.ae_title, "accepted")

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        log.warning("association from %s (%s) rejected", shown_ae(requestor.ae_title), requestor.address)
        self.metrics.association(requestor.ae_title, "rejected")

    @staticmethod
    def _on_echo(event: Event) -> int:
        return status.SUCCESS

    def _on_dimse_received(self, event: Event) -> None:
        """Keep one garbled C-STORE request from aborting the association.

        pynetdicom picks the service by the request's Affected SOP Class UID, not by the
        presentation context: a UID it does not know as storage (DCMTK 3.6.7 dcmsend sends '31'
        for a data set whose SOP Class UID has VR UN) aborts the association, and an empty or
        over-long UID drops the request unanswered. Such a command is pointed at the context's
        abstract syntax (and a placeholder instance UID) so that the storage service runs, and
        what it really said is kept for :meth:`store`, which answers it with a failure status.

        A C-STORE on a context that is not storage (Verification) is pointed at a storage class
        likewise, and refused by :meth:`store`: pynetdicom would answer it as a C-ECHO, with success.
        """
        message = event.message
        if not isinstance(message, C_STORE_RQ) or message.command_set is None or message.context_id is None:
            return
        command = message.command_set
        sop_class = command.get("AffectedSOPClassUID")
        sop_instance = command.get("AffectedSOPInstanceUID")
        class_ok = _storage_dispatchable(sop_class)
        instance_ok = _uid_carriable(sop_instance)
        context = event.assoc._accepted_cx.get(message.context_id)  # pynetdicom's {id: context}
        if context is None:  # pynetdicom aborts: a message on a context that was not accepted
            return
        storage_context = (
            context.abstract_syntax is not None
            and uid_to_service_class(context.abstract_syntax) is StorageServiceClass
        )
        if class_ok and instance_ok and storage_context:
            return
        if not storage_context:
            command.AffectedSOPClassUID = _PLACEHOLDER_STORAGE_CLASS
        elif not class_ok:
            command.AffectedSOPClassUID = context.abstract_syntax
        if not instance_ok:
            command.AffectedSOPInstanceUID = _PLACEHOLDER_UID
        note = _GarbledRequest(
            sop_class=None if class_ok else _shown(sop_class),
            sop_instance=None if instance_ok else _shown(sop_instance),
            context=None if storage_context else _uid_name(str(context.abstract_syntax)),
            requested_class=str(sop_class) if _uid_carriable(sop_class) and not storage_context else None,
        )
        with self._garbled_lock:
            self._garbled.setdefault(event.assoc, {})[int(command.get("MessageID", 0))] = note

    def _garbled_note(self, event: Event) -> _GarbledRequest | None:
        """Take what _on_dimse_received kept for this request, if anything."""
        with self._garbled_lock:
            notes = self._garbled.get(event.assoc)
            if not notes:
                return None
            return notes.pop(int(event.request.MessageID or 0), None)

    def _on_store(self, event: Event) -> int | Dataset:
        """Answer one C-STORE: success once it is durable, otherwise a failure status with an error
        comment. Nothing raised while handling one data set may abort the association."""
        started = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        note = self._garbled_note(event)
        try:
            stored = self.store(event, note)
        except IngestError as exc:
            log.warning(
                "C-STORE from %s refused with %s: %s", shown_ae(calling), status.name(exc.status), exc
            )
            self.metrics.refused(calling, exc.status)
            answer = _failure(exc.status, str(exc))
            if note is not None and note.requested_class is not None:
                answer.AffectedSOPClassUID = note.requested_class  # not our placeholder
            return answer
        except Exception as exc:  # a bug of ours must cost one data set, not the association
            log.exception("C-STORE from %s: unexpected %s while filing", calling, type(exc).__name__)
            self.metrics.refused(calling, status.PROCESSING_FAILURE)
            return _failure(status.PROCESSING_FAILURE, f"node error ({type(exc).__name__}); see its log")
        log.debug("C-STORE from %s stored in %.1f ms", calling, (time.perf_counter() - started) * 1e3)
        return stored

    @staticmethod
    def _check_request(header: Header, event: Event, garbled: _GarbledRequest | None) -> None:
        """Raise IngestError unless the request, its presentation context and the data set agree."""
        request = _c_store(event)
        negotiated = str(event.context.abstract_syntax)
        if garbled is not None and garbled.sop_class is not None:
            if _misread_by_sender(garbled.sop_class) and header.sop_class_uid == negotiated:
                # DCMTK 3.6.7 dcmsend reads a UN-encoded SOP Class/Instance UID as hex text ('31'):
                # the data set and the negotiated context agree, so it is filed under the data
                # set's own UIDs, as DCMTK storescp does
                log.warning(
                    "C-STORE request UIDs misread by the sender ('%s'); filed as the data set's %s",
                    garbled.sop_class,
                    _uid_name(header.sop_class_uid),
                )
                return
            raise IngestError(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"request SOP class '{garbled.sop_class}' is not storage "
                f"(data set: {_uid_name(header.sop_class_uid)})",
            )
        if garbled is not None and garbled.sop_instance is not None:
            raise IngestError(
                status.CANNOT_UNDERSTAND,
                f"request SOP Instance UID empty or over 64 chars: '{garbled.sop_instance}'",
            )
        requested = str(request.AffectedSOPClassUID)
        if header.sop_class_uid != requested:
            raise IngestError(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"data set is {_uid_name(header.sop_class_uid)}, request says {_uid_name(requested)}",
            )
        if header.sop_class_uid != negotiated:
            raise IngestError(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"data set is {_uid_name(header.sop_class_uid)}, context is {_uid_name(negotiated)}",
            )
        if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            raise IngestError(
                status.CANNOT_UNDERSTAND, "data set SOP Instance UID differs from the request's"
            )

    def _file(
        self,
        event: Event,
        header: Header,
        transfer_syntax: UID,
        relative: Path,
        chunks: tuple[bytes | memoryview, ...],
        size: int,
    ) -> bool:
        """Write (unless already there) and commit one instance; True when it was new (see
        InstanceFiler.file_at)."""
        return self.filer.file_at(
            header, transfer_syntax, relative, chunks, size, event.assoc.requestor.ae_title
        )

    def store(self, event: Event, garbled: _GarbledRequest | None = None) -> int:
        """File one C-STORE request durably; raise IngestError with the status to answer.
        ``garbled``: what the request's command said where pynetdicom could not use it."""
        if garbled is not None and garbled.context is not None:
            raise IngestError(
                status.SOP_CLASS_NOT_SUPPORTED,
                f"C-STORE on the {garbled.context} presentation context (not a storage context)",
            )
        stream = _c_store(event).DataSet
        if stream is None:
            raise IngestError(status.CANNOT_UNDERSTAND, "C-STORE request without a data set")
        context = event.context
        transfer_syntax = UID(context.transfer_syntax)
        header = inspect_dataset(stream, transfer_syntax, self.budget.max_inflated_bytes)
        self._check_request(header, event, garbled)
        relative = self.spool.relative_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        body = stream.getbuffer()
        # the data set's own UIDs (the same as the request's, unless a sender misread them)
        meta = file_meta_bytes(
            header.sop_class_uid, header.sop_instance_uid, transfer_syntax, event.assoc.requestor.ae_title
        )
        size = len(_PREAMBLE) + len(meta) + len(body)
        try:
            # one store of an instance at a time in this process: a second copy arriving while the
            # first is being committed waits, then finds the first's file (and never deletes it)
            with self._instance_locks.hold(header.sop_instance_uid):
                new = self._file(event, header, transfer_syntax, relative, (_PREAMBLE, meta, body), size)
        finally:
            body.release()
        if not new:
            log.info("duplicate instance received from %s; already stored", event.assoc.requestor.ae_title)
        self.metrics.stored(event.assoc.requestor.ae_title, size, new)
        self.audit.instance_received(
            event.assoc, header.sop_class_uid, header.study_uid, self.spool.root / relative
        )
        return status.SUCCESS


def _c_store(event: Event) -> C_STORE:
    """The C-STORE request of an EVT_C_STORE event (pynetdicom types ``Event.request`` as any
    DIMSE request primitive)."""
    request = event.request
    if not isinstance(request, C_STORE):
        raise TypeError(f"a C-STORE handler got a {type(request).__name__} request")
    return request
