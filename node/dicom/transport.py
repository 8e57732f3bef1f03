"""Network limits applied before pynetdicom trusts a peer, and idle associations that cost nothing.

pynetdicom 3.0's acceptor reads each PDU whole, whatever length its 6-byte header declares (a peer
declaring 4 GiB is buffered as it streams), blocks in ``recv`` with no deadline (a peer trickling a
byte a second keeps its association slot for as long as it trickles, and ``Association.kill()``
then waits for that reader), decides the allow-list only once the whole A-ASSOCIATE-RQ has been
read by its reactor threads, and polls every millisecond in two threads per association.

Per connection accepted by a :class:`GatedServer`:

1. **The gate** (:meth:`GatedHandler.handle`, in the connection's own thread, before any
   pynetdicom thread exists) reads the first PDU itself: an A-ASSOCIATE-RQ of at most
   ``dicom.max_associate_rq`` bytes, arriving whole within ``dicom.acse_timeout_s``. It then
   decides on the RQ's calling and called AE titles and the peer address: the allow-list,
   ``dicom.require_called_ae_title``, ``dicom.max_associations_per_address`` (connections from one
   address, counted from accept) and the free association slots. A refusal is an A-ASSOCIATE-RJ
   written by the gate; nothing more is read from that peer.
2. **The socket** of an admitted association (:class:`LimitedSocket`) checks every PDU header
   before its body is read: a P-DATA-TF longer than ``dicom.max_pdu`` (plus :data:`PDU_SLACK`), or
   any other PDU longer than ``dicom.max_associate_rq``, is answered with an A-ABORT and the
   connection is closed. Each PDU must arrive whole within ``dicom.network_timeout_s`` of its first
   byte; pynetdicom's own idle timer (the same setting) bounds the time between PDUs. A slot held by
   a trickling peer is therefore free again after at most one timeout, and its threads end.
3. **Idle associations sleep**: the DUL thread waits in ``select`` on the socket and a wake-up pipe
   (written when the association queues a PDU to send), and the association thread waits on an
   event set when a message, an ACSE primitive or a kill arrives, instead of both polling every
   millisecond.

Violations are logged (peer address and escaped AE titles only) and counted in
``pacsnode_associations_total`` under an ``outcome`` that names them.

This leans on pynetdicom 3.0 internals (``AssociationSocket.recv``/``ready``, the acceptor's
``Association._run_reactor`` and its queues); ``tests/security/test_network.py`` exercises each.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import re
import select
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from pydicom.uid import RE_VALID_UID, UID
from pydicom.valuerep import VALIDATORS
from pynetdicom import _config as pynetdicom_config
from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from node.allowlist import AllowList
from node.audit import AuditTrail
from node.prometheus import NodeMetrics
from node.redact import redact
from node.settings import DicomSettings

log = logging.getLogger(__name__)

PDU_HEADER = struct.Struct(">BBL")
ASSOCIATE_RQ_TYPE = 0x01
ASSOCIATE_RQ_EVENT = "Evt6"  # the DUL state machine's event for a received A-ASSOCIATE-RQ
P_DATA_TF_TYPE = 0x04
# some senders count the 6-byte PDU header into the maximum length they were told; allow that
PDU_SLACK = 6
# how long an idle association thread sleeps between checks of its timers
IDLE_WAIT_S = 0.5
# connections waiting for their A-ASSOCIATE-RQ, at most this many times dicom.max_associations
PENDING_FACTOR = 4
_SEND_TIMEOUT_S = 2.0
_READ_CHUNK = 256 * 1024

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded
# A-ABORT reasons (source 2, service provider), PS3.8 9.3.8
ABORT_UNSPECIFIED = 0x00
ABORT_UNEXPECTED_PDU = 0x02
ABORT_INVALID_PARAMETER = 0x06


def shown_ae(value: object) -> str:
    """A peer's AE title as it may appear in a log line (control characters escaped, bounded)."""
    return redact(str(value).strip(), max_chars=20)


