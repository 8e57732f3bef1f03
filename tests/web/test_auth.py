"""Authentication: no token, wrong token, read-only vs admin, the sign-in cookie, open probes,
and the refusal to listen beyond loopback without tokens."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from node.errors import ConfigError
from node.settings import load_settings
from tests.web.conftest import ADMIN_TOKEN, READ_TOKEN, TOKENS


@pytest.fixture
def client(make_node) -> TestClient:
    node = make_node(web={"tokens": TOKENS})
    return TestClient(node.web_app(), follow_redirects=False)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_probes_are_open(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def test_no_token(client):
    answer = client.get("/api/v1/studies")
    assert answer.status_code == 401
    assert answer.json()["detail"] == "a bearer token is required"
    assert answer.headers["www-authenticate"] == "Bearer"
    for path in ("/api/v1/worklist", "/api/v1/models", "/api/v1/stats", "/api/v1/outbox", "/api/v1/jobs"):
        assert client.get(path).status_code == 401, path
    assert client.post("/api/v1/infer", files={"file": ("x.dcm", b"x")}).status_code == 401
    # pages send the browser to the sign-in form
    page = client.get("/worklist")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/worklist"
    assert client.post("/retry", data={"job_id": "1"}).status_code == 401


def test_wrong_token(client):
    answer = client.get("/api/v1/studies", headers=bearer("not-a-token"))
    assert answer.status_code == 401
    assert answer.json()["detail"] == "the bearer token is not valid"
    assert client.get("/", headers=bearer("not-a-token")).status_code == 303
    client.cookies.set("pacs_node_token", "not-a-token")
    assert client.get("/").status_code == 303


def test_read_only_token_reads_but_cannot_retry(client):
    assert client.get("/api/v1/studies", headers=bearer(READ_TOKEN)).status_code == 200
    assert client.get("/", headers=bearer(READ_TOKEN)).status_code == 200
    refused = client.post("/api/v1/retry", headers=bearer(READ_TOKEN))
    assert refused.status_code == 403
    assert "admin" in refused.json()["detail"]
    assert client.post("/retry", data={"job_id": "1"}, headers=bearer(READ_TOKEN)).status_code == 403
    assert client.post("/api/v1/jobs/1/retry", headers=bearer(READ_TOKEN)).status_code == 403


def test_admin_token_retries(client):
    done = client.post("/api/v1/retry", headers=bearer(ADMIN_TOKEN))
    assert done.status_code == 200 and done.json() == {"jobs": 0, "outputs": 0}
    assert client.post("/api/v1/jobs/999/retry", headers=bearer(ADMIN_TOKEN)).status_code == 404
    form = client.post("/retry", data={"back": "/studies"}, headers=bearer(ADMIN_TOKEN))
    assert form.status_code == 303 and form.headers["location"] == "/studies"


def form_csrf(html: str) -> str:
    """The CSRF token a page's forms carry."""
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field in the page"
    return match.group(1)


def test_login_cookie(client):
    csrf = form_csrf(client.get("/login").text)  # the form page sets the CSRF cookie
    bad = client.post("/login", data={"token": "nope", "next": "/worklist", "csrf": csrf})
    assert bad.status_code == 303 and bad.headers["location"] == "/login?error=1"
    assert "not valid" in client.get("/login?error=1").text
    good = client.post("/login", data={"token": READ_TOKEN, "next": "/worklist", "csrf": csrf})
    assert good.status_code == 303 and good.headers["location"] == "/worklist"
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    page = client.get("/worklist")
    assert page.status_code == 200 and "signed in: viewer (read)" in page.text
    assert client.get("/api/v1/stats").status_code == 200  # the cookie works for the API too
    assert client.post("/logout").status_code == 403  # the sign-out form carries the CSRF token too
    assert client.post("/logout", data={"csrf": form_csrf(page.text)}).status_code == 303


def test_no_tokens_means_open_on_loopback(make_node):
    client = TestClient(make_node().web_app())
    assert client.get("/api/v1/studies").status_code == 200
    assert client.post("/api/v1/retry").status_code == 200


def test_refuses_open_network_without_tokens(tmp_path):
    with pytest.raises(ConfigError, match="without authentication"):
        load_settings(None, web={"host": "0.0.0.0"})
    assert load_settings(None, web={"host": "0.0.0.0", "allow_open": True}).web.allow_open
    assert load_settings(None, web={"host": "0.0.0.0", "tokens": TOKENS}).web.tokens
    with pytest.raises(ConfigError, match="sha256"):
        load_settings(None, web={"tokens": [{"name": "x", "sha256": "abc"}]})
