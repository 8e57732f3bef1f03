"""The session's shared processed node (fixture ``processed``): the cxr reference model, three
phantom studies processed, and a local webhook receiver that got the urgent study's notification.

Registered for the whole suite by ``pytest_plugins`` in tests/conftest.py, so that the web tests
(tests/web) and the webhook tests (tests/send/test_webhook.py) share one node per session
(building it once keeps them fast). The tokens it is configured with are the web tests' tokens."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from node.app import Node, build_node
from node.settings import load_settings
from node.store.tables import Job, JobState, Series
from node.synth import generate_study
from node.web.auth import hash_token
from tests.helpers import REPO, fresh_copy, raw_store_file, sample_file, write_config

READ_TOKEN = "read-token-for-tests"
ADMIN_TOKEN = "admin-token-for-tests"
WEBHOOK_SECRET = "shared-secret"
TOKENS = [
    {"name": "viewer", "sha256": hash_token(READ_TOKEN), "role": "read"},
    {"name": "it", "sha256": hash_token(ADMIN_TOKEN), "role": "admin"},
]


@dataclass
class Receiver:
    """A local HTTP server that records POSTs; the first ``fail_first`` answers are HTTP 500."""

    fail_first: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answered: int = 0

    def start(self) -> str:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.answered += 1
                if receiver.answered <= receiver.fail_first:
                    self.send_response(500)
                else:
                    receiver.requests.append((dict(self.headers), body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cxr_models(folder: Path) -> Path:
    """A models folder with only the cxr reference model (fast start)."""
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / "cxr").exists():
        (models / "cxr").symlink_to(REPO / "models" / "onnx" / "cxr")
    return models


def send_folder(node: Node, folder: Path) -> None:
    for f in sorted(folder.glob("*.dcm")):
        assert raw_store_file(node.scp.port, f) == 0


def wait_jobs(node: Node, count: int, timeout: float = 120.0) -> list[Job]:
    """Wait until ``count`` jobs are done or failed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(node.engine) as s:
            jobs = list(s.exec(select(Job)))
        finished = [j for j in jobs if j.state in (JobState.DONE, JobState.FAILED)]
        if len(finished) >= count:
            return finished
        time.sleep(0.2)
    raise TimeoutError(f"jobs not finished: {[(j.state, j.error) for j in jobs]}")


@dataclass
class Processed:
    """The shared node and what it processed."""

    node: Node
    client: TestClient
    receiver: Receiver
    folder: Path
    not_analysed: str
    routine: str
    urgent: str
    patient_values: list[str]


@pytest.fixture(scope="session")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Processed]:
    """Three studies in this arrival order: not analysed (CT, no model), routine cxr, urgent cxr."""
    folder = tmp_path_factory.mktemp("web-node")
    receiver = Receiver(fail_first=1)  # the first notification fails: the retry delivers it
    url = receiver.start()
    config = write_config(
        folder,
        models={"directory": str(cxr_models(folder))},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
        web={"tokens": TOKENS, "max_upload_mb": 4},
        webhook={"url": url, "secret": WEBHOOK_SECRET, "backoff_s": 0.2, "max_attempts": 4},
    )
    node = build_node(load_settings(config))
    node.start()
    try:
        ct = fresh_copy(sample_file("CT_small.dcm"), folder / "ct" / "ct.dcm")
        assert raw_store_file(node.scp.port, ct) == 0
        time.sleep(0.05)
        normal = generate_study("cxr", folder / "normal", seed=5, label=(), scale=0.5)
        send_folder(node, folder / "normal")
        time.sleep(0.05)
        sick = generate_study("cxr", folder / "sick", seed=11, label="pneumonia", scale=0.5)
        send_folder(node, folder / "sick")
        wait_jobs(node, 2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # every series decided, the notification delivered
            with Session(node.engine) as s:
                undecided = s.exec(select(Series).where(col(Series.state).in_(["receiving", "complete"])))
                if not list(undecided) and receiver.requests:
                    break
            time.sleep(0.2)
        import pydicom

        ct_uid = str(pydicom.dcmread(ct, stop_before_pixels=True).StudyInstanceUID)
        values = [sick.patient_id, sick.accession_number, normal.patient_id]
        first = pydicom.dcmread(sorted((folder / "sick").glob("*.dcm"))[0], stop_before_pixels=True)
        values.append(str(first.PatientName))
        client = TestClient(node.web_app(), headers={"Authorization": f"Bearer {READ_TOKEN}"})
        yield Processed(
            node,
            client,
            receiver,
            folder,
            ct_uid,
            normal.study_instance_uid,
            sick.study_instance_uid,
            values,
        )
    finally:
        node.stop()
        receiver.stop()


def payloads(receiver: Receiver) -> list[dict]:
    """The JSON bodies the receiver got."""
    return [json.loads(body) for _, body in receiver.requests]