@dataclass(frozen=True, slots=True)
class NetworkLimits:
    """What one peer may send before and after it is accepted (see the module docstring)."""

    ae_title: str
    max_pdu: int
    max_associate_rq: int
    rq_timeout_s: float
    pdu_timeout_s: float
    max_associations: int
    max_per_address: int
    require_called_ae_title: bool

    @classmethod
    def of(cls, s: DicomSettings) -> NetworkLimits:
        """The limits configured in the ``dicom`` settings."""
        return cls(
            ae_title=s.ae_title,
            max_pdu=s.max_pdu,
            max_associate_rq=s.max_associate_rq,
            rq_timeout_s=s.acse_timeout_s,
            pdu_timeout_s=s.network_timeout_s,
            max_associations=s.max_associations,
            max_per_address=s.max_associations_per_address,
            require_called_ae_title=s.require_called_ae_title,
        )

    def max_length(self, pdu_type: int) -> int:
        """The largest PDU length (the header's field) accepted for a PDU type."""
        if pdu_type == P_DATA_TF_TYPE:
            return 0xFFFFFFFF if self.max_pdu == 0 else self.max_pdu + PDU_SLACK
        return self.max_associate_rq


class PduRefused(Exception):
    """A PDU broke a limit; ``outcome`` is the metric label, the message says why (no PHI)."""

    def __init__(self, outcome: str, message: str, abort_reason: int, partial: bytes = b"") -> None:
        super().__init__(message)
        self.outcome = outcome
        self.abort_reason = abort_reason
        self.partial = partial


class PduTimeout(PduRefused):
    """A PDU did not arrive whole before its deadline."""


class PeerClosed(Exception):
    """The peer closed the connection (or it failed) part-way; ``partial`` is what arrived."""

    def __init__(self, partial: bytes = b"") -> None:
        super().__init__("connection closed by the peer")
        self.partial = partial


def _recv_exact(sock: socket.socket, count: int, deadline: float, what: str) -> bytearray:
    """Read exactly ``count`` bytes before ``deadline`` (time.monotonic); PduRefused on the
    deadline, PeerClosed when the connection ends first."""
    buf = bytearray(count)
    view = memoryview(buf)
    got = 0
    try:
        while got < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PduTimeout(
                    "aborted_pdu_timeout",
                    f"{what} did not arrive in time ({got} of {count} bytes)",
                    ABORT_UNSPECIFIED,
                    bytes(view[:got]),
                )
            sock.settimeout(remaining)
            try:
                n = sock.recv_into(view[got:], min(count - got, _READ_CHUNK))
            except TimeoutError:
                continue  # the deadline check above names it
            except OSError as exc:  # reset, TLS failure, closed under us
                raise PeerClosed(bytes(view[:got])) from exc
            if n == 0:
                raise PeerClosed(bytes(view[:got]))
            got += n
    finally:
        view.release()
    return buf


def read_header(sock: socket.socket, deadline: float, limits: NetworkLimits) -> tuple[int, int, bytearray]:
    """Read a PDU header; (type, length, header bytes). PduRefused when the declared length is
    over the limit for its type: the body is never read."""
    header = _recv_exact(sock, PDU_HEADER.size, deadline, "a PDU header")
    pdu_type, _, length = PDU_HEADER.unpack(header)
    limit = limits.max_length(pdu_type)
    if length > limit:
        raise PduRefused(
            "aborted_pdu_too_long",
            f"PDU type 0x{pdu_type:02X} declares {length} bytes, over the limit of {limit}",
            ABORT_INVALID_PARAMETER,
        )
    return pdu_type, length, header


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send a short PDU without waiting long for a peer that does not read."""
    try:
        sock.settimeout(_SEND_TIMEOUT_S)
        sock.sendall(data)
    except OSError:
        pass


def abort_pdu(reason: int) -> bytes:
    """An A-ABORT PDU from the service provider (source 2) with ``reason``."""
    return bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, reason])


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU."""
    return bytes([0x03, 0, 0, 0, 0, 4, 0, result, source, reason])


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


@dataclass(slots=True)
class _Connection:
    """One accepted connection as the gate counts it."""

    address: str
    admitted: bool = False


