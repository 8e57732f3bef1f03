"""Hardening of the web side (issue 21): request bodies cut at the limit while they stream in,
Host and Origin checks (DNS rebinding, cross-site requests), CSRF tokens on the forms, security
headers, Secure cookies over https, API docs without a CDN, 4xx for out-of-range integers, and
/readyz noticing a database that takes no writes."""

from __future__ import annotations

import os
import re
import select
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine

from node.web.factory import create_web_app
from node.web.guard import script_hashes
from tests.helpers import free_port, wait_port
from tests.web.conftest import ADMIN_TOKEN, READ_TOKEN, TOKENS, chromium

EVIL = "http://evil.example"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def form_csrf(html: str) -> str:
    """The CSRF token a page's forms carry."""
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


@pytest.fixture
def open_client(make_node) -> TestClient:
    """A node with no tokens (the loopback default: everybody is admin)."""
    return TestClient(make_node().web_app(), follow_redirects=False)


@pytest.fixture
def token_client(make_node) -> TestClient:
    return TestClient(make_node(web={"tokens": TOKENS}).web_app(), follow_redirects=False)


# --- the upload is cut at the limit while it streams in -------------------------------------------


class TempWatch:
    """Largest number of bytes this process held in new anonymous files of the temp folder (the
    multipart parser spools uploads to unlinked temporary files: found through /proc/self/fd;
    files already open when the watch starts, and files with a name, are not counted)."""

    def __init__(self) -> None:
        self.folder = os.path.realpath(tempfile.gettempdir())
        self.largest = 0
        self._before = set(self._files())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _files(self) -> Iterator[tuple[str, int]]:
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(self.folder + "/") and target.endswith(" (deleted)"):
                    yield fd, os.stat(f"/proc/self/fd/{fd}").st_ino
            except OSError:
                continue

    def _total(self) -> int:
        total = 0
        for fd, inode in self._files():
            if (fd, inode) in self._before:
                continue
            try:
                total += os.stat(f"/proc/self/fd/{fd}").st_size
            except OSError:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.largest = max(self.largest, self._total())
            time.sleep(0.002)

    def __enter__(self) -> TempWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def server(make_node) -> Iterator[tuple[int, int]]:
    """The web app of a node with a 1 MiB upload limit, served by uvicorn on a loopback port:
    (port, the upload limit in bytes)."""
    node = make_node(web={"max_upload_mb": 1})
    port = free_port()
    config = uvicorn.Config(create_web_app(node), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_port(port)
    yield port, 2**20
    uv.should_exit = True
    thread.join(10)


BOUNDARY = "pacsnodeboundary"
HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.dcm"\r\n'
    "Content-Type: application/dicom\r\n\r\n"
).encode()


def _complete(answer: bytes) -> bool:
    """True when ``answer`` holds a whole response (head, and the body its Content-Length gives)."""
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return length is None or len(body) >= int(length.group(1))


