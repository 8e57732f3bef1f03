"""C-STORE destination: one association per batch, transfer syntaxes negotiated with the peer."""

from __future__ import annotations

import logging
import ssl
import time

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from node.dicom import status
from node.dicom.scu import nodelay_handlers
from node.dicom.tls import client_context
from node.errors import ConfigError
from node.prometheus import NodeMetrics
from node.send import Delivery, OutgoingFile
from node.settings import DestinationSettings

log = logging.getLogger(__name__)
_UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class CStoreDestination:
    """Sends files to a DICOM peer (usually the PACS) with C-STORE."""

    def __init__(
        self,
        settings: DestinationSettings,
        calling_aet: str,
        timeout_s: float = 60.0,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.calling_aet = calling_aet
        self.timeout_s = timeout_s
        self.metrics = metrics or NodeMetrics()
        if settings.host is None or settings.port is None or settings.ae_title is None:
            # the settings' validation requires them for kind dicom; this names the gap otherwise
            raise ConfigError(f"destinations[{settings.name}]: C-STORE needs ae_title, host and port")
        self._peer = (settings.host, settings.port, settings.ae_title)
        tls = settings.tls
        self._tls_args: tuple[ssl.SSLContext, str] | None = None
        if tls.enabled:
            context = client_context(tls, f"destinations[{settings.name}].tls")
            self._tls_args = (context, tls.server_name or settings.host)

    def send(self, files: list[OutgoingFile]) -> list[Delivery]:
        """Deliver ``files`` over one association (see :meth:`_send`) and count the outcome."""
        started = time.perf_counter()
        results = self._send(files)
        if results:
            failed = [r for r in results if not r.ok]
            reason = "association" if failed and failed[0].detail.startswith("association") else "status"
            self.metrics.delivery(
                self.name, time.perf_counter() - started, len(results) - len(failed), len(failed), reason
            )
        return results

    def _send(self, files: list[OutgoingFile]) -> list[Delivery]:
        """Deliver ``files`` over one association; a file whose syntax the peer refused is converted
        to an uncompressed syntax it accepted (outputs are uncompressed, so nothing is lost)."""
        if not files:
            return []
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.network_timeout = self.timeout_s
        ae.dimse_timeout = self.timeout_s
        for sop_class in sorted({f.sop_class_uid for f in files})[:128]:
            syntaxes = {f.transfer_syntax_uid for f in files if f.sop_class_uid == sop_class}
            ae.add_requested_context(sop_class, sorted(syntaxes | set(_UNCOMPRESSED)))
        s = self.settings
        host, port, called_aet = self._peer
        assoc = ae.associate(
            host, port, ae_title=called_aet, evt_handlers=nodelay_handlers(), tls_args=self._tls_args
        )
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "not reachable or aborted"
            if self._tls_args is not None and not assoc.is_rejected:
                why += " (TLS)"
            log.warning(
                "destination %s (%s@%s:%d): association %s", self.name, s.ae_title, s.host, s.port, why
            )
            return [Delivery(f.path, False, f"association {why}") for f in files]
        results: list[Delivery] = []
        try:
            for item in files:
                results.append(self._send_one(assoc, item))
        finally:
            if assoc.is_established:
                assoc.release()
        return results

    def _send_one(self, assoc: object, item: OutgoingFile) -> Delivery:
        accepted = {
            (cx.abstract_syntax, cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts  # type: ignore[attr-defined]
        }
        if not assoc.is_established:  # type: ignore[attr-defined]
            return Delivery(item.path, False, "association lost")
        try:
            if (item.sop_class_uid, item.transfer_syntax_uid) in accepted:
                rsp = assoc.send_c_store(item.path)  # type: ignore[attr-defined]
            elif any(a == item.sop_class_uid for a, _ in accepted):
                rsp = assoc.send_c_store(dcmread(item.path))  # type: ignore[attr-defined]
            else:
                return Delivery(
                    item.path, False, f"peer accepts no context for SOP class {item.sop_class_uid}"
                )
        except (OSError, ValueError, RuntimeError) as exc:
            return Delivery(item.path, False, f"send failed: {exc}")
        if "Status" not in rsp:
            return Delivery(item.path, False, "no response (timeout or abort)")
        code = int(rsp.Status)
        if status.stored(code):
            return Delivery(item.path, True, status.name(code))
        comment = str(rsp.get("ErrorComment", ""))
        return Delivery(item.path, False, f"{status.name(code)} {comment}".strip())