@dataclass
class Gate:
    """Counts connections per address and admitted associations; decides on each A-ASSOCIATE-RQ."""

    limits: NetworkLimits
    allowed: AllowList
    metrics: NodeMetrics
    audit: AuditTrail = field(default_factory=AuditTrail.disabled)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _per_address: Counter[str] = field(default_factory=Counter)
    _waiting: Counter[str] = field(default_factory=Counter)  # per address, awaiting their RQ
    _pending: int = 0
    _active: int = 0

    @contextlib.contextmanager
    def connection(self, address: str) -> Iterator[_Connection | None]:
        """Count a connection from ``address`` for the duration of the block; None when too many
        connections (in all, or from this address) are already waiting for their A-ASSOCIATE-RQ:
        it is then closed unread."""
        with self._lock:
            if (
                self._pending >= PENDING_FACTOR * self.limits.max_associations
                or self._waiting[address] >= self.limits.max_per_address
            ):
                conn = None
            else:
                conn = _Connection(address)
                self._pending += 1
                self._waiting[address] += 1
                self._per_address[address] += 1
        if conn is None:
            log.warning(
                "connection from %s closed unread: too many connections await an A-ASSOCIATE-RQ", address
            )
            self.metrics.association("(unknown)", "closed_too_many_pending")
            yield None
            return
        try:
            yield conn
        finally:
            with self._lock:
                if conn.admitted:
                    self._active -= 1
                else:
                    self._pending -= 1
                    self._uncount(self._waiting, address)
                self._uncount(self._per_address, address)

    @staticmethod
    def _uncount(counter: Counter[str], address: str) -> None:
        counter[address] -= 1
        if counter[address] <= 0:
            del counter[address]

    def decide(self, conn: _Connection, calling: str, called: str) -> tuple[int, int, int] | None:
        """The A-ASSOCIATE-RJ (result, source, reason) for this request, or None when it is
        admitted (then it holds an association slot until the connection ends)."""
        address = conn.address
        shown = shown_ae(calling)
        if not self.allowed.allows(calling, address):
            log.warning(
                "association from %s at %s rejected: not in dicom.allowed_calling_aets", shown, address
            )
            self.audit.association_refused(calling, address, "not in dicom.allowed_calling_aets")
            label = calling if self.allowed.knows(calling) else "(unlisted)"
            self.metrics.association(label, "rejected_not_allowed")
            return REJECT_CALLING_AE
        label = calling if (not self.allowed or self.allowed.knows(calling)) else "(unlisted)"
        if self.limits.require_called_ae_title and called.strip() != self.limits.ae_title.strip():
            log.warning(
                "association from %s at %s rejected: called AE title %s is not %s",
                shown,
                address,
                shown_ae(called),
                self.limits.ae_title,
            )
            self.metrics.association(label, "rejected_called_ae")
            return REJECT_CALLED_AE
        with self._lock:
            others = self._per_address[address] - 1
            if others >= self.limits.max_per_address:
                outcome = "rejected_address_limit"
            elif self._active >= self.limits.max_associations:
                outcome = "rejected_no_slot"
            else:
                outcome = None
                conn.admitted = True
                self._pending -= 1
                self._uncount(self._waiting, address)
                self._active += 1
        if outcome is not None:
            why = (
                f"{others} other connections from this address (dicom.max_associations_per_address)"
                if outcome == "rejected_address_limit"
                else f"all {self.limits.max_associations} association slots in use"
            )
            log.warning("association from %s at %s rejected (transient): %s", shown, address, why)
            self.metrics.association(label, outcome)
            return REJECT_LIMIT
        return None

    def refused(self, exc: PduRefused, address: str, calling: str | None = None) -> None:
        """Log and count a PDU that broke a limit."""
        who = f"{shown_ae(calling)} at {address}" if calling is not None else address
        log.warning("connection from %s %s: %s", who, exc.outcome.split("_", 1)[0], exc)
        self.metrics.association("(unknown)" if calling is None else calling, exc.outcome)

    def in_use(self) -> int:
        """Association slots held (admitted associations not yet ended)."""
        with self._lock:
            return self._active

    def has_free_slot(self) -> bool:
        """True while another association could be admitted."""
        return self.in_use() < self.limits.max_associations


def _memoized(validate: Callable[[str, Any], tuple[bool, str]]) -> Callable[[str, Any], tuple[bool, str]]:
    """A pydicom value validator remembering its answers for string values (a pure function of the
    VR and the text): pydicom validates every UID each time a UID object is made from a string, and
    pynetdicom makes ~1,500 of them per association (decoding the A-ASSOCIATE-RQ, negotiating,
    encoding the A-ASSOCIATE-AC), each a regular expression match, ~40 % of an association's CPU.
    pydicom's validate_value still warns or raises on every invalid value as before."""
    cached = functools.lru_cache(maxsize=4096)(validate)

    def validator(vr: str, value: Any) -> tuple[bool, str]:
        if isinstance(value, str) and len(value) <= 256:
            return cached(vr, value)
        return validate(vr, value)

    validator.memoized = True  # type: ignore[attr-defined]
    return validator


@functools.lru_cache(maxsize=4096)
def _uid_is_valid(uid: str) -> bool:
    """pydicom 3.0's UID.is_valid (at most 64 characters, matching RE_VALID_UID), remembered: a
    pure function of the text, asked by pynetdicom of every UID it sets."""
    return len(uid) <= 64 and re.match(RE_VALID_UID, uid) is not None