def _send_upload(port: int, headers: str, chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send a request's head and then its body chunk by chunk, reading whenever the server
    answers; returns (the server's whole answer, body bytes sent before it came)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(headers.encode())
    sock.setblocking(False)
    answer = b""
    sent = 0

    def read() -> bool:
        """Read what is there; True when the answer is complete or the server closed."""
        nonlocal answer
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return False
        except ConnectionResetError:
            return True
        answer += data
        return not data or _complete(answer)

    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                readable, writable, _ = select.select([sock], [sock], [], 10)
                if readable and read():
                    return answer, sent
                if answer:  # the server answered: it reads no more
                    break
                if writable:
                    try:
                        n = sock.send(view)
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    sent += n
                    view = view[n:]
                if not readable and not writable:
                    raise TimeoutError("the server neither reads nor answers")
            if answer:
                break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if select.select([sock], [], [], 1)[0] and read():
                break
        return answer, sent
    finally:
        sock.close()


def _status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def test_chunked_upload_is_cut_at_the_limit(server):
    port, limit = server
    total = 24 * 2**20  # 24 times the limit, with no Content-Length

    def chunks() -> Iterator[bytes]:
        block = b"\0" * 65536
        for piece in (HEAD, *([block] * (total // len(block))), f"\r\n--{BOUNDARY}--\r\n".encode()):
            yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        yield b"0\r\n\r\n"

    head = (
        f"POST /api/v1/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    with TempWatch() as watch:
        answer, sent = _send_upload(port, head, chunks())
    # at most the limit (plus the multipart framing) reached the disk, never the whole upload
    assert watch.largest <= limit + 128 * 1024, f"{watch.largest} bytes spooled with a {limit} byte limit"
    assert _status(answer) == 413, answer[:300]
    assert sent < total / 2, f"the server read {sent} bytes of the body before it answered"


def test_declared_content_length_over_the_limit_is_refused_before_the_body(server):
    port, limit = server
    head = (
        f"POST /api/v1/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {400 * 2**20}\r\n\r\n"
    )
    with TempWatch() as watch:
        answer, sent = _send_upload(port, head, iter([HEAD + b"\0" * 65536] * 64))
    assert _status(answer) == 413
    assert b"the limit is" in answer
    assert watch.largest <= limit


def test_body_longer_than_its_content_length_is_not_read_beyond_it(server):
    """A lying Content-Length (under the limit, with far more bytes behind it): only the declared
    bytes are the body, so the upload is incomplete (400) and nothing beyond the limit is spooled."""
    port, limit = server
    declared = limit // 2
    head = (
        f"POST /api/v1/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {declared}\r\n\r\n"
    )
    with TempWatch() as watch:
        answer, _ = _send_upload(port, head, iter([HEAD, *([b"\0" * 65536] * 128)]))
    assert 400 <= _status(answer) < 500
    assert watch.largest <= limit


def test_form_posts_have_a_small_limit(open_client):
    answer = open_client.post("/retry", content=b"job_id=1&back=" + b"x" * 200_000,
                              headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert answer.status_code == 413


# --- Host header (DNS rebinding) -----------------------------------------------------------------


def test_host_header_must_name_this_server(open_client):
    refused = open_client.get("/api/v1/studies", headers={"Host": "rebound.evil.example:8080"})
    assert refused.status_code == 400
    assert "rebound.evil.example" in refused.json()["detail"]
    assert "web.allowed_hosts" in refused.json()["detail"]
    assert open_client.get("/", headers={"Host": "rebound.evil.example"}).status_code == 400
    for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080", "127.0.0.1"):
        assert open_client.get("/api/v1/studies", headers={"Host": host}).status_code == 200, host
    # probes and the scrape answer to any name (no patient data; reached by service names)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert open_client.get(path, headers={"Host": "pacs-node.monitoring.svc"}).status_code == 200, path


def test_allowed_hosts_setting(make_node):
    node = make_node(web={"allowed_hosts": ["pacs.example.org"]})
    client = TestClient(node.web_app())
    assert client.get("/api/v1/stats", headers={"Host": "pacs.example.org:8080"}).status_code == 200
    assert client.get("/api/v1/stats", headers={"Host": "localhost:8080"}).status_code == 400
    public = make_node(web={"public_url": "https://node.example.org/"})
    assert TestClient(public.web_app()).get("/", headers={"Host": "node.example.org"}).status_code == 200
    anything = make_node(web={"allowed_hosts": ["*"]})
    assert TestClient(anything.web_app()).get("/", headers={"Host": "x.example"}).status_code == 200


def test_host_check_on_a_real_server(server):
    port, _ = server
    import httpx

    assert httpx.get(f"http://127.0.0.1:{port}/api/v1/studies").status_code == 200
    rebound = httpx.get(f"http://127.0.0.1:{port}/api/v1/studies", headers={"Host": f"evil.example:{port}"})
    assert rebound.status_code == 400


# --- Origin checks on state-changing requests ----------------------------------------------------


def test_cross_origin_posts_are_refused(open_client, tmp_path):
    # with no tokens, any page the browser has open could otherwise POST here
    for headers, why in [
        ({"Origin": EVIL}, "Origin"),
        ({"Origin": "null"}, "null"),
        ({"Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site"),
        ({"Sec-Fetch-Site": "same-site"}, "Sec-Fetch-Site"),
        ({"Referer": f"{EVIL}/attack.html"}, "Referer"),
    ]:
        answer = open_client.post("/api/v1/retry", headers=headers)
        assert answer.status_code == 403, headers
        assert "cross-origin request refused" in answer.json()["detail"] and why in answer.json()["detail"]
    upload = open_client.post(
        "/api/v1/infer", files={"file": ("x.dcm", b"\0" * 1000)}, headers={"Origin": EVIL}
    )
    assert upload.status_code == 403
    # the same origin, a typed URL, and clients that are not browsers pass
    for headers in [
        {"Origin": "http://testserver"},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
        {"Referer": "http://testserver/studies"},
        {},
    ]:
        assert open_client.post("/api/v1/retry", headers=headers).status_code == 200, headers
    # reads are not state changes
    assert open_client.get("/api/v1/studies", headers={"Origin": EVIL}).status_code == 200


def test_origin_of_the_public_url_is_this_server(make_node):
    node = make_node(web={"public_url": "https://node.example.org"})
    client = TestClient(node.web_app())
    # behind a proxy: the Host the node sees is its own, the page's origin is the public one
    ok = client.post("/api/v1/retry", headers={"Origin": "https://node.example.org"})
    assert ok.status_code == 200
    assert client.post("/api/v1/retry", headers={"Origin": "https://other.example.org"}).status_code == 403


# --- CSRF tokens on the forms --------------------------------------------------------------------


def test_retry_form_needs_the_csrf_token(open_client):
    page = open_client.get("/login")  # any page sets the cookie; this one always has a form
    assert page.status_code == 200
    token = form_csrf(page.text)
    cookie = page.headers["set-cookie"].lower()
    assert "pacs_node_csrf=" in cookie and "httponly" in cookie and "samesite=strict" in cookie
    missing = open_client.post("/retry", data={"back": "/"})
    assert missing.status_code == 403 and "CSRF" in missing.json()["detail"]
    wrong = open_client.post("/retry", data={"back": "/", "csrf": "x" * 43})
    assert wrong.status_code == 403
    done = open_client.post("/retry", data={"back": "/studies", "csrf": token})
    assert done.status_code == 303 and done.headers["location"] == "/studies"
    # another browser (no cookie) with a stolen token gets nowhere either
    other = TestClient(open_client.app, follow_redirects=False)
    assert other.post("/retry", data={"back": "/", "csrf": token}).status_code == 403


def test_login_csrf(token_client):
    # another site's sign-in form (no CSRF cookie here): no cookie is set, back to the form
    forged = token_client.post("/login", data={"token": READ_TOKEN, "next": "/"})
    assert forged.status_code == 303 and forged.headers["location"].startswith("/login?error=expired")
    assert "pacs_node_token" not in forged.headers.get("set-cookie", "")
    assert "expired" in token_client.get(forged.headers["location"]).text
    token = form_csrf(token_client.get("/login").text)
    good = token_client.post("/login", data={"token": READ_TOKEN, "next": "/", "csrf": token})
    assert good.status_code == 303 and good.headers["location"] == "/"
    assert "pacs_node_token=" in good.headers["set-cookie"]


def test_bearer_clients_need_no_csrf_token(token_client):
    form = token_client.post("/retry", data={"back": "/studies"}, headers=bearer(ADMIN_TOKEN))
    assert form.status_code == 303
    assert token_client.post("/api/v1/retry", headers=bearer(ADMIN_TOKEN)).status_code == 200


# --- security headers, cookies over https, docs without a CDN -----------------------------------


def test_security_headers_on_every_response(open_client):
    for path in (
        "/",
        "/worklist",
        "/studies",
        "/login",
        "/api/v1/studies",
        "/healthz",
        "/nowhere",
        "/api/docs",
    ):
        answer = open_client.get(path)
        headers = answer.headers
        csp = headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp, path
        script_src = re.search(r"script-src ([^;]*)", csp).group(1)
        assert "'unsafe-inline'" not in script_src and "'unsafe-eval'" not in script_src, path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "same-origin", path
    refused = open_client.get("/", headers={"Host": "evil.example"})
    assert refused.headers["x-frame-options"] == "DENY"


def test_pages_have_no_inline_script(open_client):
    for path in ("/", "/worklist", "/studies", "/login"):
        html = open_client.get(path).text
        scripts = re.findall(r"<script([^>]*)>", html)
        assert scripts, path
        assert all("src=" in attrs for attrs in scripts), (path, scripts)
        assert not re.search(r"<[^>]+\son[a-z]+\s*=", html), path  # no inline event handlers
        assert "javascript:" not in html, path
    assert open_client.get("/static/pages.js").status_code == 200


def test_cookie_is_secure_over_https(make_node):
    node = make_node(web={"tokens": TOKENS})
    for base, secure in (("https://testserver", True), ("http://testserver", False)):
        client = TestClient(node.web_app(), base_url=base, follow_redirects=False)
        login = client.get("/login")
        assert ("secure" in login.headers["set-cookie"].lower()) is secure, base
        answer = client.post("/login", data={"token": READ_TOKEN, "csrf": form_csrf(login.text)})
        assert answer.status_code == 303
        assert ("secure" in answer.headers["set-cookie"].lower()) is secure, base
    public = make_node(web={"tokens": TOKENS, "public_url": "https://node.example.org"})
    login = TestClient(public.web_app()).get("/login")
    assert "secure" in login.headers["set-cookie"].lower()


def test_api_docs_are_served_locally(open_client):
    for path in ("/api/docs", "/api/redoc"):
        html = open_client.get(path).text
        assert "cdn." not in html and "https://" not in html, path
        for asset in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert asset.startswith("/"), (path, asset)
            answer = open_client.get(asset)
            assert answer.status_code == 200 and len(answer.content) > 1000, asset
    docs = open_client.get("/api/docs")
    hashes = script_hashes(docs.content)
    assert hashes and all(h in docs.headers["content-security-policy"] for h in hashes)


def test_pages_and_api_docs_render_in_a_browser_under_the_csp(tmp_path, make_node):
    """Headless Chromium (no network here) renders the pages, Swagger UI and ReDoc from the node
    alone, and reports no Content-Security-Policy violation (but ReDoc's own footer logo, which
    its bundle fetches from a CDN: the CSP blocks it, as it should)."""
    node = make_node()
    port = free_port()
    uv = uvicorn.Server(
        uvicorn.Config(create_web_app(node), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_port(port)
    try:
        for path, rendered in (
            ("/", 'data-sideways-scroll="false"'),  # set by /static/pages.js: the script ran
            ("/api/docs", "opblock"),  # an operation block of Swagger UI
            ("/api/redoc", "/api/v1/studies"),
        ):
            run = subprocess.run(
                [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
                 "--virtual-time-budget=8000", "--dump-dom", f"http://127.0.0.1:{port}{path}"],
                capture_output=True, text=True, timeout=90, check=True,
            )  # fmt: skip
            assert rendered in run.stdout, (path, run.stdout[:2000])
            violations = [
                line
                for line in run.stderr.splitlines()
                if "Content Security Policy" in line and "cdn.redoc.ly/redoc/logo-mini.svg" not in line
            ]
            assert not violations, (path, violations)
    finally:
        uv.should_exit = True
        thread.join(10)


# --- integers beyond 64 bits ---------------------------------------------------------------------


def test_out_of_range_integers_are_client_errors(make_node):
    client = TestClient(make_node().web_app(), raise_server_exceptions=False, follow_redirects=False)
    huge = "999999999999999999999999"
    for path, name in [
        (f"/api/v1/jobs/{huge}", "job_id"),
        (f"/api/v1/jobs?offset={10**30}", "offset"),
        (f"/api/v1/studies?offset={10**30}", "offset"),
        (f"/api/v1/outbox?offset={10**30}", "offset"),
        (f"/api/v1/studies?limit={10**30}", "limit"),
        (f"/studies?offset={10**30}", "offset"),
        (f"/jobs/{huge}/heatmaps/1.2.3.png", "job_id"),
    ]:
        answer = client.get(path)
        assert answer.status_code == 422, (path, answer.status_code, answer.text[:200])
        assert name in answer.text, path
    assert client.post(f"/api/v1/jobs/{huge}/retry").status_code == 422
    csrf = form_csrf(client.get("/login").text)
    assert client.post("/retry", data={"job_id": huge, "csrf": csrf}).status_code == 422
    # the largest id the id columns hold (SQL INTEGER: 32 bits on PostgreSQL) is a fine question
    assert client.get(f"/api/v1/jobs/{2**31 - 1}").status_code == 404
    assert client.get(f"/api/v1/jobs/{2**31}").status_code == 422


# --- /readyz: the database takes writes ----------------------------------------------------------


def test_readyz_reports_a_database_that_takes_no_writes(make_node):
    node = make_node()
    if node.engine.dialect.name != "sqlite":
        pytest.skip("the read-only and locked cases are made with SQLite files")
    client = TestClient(node.web_app())
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database_writable"] is True
    path = Path(node.engine.url.database)
    engine = node.engine
    node.engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")  # as if the file went read-only
    try:
        answer = client.get("/readyz")
    finally:
        node.engine.dispose()
        node.engine = engine
    assert answer.status_code == 503
    assert answer.json()["checks"]["database"] is True  # it still answers reads
    assert answer.json()["checks"]["database_writable"] is False
    # a writer that holds the lock and never lets go
    holder = sqlite3.connect(path, timeout=1)
    holder.execute("BEGIN IMMEDIATE")
    try:
        locked = client.get("/readyz")
    finally:
        holder.rollback()
        holder.close()
    assert locked.status_code == 503 and locked.json()["checks"]["database_writable"] is False
    assert client.get("/readyz").json()["checks"]["database_writable"] is True
