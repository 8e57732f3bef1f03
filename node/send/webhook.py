"""Webhook notifications of urgent studies.

The runner marks a study ``notify_state = pending`` in the database when it becomes urgent (in
the same transaction that records the job's result). A background thread here polls for due
notifications, POSTs one JSON document per study, and records the outcome on the study row:
``sent``, or another attempt after an exponential backoff, or ``failed`` after
``webhook.max_attempts``. The queue is the database, so notifications survive a restart, and the
pipeline never waits for the receiver: a slow or dead receiver only delays this thread.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy.engine import Engine
from sqlmodel import Session

from node.backoff import backoff_s
from node.settings import Settings
from node.store import repo
from node.store.tables import Study, utcnow

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Node-Signature"


def sign(secret: str, body: bytes) -> str:
    """The signature header value: ``sha256=`` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def base_url(settings: Settings) -> str:
    """Where people reach the pages (for links in notifications)."""
    web = settings.web
    return (web.public_url or f"http://{web.host}:{web.port}").rstrip("/")


def _patient(session: Session, settings: Settings, study_uid: str) -> dict[str, str]:
    for series in repo.study_series(session, study_uid):
        for inst in repo.series_instances(session, series.series_uid)[:1]:
            path = Path(settings.storage.spool_dir) / inst.path
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
            return {
                "patient_name": str(ds.get("PatientName", "")),
                "patient_id": str(ds.get("PatientID", "")),
            }
    return {}


def payload(session: Session, settings: Settings, study: Study, now: datetime) -> dict[str, Any]:
    """The JSON notification of one urgent study (no patient identifiers unless allowed)."""
    findings = []
    for job in repo.study_jobs(session, study.study_uid):
        result = job.recorded_result()
        if result is None:
            continue
        for f in result.findings:
            findings.append(
                {
                    "model": job.model_id,
                    "model_version": result.version,
                    "label": f.label,
                    "probability": f.probability,
                    "positive": f.positive,
                    "triage": f.triage,
                }
            )
    body: dict[str, Any] = {
        "event": "urgent_study",
        "study_uid": study.study_uid,
        "modalities": list(study.modalities),
        "priority": study.priority,
        "suspicion": study.suspicion,
        "findings": findings,
        "url": f"{base_url(settings)}/studies/{study.study_uid}",
        "received_at": study.first_received_at.isoformat(),
        "sent_at": now.isoformat(),
    }
    if settings.webhook.include_patient_identifiers:
        body.update(_patient(session, settings, study.study_uid))
    return body


def post(url: str, body: bytes, secret: str, timeout: float) -> None:
    """POST ``body``; raise OSError (URLError/HTTPError are subclasses) unless the answer is 2xx."""
    headers = {"Content-Type": "application/json", "User-Agent": "pacs-node-webhook"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (configured URL)
        if not 200 <= response.status < 300:
            raise OSError(f"HTTP {response.status}")


class WebhookNotifier:
    """The background thread that delivers pending notifications with bounded retries."""

    def __init__(self, engine: Engine, settings: Settings, interval_s: float = 0.5) -> None:
        self._engine = engine
        self._settings = settings
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start polling (does nothing when no URL is configured)."""
        if not self._settings.webhook.url or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="webhook", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current request (bounded by the request timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._settings.webhook.timeout_s + 5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.deliver_due()
            except Exception:  # a database hiccup must not end the thread; logged, retried
                log.exception("webhook pass failed; retrying")
            self._stop.wait(self._interval)

    def deliver_due(self) -> int:
        """One pass: try every due notification once; return how many were delivered. Each is
        claimed with a row lock held while it is posted and its outcome committed, so that
        notifiers on several nodes never post one study twice."""
        cfg = self._settings.webhook
        delivered = 0
        tried: set[str] = set()
        while not self._stop.is_set():
            with Session(self._engine) as session:
                study = repo.claim_notification(session, utcnow(), tried)
                if study is None:
                    break
                tried.add(study.study_uid)
                now = utcnow()
                body = json.dumps(payload(session, self._settings, study, now)).encode()
                study.notify_attempts += 1
                try:
                    post(cfg.url, body, cfg.secret, cfg.timeout_s)
                except (OSError, ValueError) as exc:
                    study.notify_error = f"{type(exc).__name__}: {exc}"[:512]
                    if study.notify_attempts >= cfg.max_attempts:
                        study.notify_state = "failed"
                        log.error(
                            "webhook for an urgent study failed after %d attempts", study.notify_attempts
                        )
                    else:
                        delay = backoff_s(cfg.backoff_s, study.notify_attempts)
                        study.notify_next_at = now + timedelta(seconds=delay)
                        log.warning(
                            "webhook attempt %d failed: %s", study.notify_attempts, study.notify_error
                        )
                else:
                    study.notify_state, study.notify_error = "sent", ""
                    delivered += 1
                session.add(study)
                session.commit()
        return delivered