def _memoized_pynetdicom(validate: Callable[[Any], tuple[bool, str]]) -> Callable[[Any], tuple[bool, str]]:
    """pynetdicom's UID validator (``_config.VALIDATORS["UI"]``, which imports its configuration
    on every call) remembering its answers per text and ``_config.ENFORCE_UID_CONFORMANCE``."""
    cached = functools.lru_cache(maxsize=4096)(lambda value, _enforce: validate(value))

    def validator(value: Any) -> tuple[bool, str]:
        if isinstance(value, str) and len(value) <= 256:
            return cached(value, pynetdicom_config.ENFORCE_UID_CONFORMANCE)
        return validate(value)

    return validator


def remember_uid_checks() -> None:
    """Make pydicom's and pynetdicom's UID checks remember their answers, for this process (they
    answer as before, and pydicom still warns on every invalid value); called when the node's
    DICOM server starts, at most once in effect."""
    if not getattr(VALIDATORS["UI"], "memoized", False):
        VALIDATORS["UI"] = _memoized(VALIDATORS["UI"])
        UID.is_valid = property(_uid_is_valid)  # type: ignore[assignment, method-assign]
        pynetdicom_config.VALIDATORS["UI"] = _memoized_pynetdicom(pynetdicom_config.VALIDATORS["UI"])


class _Waker:
    """Wakes an association's two threads: a socket pair for the DUL's poll, an event for the
    reactor. Closed sockets report fileno -1, so a stale poll can never read another connection's
    descriptor."""

    def __init__(self) -> None:
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        self.event = threading.Event()

    def fileno(self) -> int:
        """The end the DUL's poll waits on."""
        return self._read.fileno()

    def wake_dul(self) -> None:
        """Something was queued for the DUL thread to send."""
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._write.send(b"\0")

    def wake_reactor(self) -> None:
        """Something was queued for the association thread."""
        self.event.set()

    def drain(self) -> None:
        """Empty the pair (after poll said it is readable)."""
        with contextlib.suppress(OSError):
            while self._read.recv(512):
                pass

    def close(self) -> None:
        """Close the pair (once both threads ended)."""
        self._read.close()
        self._write.close()


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``on_put`` after each put."""

    def __init__(self, on_put: Callable[[], None]) -> None:
        super().__init__()
        self._on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put, then wake the consumer."""
        super().put(item, block, timeout)
        self._on_put()


class LimitedSocket(AssociationSocket):
    """pynetdicom's socket with the gate's first PDU replayed, per-PDU length limits and
    deadlines (see the module docstring), and a ``ready`` that sleeps in select."""

    def __init__(
        self,
        assoc: Association,
        client_socket: socket.socket,
        first_pdu: bytes,
        limits: NetworkLimits,
        gate: Gate,
        waker: _Waker,
    ) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._replay = bytearray(first_pdu)
        self._limits = limits
        self._gate = gate
        self._waker = waker
        self._deadline: float | None = None  # set while a PDU is being read
        self._poller: tuple[int, select.poll] | None = None  # poll() has no FD_SETSIZE limit

    @property
    def ready(self) -> bool:
        """True when there is data to read; otherwise waits up to IDLE_WAIT_S for it (or for a
        PDU to send, then returns False so that the DUL sends it)."""
        if self._replay:
            return True
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        # no waiting while the DUL has events to process, or while it waits for the peer to close
        # after a release or an abort (Sta13, where pynetdicom's check is a poll)
        dul = self.assoc.dul
        busy = not dul.event_queue.empty() or dul.state_machine.current_state == "Sta13"
        wait = 0.0 if busy else IDLE_WAIT_S
        try:
            fd = sock.fileno()
            if self._poller is None or self._poller[0] != fd:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.register(self._waker, select.POLLIN)
                self._poller = (fd, poller)
            events = dict(self._poller[1].poll(wait * 1000))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self._waker.fileno() in events:
            self._waker.drain()
        return fd in events  # readable, or hung up / failed (recv then says so)

    def recv(self, nr_bytes: int) -> bytearray:
        """The DUL reads a PDU as recv(6) then recv(length): the header starts the PDU's deadline
        and is checked against the limits before the body is read. A refusal sends an A-ABORT,
        closes the connection and returns a short read (the DUL then sees the transport close)."""
        if self._replay:
            chunk = self._replay[:nr_bytes]
            del self._replay[:nr_bytes]
            return chunk
        sock = cast(socket.socket, self.socket)
        try:
            if self._deadline is None:
                self._deadline = time.monotonic() + self._limits.pdu_timeout_s
                _, length, header = read_header(sock, self._deadline, self._limits)
                if length == 0:
                    self._deadline = None
                return header
            deadline, self._deadline = self._deadline, None
            body = _recv_exact(sock, nr_bytes, deadline, "a PDU")
            sock.settimeout(self._limits.pdu_timeout_s)  # what pynetdicom's sends then wait at most
            return body
        except PduRefused as exc:
            self._deadline = None
            self._gate.refused(exc, self.assoc.requestor.address, self.assoc.requestor.ae_title)
            _send_quietly(sock, abort_pdu(exc.abort_reason))
            _shutdown(sock)
            return bytearray(exc.partial)
        except PeerClosed as exc:
            self._deadline = None
            return bytearray(exc.partial)


