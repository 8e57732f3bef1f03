"""The urgent-study webhook: a local receiver gets the signed payload (after a failed first try),
without patient identifiers; a receiver that does not answer does not stall the pipeline."""

from __future__ import annotations

import hashlib
import hmac
import socket
import time

from sqlmodel import Session

from node.app import build_node
from node.send.webhook import SIGNATURE_HEADER, payload
from node.settings import load_settings
from node.store.tables import Study, utcnow
from node.synth import generate_study
from tests.helpers import write_config
from tests.processed_node import WEBHOOK_SECRET, cxr_models, payloads, send_folder, wait_jobs


def test_receiver_gets_signed_payload(processed):
    receiver = processed.receiver
    assert receiver.answered == 2  # HTTP 500 first, then delivered on the retry
    ((headers, body),) = receiver.requests
    expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected
    assert headers["Content-Type"] == "application/json"
    (sent,) = payloads(receiver)
    assert sent["event"] == "urgent_study"
    assert sent["study_uid"] == processed.urgent
    assert sent["modalities"] == ["DX"]
    assert sent["url"].endswith(f"/studies/{processed.urgent}")
    pneumonia = next(f for f in sent["findings"] if f["label"] == "pneumonia")
    assert pneumonia["positive"] and pneumonia["probability"] > 0.5 and pneumonia["model"] == "cxr"
    assert "patient_name" not in sent and "patient_id" not in sent
    for value in processed.patient_values:
        assert value not in body.decode()
    with Session(processed.node.engine) as s:
        study = s.get(Study, processed.urgent)
        assert study.notify_state == "sent" and study.notify_attempts == 2
        assert s.get(Study, processed.routine).notify_state is None  # routine: no notification


def test_patient_identifiers_only_when_allowed(processed):
    settings = processed.node.settings.model_copy(deep=True)
    settings.webhook.include_patient_identifiers = True
    with Session(processed.node.engine) as s:
        body = payload(s, settings, s.get(Study, processed.urgent), utcnow())
    assert body["patient_id"] in processed.patient_values
    assert body["patient_name"] in processed.patient_values


def test_silent_receiver_does_not_stall_the_pipeline(tmp_path):
    silent = socket.socket()  # listens, never accepts nor answers: each attempt waits for its timeout
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
    config = write_config(
        tmp_path,
        models={"directory": str(cxr_models(tmp_path))},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
        webhook={"url": url, "timeout_s": 3, "max_attempts": 2, "backoff_s": 0},
    )
    node = build_node(load_settings(config))
    node.start()
    try:
        sick = generate_study("cxr", tmp_path / "sick", seed=11, label="pneumonia", scale=0.5)
        send_folder(node, tmp_path / "sick")
        wait_jobs(node, 1)
        started = time.monotonic()
        normal = generate_study("cxr", tmp_path / "normal", seed=5, label=(), scale=0.5)
        send_folder(node, tmp_path / "normal")
        wait_jobs(node, 2, timeout=30)
        with Session(node.engine) as s:
            urgent = s.get(Study, sick.study_instance_uid)
            assert urgent.priority == "urgent"
            assert s.get(Study, normal.study_instance_uid).priority == "routine"
            # the second study went through while the first notification was still unanswered
            assert urgent.notify_state == "pending", (time.monotonic() - started, urgent.notify_error)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with Session(node.engine) as s:
                urgent = s.get(Study, sick.study_instance_uid)
            if urgent.notify_state == "failed":
                break
            time.sleep(0.2)
        assert urgent.notify_state == "failed" and urgent.notify_attempts == 2
        assert "timed out" in urgent.notify_error
    finally:
        node.stop()
        silent.close()
