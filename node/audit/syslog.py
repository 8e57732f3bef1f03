"""Syslog (RFC 5424) sender of audit messages to an audit record repository, over UDP (RFC 5426,
one message per datagram), TCP (RFC 6587 octet counting) or TLS (RFC 5425: ``MSG-LEN SP
SYSLOG-MSG``), as IHE ITI-20 (ATNA Record Audit Event) asks.

Messages are queued and sent by one background thread, so that a slow or absent repository never
holds up a C-STORE or a page; a message that cannot be sent is kept and retried (the connection is
made again with a back-off) until the queue is full, then the oldest are dropped and counted. The
node's own log says that sending failed, never what the message held.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from node.backoff import backoff_s

log = logging.getLogger(__name__)

Transport = Literal["udp", "tcp", "tls"]
FACILITY_AUTHPRIV = 10  # security/authorization messages (ITI TF-2 3.20.4.2)
SEVERITY_NOTICE = 5  # normal but significant condition
SEVERITY_WARNING = 4
BOM = b"\xef\xbb\xbf"
UDP_MAX = 65507


def _printable(value: str, limit: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII (33..126), at most ``limit`` characters; '-' when empty."""
    text = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return text or "-"


def timestamp(when: datetime | None = None) -> str:
    """RFC 5424 TIMESTAMP (RFC 3339, UTC, milliseconds)."""
    moment = (when or datetime.now(UTC)).astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_message(
    body: bytes,
    *,
    app_name: str,
    msgid: str,
    hostname: str,
    procid: str | None = None,
    severity: int = SEVERITY_NOTICE,
    facility: int = FACILITY_AUTHPRIV,
    when: datetime | None = None,
) -> bytes:
    """One RFC 5424 SYSLOG-MSG: ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM MSG``
    (no structured data; the MSG is UTF-8, so it starts with the byte order mark)."""
    pri = facility * 8 + severity
    header = " ".join(
        [
            f"<{pri}>1",
            timestamp(when),
            _printable(hostname, 255),
            _printable(app_name, 48),
            _printable(procid if procid is not None else str(os.getpid()), 128),
            _printable(msgid, 32),
            "-",
        ]
    )
    return header.encode("ascii") + b" " + BOM + body


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 / RFC 6587 framing: the length in octets, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message


Item = bytes | Callable[[], bytes | None]


class SyslogSender:
    """Sends audit messages (XML bodies) as syslog messages from one background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        transport: Transport = "tls",
        *,
        app_name: str = "pacs-node",
        msgid: str = "DICOM+RFC3881",
        hostname: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
        queue_size: int = 10_000,
        timeout_s: float = 5.0,
        retry_max_s: float = 30.0,
    ) -> None:
        if transport not in ("udp", "tcp", "tls"):
            raise ValueError(f"audit transport is udp, tcp or tls, not {transport!r}")
        self.host, self.port, self.transport = host, port, transport
        self.app_name, self.msgid = app_name, msgid
        self.hostname = hostname or socket.getfqdn() or socket.gethostname()
        if transport == "tls" and ssl_context is None:
            ssl_context = ssl.create_default_context()
        self._ssl = ssl_context
        self._server_name = server_name or host
        self._timeout = timeout_s
        self._retry_max = retry_max_s
        self._queue: collections.deque[Item] = collections.deque()
        self._queue_size = queue_size
        self._cond = threading.Condition()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._busy = False
        self.sent = 0
        self.dropped = 0
        self.failed = 0  # messages that could not be built

    # -- the queue -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the sending thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
            self._thread.start()

    def submit(self, item: Item) -> None:
        """Queue a message body, or a function that builds one (run on the sending thread; None:
        nothing to send). Never blocks, never raises: when the queue is full the oldest goes."""
        with self._cond:
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    log.error("audit queue full: %d audit messages dropped so far", self.dropped)
            self._queue.append(item)
            self._cond.notify_all()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued message was sent; False when time ran out."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout_s``), then stop and disconnect."""
        if self._thread is not None and not self.flush(timeout_s):
            log.warning("audit: %d audit messages not sent before stopping", len(self._queue))
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._thread = None
        self._disconnect()

    def _run(self) -> None:
        failures = 0  # in a row
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                item = self._queue[0]
                self._busy = True
            try:
                body = self._body(item)
                if body is not None:
                    self._send(body)
                    self.sent += 1
                failures = 0
                with self._cond:
                    if self._queue and self._queue[0] is item:
                        self._queue.popleft()
            except OSError as exc:  # the repository is away: keep the message, try again later
                self._disconnect()
                failures += 1
                delay = backoff_s(0.5, failures, self._retry_max)
                log.warning(
                    "audit: cannot send to %s %s:%d (%s); retrying in %.1f s",
                    self.transport,
                    self.host,
                    self.port,
                    type(exc).__name__,
                    delay,
                )
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._closing, timeout=delay)
                continue
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _body(self, item: Item) -> bytes | None:
        """The message body of a queued item; a builder that fails is counted and skipped (the
        log names the error's type only: its text could carry patient data)."""
        if isinstance(item, bytes):
            return item
        try:
            return item()
        except Exception as exc:  # noqa: BLE001 (one bad event must not stop the audit trail)
            self.failed += 1
            log.error("audit: an audit message could not be built (%s)", type(exc).__name__)
            return None

    # -- the wire --------------------------------------------------------------------------

    def frame(self, body: bytes, severity: int = SEVERITY_NOTICE) -> bytes:
        """The bytes sent for one message body on this transport."""
        message = format_message(
            body, app_name=self.app_name, msgid=self.msgid, hostname=self.hostname, severity=severity
        )
        return message if self.transport == "udp" else octet_counted(message)

    def _connect(self) -> socket.socket:
        if self.transport == "udp":
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect((self.host, self.port))
            return sock
        raw = socket.create_connection((self.host, self.port), timeout=self._timeout)
        if self.transport == "tls":
            assert self._ssl is not None
            try:
                return self._ssl.wrap_socket(raw, server_hostname=self._server_name)
            except BaseException:
                raw.close()
                raise
        return raw

    def _send(self, body: bytes) -> None:
        data = self.frame(body)
        if self.transport == "udp" and len(data) > UDP_MAX:
            log.warning("audit: a message of %d bytes is too large for UDP; not sent", len(data))
            return
        if self._sock is None:
            self._sock = self._connect()
        if self.transport == "udp":
            self._sock.send(data)
        else:
            self._sock.sendall(data)

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                if isinstance(sock, ssl.SSLSocket):
                    sock.settimeout(1.0)
                    sock.unwrap()  # close_notify: the repository sees a clean end of the session
                sock.close()
            except OSError:
                log.debug("audit: closing the connection failed", exc_info=True)
