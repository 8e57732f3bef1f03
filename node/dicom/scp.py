"""The C-STORE / C-ECHO SCP: receives instances and answers success only once they are durable."""

from __future__ import annotations

import copy
import logging
import socket
import time
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
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
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from node.dicom import status
from node.dicom.access import AllowList
from node.dicom.committer import IngestCommitter
from node.dicom.inspect import inspect_dataset
from node.dicom.spool import Spool, SpoolFullError
from node.dicom.tls import server_context
from node.errors import IngestError, StoreError
from node.metrics import NodeMetrics
from node.settings import DicomSettings
from node.store.received import ReceivedInstance
from node.store.tables import utcnow

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


def _failure(code: int, comment: str) -> Dataset:
    """A C-STORE response status with an error comment (LO: at most 64 characters)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class StorageSCP:
    """Listens for associations; files every instance durably before answering."""

    def __init__(
        self,
        settings: DicomSettings,
        spool: Spool,
        committer: IngestCommitter,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.committer = committer
        self.metrics = metrics or NodeMetrics()
        self.allowed = AllowList.parse(settings.allowed_calling_aets)
        self._tls = server_context(settings.tls, settings.network_timeout_s) if settings.tls.enabled else None
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        """Bind and serve in background threads."""
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.require_called_aet = False
        if not self.allowed:  # the allow-list (AE titles and addresses) is checked in _on_requested
            log.warning("dicom.allowed_calling_aets is empty: every calling AE title is accepted")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        tls_only = self._tls is not None and s.tls.port is None
        main_context = self._tls if tls_only else None
        contexts = [_SharedContext.of(cx) for cx in ae.supported_contexts]
        self._server = ae.start_server(
            (s.host, s.port), block=False, evt_handlers=handlers, ssl_context=main_context, contexts=contexts
        )
        kind = "TLS" if tls_only else "plain TCP"
        log.info("DICOM SCP %s listening on %s:%d (%s)", s.ae_title, s.host, self.port, kind)
        if self._tls is not None and s.tls.port is not None:
            self._tls_server = ae.start_server(
                (s.host, s.tls.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=self._tls,
                contexts=contexts,
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
        return all(srv is not None and srv.socket.fileno() >= 0 for srv in servers)

    @staticmethod
    def _on_connect(event: Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_requested(self, event: Event) -> None:
        """Check the calling AE title and source address against the allow-list; reject (calling
        AE title not recognised) when no entry matches. Only the AE title and address are logged."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = str(primitive.calling_ae_title if primitive is not None else assoc.requestor.ae_title)
        address = str(assoc.requestor.address)
        if self.allowed.allows(calling, address):
            return
        log.warning("association from %s at %s rejected: not in dicom.allowed_calling_aets", calling, address)
        label = calling if self.allowed.knows(calling) else "(unlisted)"
        self.metrics.association(label, "rejected_not_allowed")
        assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
        assoc.kill()

    def _on_accepted(self, event: Event) -> None:
        self.metrics.association(event.assoc.requestor.ae_title, "accepted")

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        log.warning("association from %s (%s) rejected", requestor.ae_title, requestor.address)
        self.metrics.association(requestor.ae_title, "rejected")

    @staticmethod
    def _on_echo(event: Event) -> int:
        return status.SUCCESS

    def _on_store(self, event: Event) -> int | Dataset:
        started = time.perf_counter()
        calling = event.assoc.requestor.ae_title
        try:
            stored = self.store(event)
        except IngestError as exc:
            log.warning("C-STORE from %s refused with %s: %s", calling, status.name(exc.status), exc)
            self.metrics.refused(calling, exc.status)
            return _failure(exc.status, str(exc))
        log.debug("C-STORE from %s stored in %.1f ms", calling, (time.perf_counter() - started) * 1e3)
        return stored

    def store(self, event: Event) -> int:
        """File one C-STORE request durably; raise IngestError with the status to answer."""
        request = event.request
        stream: BytesIO = request.DataSet  # type: ignore[assignment]
        context = event.context
        transfer_syntax = UID(context.transfer_syntax)
        header = inspect_dataset(stream, transfer_syntax)
        requested_class = str(request.AffectedSOPClassUID)
        if header.sop_class_uid != requested_class or header.sop_class_uid != context.abstract_syntax:
            raise IngestError(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"data set SOP class {header.sop_class_uid} differs from the request's {requested_class}",
            )
        if header.sop_instance_uid != str(request.AffectedSOPInstanceUID):
            raise IngestError(
                status.CANNOT_UNDERSTAND, "data set SOP Instance UID differs from the request's"
            )
        relative = self.spool.relative_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        body = stream.getbuffer()
        meta = BytesIO()
        file_meta = event.file_meta
        file_meta.SourceApplicationEntityTitle = event.assoc.requestor.ae_title
        write_file_meta_info(meta, file_meta, enforce_standard=True)
        size = len(_PREAMBLE) + meta.tell() + len(body)
        dirs: set = set()
        written = False
        try:
            if not self.spool.exists(relative):
                self.spool.check_space(size)
                dirs = self.spool.write(relative, (_PREAMBLE, meta.getbuffer(), body))
                written = True
            record = ReceivedInstance(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                series_uid=header.series_uid,
                study_uid=header.study_uid,
                transfer_syntax_uid=str(transfer_syntax),
                modality=header.modality,
                body_part=header.body_part,
                series_number=header.series_number,
                series_description=header.series_description,
                instance_number=header.instance_number,
                byte_size=size,
                path=str(relative),
                calling_aet=event.assoc.requestor.ae_title,
                received_at=utcnow(),
            )
            new = self.committer.commit(record, dirs)
        except SpoolFullError as exc:
            raise IngestError(status.OUT_OF_RESOURCES, f"disk full: {exc}") from exc
        except OSError as exc:
            raise IngestError(status.OUT_OF_RESOURCES, f"cannot write to the spool: {exc.strerror}") from exc
        except StoreError as exc:
            if written:
                self.spool.remove(relative)
            raise IngestError(status.OUT_OF_RESOURCES, f"cannot record the instance: {exc}") from exc
        finally:
            body.release()
        if not new:
            log.info("duplicate instance received from %s; already stored", event.assoc.requestor.ae_title)
        self.metrics.stored(event.assoc.requestor.ae_title, size, new)
        return status.SUCCESS
