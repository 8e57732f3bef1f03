"""The web server's outer guard, one ASGI middleware in front of every route:

- the Host header must name this server (``web.allowed_hosts``; against DNS rebinding): 400 otherwise;
- a state-changing request (POST, PUT, PATCH, DELETE) from a browser must come from this origin
  (Origin, else Sec-Fetch-Site, else Referer): 403 naming why otherwise. Clients that send none of
  these headers (scripts, curl) are not browsers and pass;
- a declared Content-Length above the route's body limit is refused at once with 413 (the limit
  on what is actually read, chunked bodies included, is FastAPI's ``max_body_size``);
- every response carries the security headers (CSP, X-Frame-Options, nosniff, Referrer-Policy).

The API docs page (Swagger UI, served from a local package) has one inline script, written by
FastAPI from the app's own settings and never from a request: its hash goes into that page's CSP.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node.settings import WebSettings

log = logging.getLogger(__name__)

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Probes and the Prometheus scrape answer to any Host: they hold no patient data and are reached by
#: whatever name the orchestrator or scraper uses.
HOST_EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})
_WILDCARD_BINDS = {"", "0.0.0.0", "::", "[::]"}
_LOOPBACK = {"localhost", "127.0.0.1", "::1"}

#: Pages: scripts and styles only from this server (style attributes allowed), images also as data:.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: The docs pages: Swagger UI and ReDoc set inline styles, ReDoc runs a worker from a blob.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # not no-referrer: browsers then send "Origin: null" on our own forms
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)


def _host_name(value: str) -> str:
    """The name of a Host header or netloc, lower case, without port and IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_host_names(web: WebSettings) -> frozenset[str] | None:
    """The host names the server answers to; None when the check is off (``'*'``)."""
    if "*" in web.allowed_hosts:
        return None
    if web.allowed_hosts:
        return frozenset(_host_name(h) for h in web.allowed_hosts)
    names = set(_LOOPBACK)
    host = web.host.strip().lower()
    if host not in _WILDCARD_BINDS:
        names.add(_host_name(host) if host.startswith("[") else host)
    if web.public_url:
        public = urlsplit(web.public_url).hostname
        if public:
            names.add(public.lower())
    if host not in _LOOPBACK:  # reached from other machines: by this machine's names too
        names.update(n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n)
    return frozenset(names)


def _normal_netloc(netloc: str, scheme: str) -> str:
    """``host[:port]`` lower case, without the scheme's default port."""
    netloc = netloc.strip().lower()
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    return netloc[: -len(default)] if default and netloc.endswith(default) else netloc


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, and with which status."""

    status: int
    detail: str


def check_host(scope: Scope, headers: Headers, names: frozenset[str] | None) -> Refusal | None:
    """Refuse a Host header that names another server (a DNS-rebinding page, say)."""
    if names is None or scope["path"] in HOST_EXEMPT:
        return None
    host = headers.get("host", "")
    name = _host_name(host)
    server = scope.get("server")
    local = str(server[0]).lower() if server else None
    if name in names or (local is not None and name == _host_name(local)):
        return None
    shown = host[:100] if host.isprintable() else repr(host[:100])
    return Refusal(
        400,
        f"the Host header {shown!r} does not name this server; add it to web.allowed_hosts "
        "(or set web.public_url) if that is how it is reached",
    )


def check_origin(scope: Scope, headers: Headers, public_netloc: str) -> Refusal | None:
    """Refuse a state-changing request that a browser sent from another origin (``public_netloc``:
    the host[:port] of web.public_url, also this server; "" when none)."""
    if scope["method"] not in STATE_CHANGING:
        return None
    here = headers.get("host", "").strip().lower()

    def same(url: str) -> bool:
        parts = urlsplit(url)
        netloc = _normal_netloc(parts.netloc, parts.scheme)
        return bool(netloc) and netloc in (_normal_netloc(here, parts.scheme), public_netloc)

    origin = headers.get("origin")
    if origin is not None:
        if origin.strip().lower() == "null":
            return Refusal(403, "cross-origin request refused: the Origin is null (a sandboxed page)")
        if not same(origin):
            return Refusal(403, f"cross-origin request refused: Origin {origin[:100]!r} is not this server")
        return None
    site = headers.get("sec-fetch-site")
    if site is not None:
        if site.strip().lower() not in ("same-origin", "none"):
            return Refusal(403, f"cross-origin request refused: Sec-Fetch-Site is {site[:20]!r}")
        return None
    referer = headers.get("referer")
    if referer and not same(referer):
        return Refusal(403, "cross-origin request refused: the Referer is another site")
    return None


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


class WebGuard:
    """ASGI middleware: Host and Origin checks, early 413, security headers (see the module)."""

    def __init__(
        self,
        app: ASGIApp,
        web: WebSettings,
        body_limit: Callable[[str], int],
        docs_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.names = allowed_host_names(web)
        public = urlsplit(web.public_url) if web.public_url else None
        self.public_netloc = _normal_netloc(public.netloc, public.scheme) if public and public.netloc else ""
        self.body_limit = body_limit
        self.docs_paths = frozenset(docs_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request; answer it ourselves when refused; add headers to every response."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = check_host(scope, headers, self.names) or check_origin(scope, headers, self.public_netloc)
        if refusal is None:
            declared = _content_length(headers)
            limit = self.body_limit(scope["path"])
            if declared is not None and declared > limit:
                refusal = Refusal(413, f"the request body is {declared} bytes; the limit is {limit} bytes")
        if refusal is not None:
            log.info("refused %s %s: %s", scope["method"], scope["path"][:200], refusal.detail)
            await self._answer(refusal, send)
            return
        if scope["path"] in self.docs_paths:
            await self.app(scope, receive, _DocsSender(send))
            return
        await self.app(scope, receive, _with_headers(send, PAGE_CSP))

    @staticmethod
    async def _answer(refusal: Refusal, send: Send) -> None:
        body = json.dumps({"detail": refusal.detail}).encode()
        headers = MutableHeaders(
            raw=[(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        )
        if refusal.status == 413:
            headers["connection"] = "close"
        _add_security_headers(headers, PAGE_CSP)
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers.raw})
        await send({"type": "http.response.body", "body": body})


def _add_security_headers(headers: MutableHeaders, csp: str) -> None:
    headers.setdefault("content-security-policy", csp)
    for name, value in SECURITY_HEADERS.items():
        headers.setdefault(name, value)


def _with_headers(send: Send, csp: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            _add_security_headers(MutableHeaders(scope=message), csp)
        await send(message)

    return wrapped


def script_hashes(html: bytes) -> list[str]:
    """CSP source expressions (``'sha256-...'``) for the inline scripts of an HTML page."""
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(html)
    ]


class _DocsSender:
    """Holds the docs page back until its end, then sends it with its inline scripts hashed in the
    CSP (the page is FastAPI's, built from the app's settings: no request data is in it)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.start: Message | None = None
        self.body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body" or self.start is None:
            await self.send(message)
            return
        self.body += message.get("body", b"")
        if message.get("more_body", False):
            return
        hashes = "".join(" " + h for h in script_hashes(bytes(self.body)))
        headers = MutableHeaders(scope=self.start)
        headers["content-length"] = str(len(self.body))
        _add_security_headers(headers, DOCS_CSP.format(hashes=hashes))
        await self.send(self.start)
        await self.send({"type": "http.response.body", "body": bytes(self.body)})
