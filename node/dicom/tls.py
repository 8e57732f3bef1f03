"""TLS contexts for DICOM secure transport (PS3.15 Annex B): the listener's and the sender's."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from node.errors import ConfigError
from node.settings import ClientTlsSettings, TlsSettings

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _readable(path: Path | None, what: str) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"{what} {path} does not exist or is not a file")
    return str(path)


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose handshake runs in the association's own thread, with a time limit.

    pynetdicom wraps each accepted socket in the listener's accept loop; with the default (handshake
    on wrap, blocking socket) one client that connects and sends nothing would stall every other
    client of the TLS port. Deferred, the handshake happens on the first read in the association
    thread, and the socket timeout bounds it (and any later stalled read)."""

    timeout_s: float = 60.0

    def wrap_socket(  # type: ignore[override]
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        """Wrap without handshaking now; reads then time out after ``timeout_s``."""
        sock.settimeout(self.timeout_s)
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )


def server_context(tls: TlsSettings, timeout_s: float = 60.0) -> ssl.SSLContext:
    """The listener's context: its certificate and key, and client verification from ca_file.

    With ``require_client_cert`` a client without a certificate chaining to ca_file is refused; with
    only ca_file a client certificate is verified when one is presented. The handshake is deferred to
    the association's thread and limited to ``timeout_s`` (see :class:`_DeferredHandshakeContext`)."""
    cert = _readable(tls.cert_file, "dicom.tls.cert_file")
    key = _readable(tls.key_file, "dicom.tls.key_file")
    ca = _readable(tls.ca_file, "dicom.tls.ca_file")
    if cert is None or key is None:
        raise ConfigError("dicom.tls needs cert_file and key_file")
    ctx = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.timeout_s = timeout_s
    ctx.minimum_version = _VERSIONS[tls.min_version]
    try:
        ctx.load_cert_chain(cert, key)
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError as exc:
        raise ConfigError(f"dicom.tls: cannot load the certificate, key or CA: {exc}") from exc
    if tls.require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif ca is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: ClientTlsSettings, where: str) -> ssl.SSLContext:
    """A sender's context: the peer is verified against ca_file (or the system store), with its
    host name unless ``check_hostname`` is off; a client certificate is offered when configured.
    ``where`` names the setting in error messages (e.g. ``destinations[pacs].tls``)."""
    ca = _readable(tls.ca_file, f"{where}.ca_file")
    cert = _readable(tls.cert_file, f"{where}.cert_file")
    key = _readable(tls.key_file, f"{where}.key_file")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        ctx.minimum_version = _VERSIONS[tls.min_version]
        ctx.check_hostname = tls.check_hostname
        if cert is not None and key is not None:
            ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"{where}: cannot load the certificate, key or CA: {exc}") from exc
    return ctx