class QuietAssociation(Association):
    """An acceptor association whose reactor waits on an event instead of polling every 1 ms."""

    def __init__(self, ae: ApplicationEntity, waker: _Waker) -> None:
        self._waker = waker
        self._kill_flag = False
        super().__init__(ae, MODE_ACCEPTOR)
        self.dimse.msg_queue = _WakingQueue(waker.wake_reactor)
        self.dul.to_user_queue = _WakingQueue(waker.wake_reactor)
        self.dul.to_provider_queue = _WakingQueue(waker.wake_dul)

    @property
    def _kill(self) -> bool:
        return self._kill_flag

    @_kill.setter
    def _kill(self, value: bool) -> None:
        self._kill_flag = value
        if value:
            self._waker.wake_reactor()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's acceptor loop (Association._run_reactor), waiting for a wake-up (at
        most IDLE_WAIT_S, for the idle timer) instead of sleeping 1 ms between checks."""
        self._is_paused = False
        busy = False
        while not self._kill:
            if not busy:
                self._waker.event.wait(IDLE_WAIT_S)
            self._waker.event.clear()
            busy = False

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                busy = True
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.warning(
                    "association from %s at %s aborted: idle for dicom.network_timeout_s",
                    shown_ae(self.requestor.ae_title),
                    self.requestor.address,
                )
                self.abort()
                self.kill()
                return


class GatedHandler(RequestHandler):
    """Runs the gate on a new connection, then the association, in the connection's thread; the
    thread (and the connection's place in the gate's counts) ends when the association does."""

    server: GatedServer

    def handle(self) -> None:
        """Gate the connection, then run its association to the end."""
        sock = cast(socket.socket, self.request)
        address = str(self.client_address[0])
        gate = self.server.gate
        try:
            with gate.connection(address) as conn:
                if conn is None:
                    return
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                first = self._read_request(sock, gate, address)
                if first is None:
                    return
                rq, data = first
                rejection = gate.decide(conn, rq.calling_ae_title, rq.called_ae_title)
                if rejection is not None:
                    _send_quietly(sock, reject_pdu(*rejection))
                    return
                self._run(sock, data, gate, rq)
        finally:
            self.server.shutdown_request(sock)

    @staticmethod
    def _read_request(sock: socket.socket, gate: Gate, address: str) -> tuple[A_ASSOCIATE_RQ, bytes] | None:
        """The connection's A-ASSOCIATE-RQ (decoded, and as read), or None when it was refused."""
        limits = gate.limits
        deadline = time.monotonic() + limits.rq_timeout_s
        try:
            pdu_type, length, header = read_header(sock, deadline, limits)
            if pdu_type != ASSOCIATE_RQ_TYPE:
                raise PduRefused(
                    "aborted_not_associate_rq",
                    f"first PDU is type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
                    ABORT_UNEXPECTED_PDU,
                )
            body = _recv_exact(sock, length, deadline, "the A-ASSOCIATE-RQ")
        except PeerClosed:
            return None
        except PduTimeout as exc:  # ARTIM expired in Sta2: close, no A-ABORT (PS3.8 9.2, AA-2)
            exc.outcome = "closed_rq_timeout"
            gate.refused(exc, address)
            return None
        except PduRefused as exc:
            gate.refused(exc, address)
            _send_quietly(sock, abort_pdu(exc.abort_reason))
            return None
        data = bytes(header + body)
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(data)
        except Exception as exc:  # any malformed field: pynetdicom raises several kinds
            why = f"undecodable A-ASSOCIATE-RQ ({type(exc).__name__})"
            gate.refused(PduRefused("aborted_invalid_rq", why, ABORT_INVALID_PARAMETER), address)
            _send_quietly(sock, abort_pdu(ABORT_INVALID_PARAMETER))
            return None
        return rq, data

    def _run(self, sock: socket.socket, first_pdu: bytes, gate: Gate, rq: A_ASSOCIATE_RQ) -> None:
        waker = _Waker()
        assoc = self._gated_association(sock, first_pdu, gate, waker)
        _decoded_once(assoc.dul, first_pdu, rq)
        try:
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
            assoc.join()
            if assoc.dul.is_alive():
                assoc.dul.join(max(gate.limits.pdu_timeout_s, 1.0))
        finally:
            if not assoc.dul.is_alive():
                waker.close()  # otherwise garbage collection closes it

    def _gated_association(
        self, sock: socket.socket, first_pdu: bytes, gate: Gate, waker: _Waker
    ) -> QuietAssociation:
        """pynetdicom 3.0's RequestHandler._create_association with our association and socket."""
        ae = self.ae
        assoc = QuietAssociation(ae, waker)
        assoc._server = self.server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(LimitedSocket(assoc, sock, first_pdu, gate.limits, gate, waker))
        assoc.acceptor.maximum_length = ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote
        for event in self.server._handlers:
            if event.is_intervention and self.server._handlers[event]:
                assoc.bind(event, *self.server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in self.server._handlers[event]:
                    handler = cast(evt._HandlerBase, handler)
                    assoc.bind(event, handler[0], handler[1])
        return assoc


def _decoded_once(dul: DULServiceProvider, first_pdu: bytes, rq: A_ASSOCIATE_RQ) -> None:
    """Let the DUL take the A-ASSOCIATE-RQ the gate already decoded instead of decoding its bytes
    again when they are replayed (decoding the ~14 kB request of ~120 contexts costs ~4 ms of CPU,
    per association). The first PDU the DUL reads is those bytes; it gets the same PDU object and
    the same events (EVT_DATA_RECV with the bytes, EVT_PDU_RECV with the PDU) as pynetdicom 3.0's
    DULServiceProvider._decode_pdu gives; anything else goes to that method as before."""
    original = dul._decode_pdu

    def decode(bytestream: bytearray) -> tuple[Any, str]:
        dul._decode_pdu = original  # type: ignore[method-assign]  # once
        data = bytes(bytestream)
        if data != first_pdu:
            return original(bytestream)
        evt.trigger(dul.assoc, evt.EVT_DATA_RECV, {"data": data})
        evt.trigger(dul.assoc, evt.EVT_PDU_RECV, {"pdu": rq})
        return rq, ASSOCIATE_RQ_EVENT

    dul._decode_pdu = decode  # type: ignore[method-assign]


class GatedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the gate in front of every association."""

    daemon_threads = True  # a connection's thread now lives as long as its association
    block_on_close = False  # stopping the listener does not wait for open associations

    def __init__(
        self,
        ae: ApplicationEntity,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[evt.EventHandlerType] | None = None,
        *,
        gate: Gate,
        reuse_port: bool = False,
    ) -> None:
        """As ``ae.make_server`` calls it (its ``server_class``), with the gate and the port sharing."""
        self.gate = gate
        self.reuse_port = reuse_port
        super().__init__(  # binds
            ae, address, ae_title, contexts, ssl_context, evt_handlers, request_handler=GatedHandler
        )

    def server_bind(self) -> None:
        """pynetdicom's bind, with ``SO_REUSEPORT`` first when several receiving processes of this
        host share the port (``dicom.reuse_port``): the kernel then spreads new connections over
        the processes listening, and stops giving any to one that has exited."""
        if self.reuse_port:
            cast(socket.socket, self.socket).setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def start_gated_server(
    ae: ApplicationEntity,
    address: tuple[str, int],
    gate: Gate,
    evt_handlers: list[Any],
    contexts: list[Any],
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> GatedServer:
    """Bind and serve in a background thread, like ``ae.start_server(block=False)``;
    ``reuse_port``: share the port with the other processes that bind it so (SO_REUSEPORT)."""
    remember_uid_checks()
    server = ae.make_server(
        address,
        contexts=contexts,
        ssl_context=ssl_context,
        evt_handlers=evt_handlers,
        server_class=GatedServer,
        gate=gate,
        reuse_port=reuse_port,
    )
    thread = threading.Thread(
        target=server.serve_forever, name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}", daemon=True
    )
    thread.start()
    ae._servers.append(server)
    return cast(GatedServer, server)
