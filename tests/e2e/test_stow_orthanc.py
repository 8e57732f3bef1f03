"""End to end with Orthanc sending over DICOMweb: Orthanc's DICOMweb client (its "Servers" entry
pointing at the node, HTTP Basic with the node's admin token as password) STOW-RSes a study to
the node; the node stores it as C-STORE'd instances, routes and analyses it, and its outputs come
back into the same study in Orthanc over C-STORE."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlmodel import Session, select

from node.app import Node, build_node
from node.settings import load_settings
from node.store.tables import Instance, Job, JobState, OutboxItem, OutboxState
from node.synth import generate_study
from node.web.auth import hash_token
from tests.helpers import free_port, wait_port, write_config
from tests.orthanc import Orthanc
from tests.web.conftest import cxr_models

pytestmark = pytest.mark.slow
TOKEN = "orthanc-stow-token"


@pytest.fixture
def node_and_orthanc(tmp_path: Path) -> Iterator[tuple[Node, Orthanc, str]]:
    orthanc_port = free_port()
    config = write_config(
        tmp_path,
        models={"directory": str(cxr_models(tmp_path))},
        assembly={"series_quiet_s": 1.0, "poll_interval_s": 0.2},
        web={"tokens": [{"name": "orthanc", "sha256": hash_token(TOKEN), "role": "admin"}]},
        destinations=[
            {
                "name": "orthanc",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc_port,
                "backoff_initial_s": 0.5,
                "backoff_max_s": 1.0,
            }
        ],
    )
    node = build_node(load_settings(config))
    node.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(node.web_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_port(port)
    orthanc = Orthanc(tmp_path / "orthanc", node.scp.port, dicom_port=orthanc_port, dicomweb=True)
    try:
        yield node, orthanc, f"http://127.0.0.1:{port}"
    finally:
        orthanc.stop()
        server.should_exit = True
        thread.join(10)
        node.stop()


def test_orthanc_stow_rs_to_the_node_is_analysed_and_answered_into_the_study(node_and_orthanc, tmp_path):
    node, orthanc, url = node_and_orthanc
    study = generate_study("cxr", tmp_path / "cxr", seed=21, label="pneumonia", scale=0.5)
    files = sorted((tmp_path / "cxr").glob("*.dcm"))
    (orthanc_study,) = orthanc.upload(files)
    before = len(orthanc.study_series(orthanc_study))
    # Orthanc's DICOMweb client: a "Servers" entry for the node, then a STOW-RS of the study
    server = {"Url": f"{url}/dicomweb/", "Username": "orthanc", "Password": TOKEN}
    orthanc.http.put("/dicom-web/servers/node", json=server).raise_for_status()
    rsp = orthanc.http.post(
        "/dicom-web/servers/node/stow", json={"Resources": [orthanc_study], "Synchronous": True}
    )
    rsp.raise_for_status()
    with Session(node.engine) as s:
        stored = [i for i in s.exec(select(Instance)) if i.study_uid == study.study_instance_uid]
    assert len(stored) == len(files)  # durable and committed before Orthanc got its answer
    assert {i.calling_aet for i in stored} == {"STOW-RS"}
    deadline = time.monotonic() + 180
    while True:
        with Session(node.engine) as s:
            jobs = [j for j in s.exec(select(Job)) if j.study_uid == study.study_instance_uid]
            outputs = [o for o in s.exec(select(OutboxItem)) if o.job_id in {j.id for j in jobs}]
        if jobs and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs):
            break
        assert time.monotonic() < deadline, [(j.state, j.error) for j in jobs]
        time.sleep(0.5)
    assert [j.state for j in jobs] == [JobState.DONE], [j.error for j in jobs]
    assert outputs and all(o.state == OutboxState.SENT for o in outputs)
    series = orthanc.wait_for_series(orthanc_study, lambda s: len(s) > before, timeout=60)
    assert len(series) > before, "the node's outputs reached the study in Orthanc"
    # the node's STOW metrics saw the request
    metrics = httpx.get(f"{url}/metrics").text
    assert 'pacsnode_stow_requests_total{code="200"}' in metrics
