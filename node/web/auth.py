"""Bearer-token authentication for the pages and the JSON API.

Tokens are configured as hex SHA-256 hashes (``web.tokens``), each with a role: ``read`` (pages
and API) or ``admin`` (also the retry buttons). A client sends ``Authorization: Bearer <token>``;
a browser signs in once through ``/login``, which stores the token in an HttpOnly, SameSite=Strict
cookie that is then accepted like the header. With no tokens configured (loopback only, unless
``web.allow_open``) nobody is asked and everybody is admin.

Every HTML form (sign-in and sign-out included) carries a CSRF token: a random value kept in a
second cookie and repeated in the form (double submit); a form POST whose field does not match the
cookie is refused. Clients that send ``Authorization: Bearer`` are not asked for it: a browser
cannot be made to add that header to another site's request. Cookies get ``Secure`` when the page
was served over https (directly, or through a proxy uvicorn trusts for X-Forwarded-Proto) or
``web.public_url`` is https.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from fastapi import HTTPException, Request
from fastapi.responses import Response

from node.settings import WebSettings

COOKIE = "pacs_node_token"
CSRF_COOKIE = "pacs_node_csrf"
CSRF_FIELD = "csrf"
_CSRF_VALUE = re.compile(r"^[A-Za-z0-9_-]{32,64}$")
ROLES = {"read": 0, "admin": 1}


@dataclass(frozen=True)
class Principal:
    """Who is asking: the token's name and role."""

    name: str
    role: str

    def can(self, role: str) -> bool:
        """True when this principal has ``role`` or a stronger one."""
        return ROLES[self.role] >= ROLES[role]


ANONYMOUS_ADMIN = Principal("anonymous (no tokens configured)", "admin")


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as configured in ``web.tokens[].sha256``."""
    return hashlib.sha256(token.encode()).hexdigest()


def presented_token(request: Request) -> str | None:
    """The bearer token of the Authorization header, else the sign-in cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(COOKIE) or None


def identify(web: WebSettings, token: str | None) -> Principal | None:
    """The principal for a token; None when unknown. Anonymous admin when no tokens are configured."""
    if not web.tokens:
        return ANONYMOUS_ADMIN
    if not token:
        return None
    digest = hash_token(token)
    for configured in web.tokens:
        if hmac.compare_digest(digest, configured.sha256.lower()):
            return Principal(configured.name, configured.role)
    return None


class LoginRequired(Exception):
    """A page was asked for without a valid token: the app redirects to /login."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def check(request: Request, role: str, page: bool = False) -> Principal:
    """The caller's principal if it has ``role``; else 401 (no or unknown token: pages redirect
    to the sign-in form instead) or 403 (known token, weaker role)."""
    web: WebSettings = request.app.state.node.settings.web
    token = presented_token(request)
    principal = identify(web, token)
    if principal is None:
        if page and request.method == "GET":
            raise LoginRequired(str(request.url.path))
        detail = "a bearer token is required" if not token else "the bearer token is not valid"
        raise HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})
    if not principal.can(role):
        raise HTTPException(
            status_code=403, detail=f"this needs the {role} role; the token has {principal.role}"
        )
    request.state.principal = principal
    return principal


def require_read(request: Request) -> Principal:
    """Dependency: any valid token (API)."""
    return check(request, "read")


def require_admin(request: Request) -> Principal:
    """Dependency: an admin token (API)."""
    return check(request, "admin")


def page_read(request: Request) -> Principal:
    """Dependency: any valid token (pages: redirect to /login when missing)."""
    return check(request, "read", page=True)


def page_admin(request: Request) -> Principal:
    """Dependency: an admin token (page forms)."""
    return check(request, "admin", page=True)


def metrics_guard(request: Request) -> Principal | None:
    """Dependency for /metrics: open when ``web.metrics_open``, else any valid token."""
    if request.app.state.node.settings.web.metrics_open:
        return None
    return check(request, "read")


def secure_cookies(request: Request) -> bool:
    """True when cookies must be ``Secure``: served over https, or the public URL is https."""
    public_url: str = request.app.state.node.settings.web.public_url
    return request.url.scheme == "https" or public_url.lower().startswith("https://")


def set_login_cookie(request: Request, response: Response, token: str) -> None:
    """Keep the token in the browser: HttpOnly, SameSite=Strict, Secure over https, 12 hours."""
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="strict", secure=secure_cookies(request), max_age=12 * 3600
    )


def csrf_token(request: Request) -> str:
    """This browser's CSRF token (from its cookie); a new one when it has none. A new token is
    remembered on ``request.state`` so that ``remember_csrf`` sets the cookie on the response."""
    value = request.cookies.get(CSRF_COOKIE, "")
    if _CSRF_VALUE.match(value):
        return value
    existing = getattr(request.state, "new_csrf", None)
    if existing is None:
        existing = request.state.new_csrf = secrets.token_urlsafe(32)
    return existing


def remember_csrf(request: Request, response: Response) -> None:
    """Set the CSRF cookie when ``csrf_token`` made a new token for this request."""
    value = getattr(request.state, "new_csrf", None)
    if value is not None:
        response.set_cookie(
            CSRF_COOKIE, value, httponly=True, samesite="strict", secure=secure_cookies(request), path="/"
        )


def has_bearer(request: Request) -> bool:
    """True when the request carries an ``Authorization: Bearer`` header (an API client)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and bool(value.strip())


def csrf_ok(request: Request, submitted: str) -> bool:
    """True when a form's CSRF field matches this browser's cookie (or the client sent a bearer
    header, which no other site can make a browser send)."""
    if has_bearer(request):
        return True
    cookie = request.cookies.get(CSRF_COOKIE, "")
    return bool(_CSRF_VALUE.match(cookie)) and hmac.compare_digest(cookie, submitted)


def check_csrf(request: Request, submitted: str) -> None:
    """403 unless ``csrf_ok``."""
    if not csrf_ok(request, submitted):
        raise HTTPException(
            status_code=403,
            detail="the form's CSRF token is missing or does not match this browser's: "
            "reload the page and try again",
        )
