"""The HTTP side shared by the DICOMweb and FHIR senders: one requests session per destination with
its authentication (basic or bearer) and TLS verification settings, and what an HTTP status means
for a retry."""

from __future__ import annotations

import logging

import requests

from node.settings import DestinationSettings

log = logging.getLogger(__name__)

#: Answers that say the content itself is refused: sending the same bytes again cannot succeed.
#: 401/403 (credentials), 404 (a wrong URL), 408, 409, 429 and 5xx may be fixed on the other side:
#: retried with the outbox's back-off until max_attempts.
PERMANENT_STATUSES = frozenset({400, 405, 406, 410, 411, 413, 414, 415, 422})


def session_for(settings: DestinationSettings, accept: str) -> requests.Session:
    """A session that authenticates as configured and verifies TLS as configured."""
    session = requests.Session()
    session.headers["Accept"] = accept
    session.headers["User-Agent"] = "pacs-node"
    if settings.token is not None:
        session.headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
    elif settings.username is not None:
        password = settings.password.get_secret_value() if settings.password is not None else ""
        session.auth = (settings.username, password)
    if not settings.verify_tls:
        log.warning("destination %s: TLS certificates are not verified (verify_tls: false)", settings.name)
        session.verify = False
    elif settings.tls.ca_file is not None:
        session.verify = str(settings.tls.ca_file)
    if settings.tls.cert_file is not None and settings.tls.key_file is not None:
        session.cert = (str(settings.tls.cert_file), str(settings.tls.key_file))
    return session


def describe_status(code: int) -> str:
    """``HTTP 503 Service Unavailable`` (no body: a server may echo patient data in it)."""
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP {code} {phrase}".strip()


def is_permanent(code: int) -> bool:
    """True when a retry of the same request cannot succeed."""
    return code in PERMANENT_STATUSES
