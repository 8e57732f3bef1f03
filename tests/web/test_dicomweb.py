"""STOW-RS in (POST /dicomweb/studies[/{study}]): dicomweb-client against the node on a loopback
uvicorn. Instances are stored by the C-STORE path (durable, same checks, same duplicate policy),
the response is a PS3.18 Store Instances Response, malformed requests are refused naming why."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
import requests
import uvicorn
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from node.app import Node
from node.store.tables import Instance, Job, JobState, OutboxItem
from node.synth import generate_study
from node.web.auth import hash_token
from node.web.factory import create_web_app
from tests.helpers import free_port, fresh_copy, make_series, sample_file, wait_port
from tests.web.conftest import cxr_models

ADMIN = "stow-admin-token"
READ = "stow-read-token"
TOKENS = [
    {"name": "pacs", "sha256": hash_token(ADMIN), "role": "admin"},
    {"name": "viewer", "sha256": hash_token(READ), "role": "read"},
]
ANALYSED = (JobState.SENDING, JobState.DONE)
BOUNDARY = "stowtestboundary"
RELATED = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _serve(node: Node) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(create_web_app(node), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_port(port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def stow_node(make_node: Callable[..., Node], tmp_path: Path) -> Iterator[tuple[Node, str]]:
    """A node with tokens and a 1 MiB STOW limit, served on loopback: (node, base URL)."""
    node = make_node(web={"tokens": TOKENS, "max_stow_mb": 1})
    for url in _serve(node):
        yield node, url


def client(url: str, token: str = ADMIN) -> DICOMwebClient:
    return DICOMwebClient(url=f"{url}/dicomweb", headers={"Authorization": f"Bearer {token}"})


def body(*files: bytes, boundary: str = BOUNDARY, close: bool = True) -> bytes:
    out = b""
    for data in files:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def rows(node: Node) -> dict[str, Instance]:
    with Session(node.engine) as s:
        return {i.sop_instance_uid: i for i in s.exec(select(Instance))}


def uids(response: pydicom.Dataset, keyword: str) -> list[tuple[str, int | None]]:
    return [
        (str(item.get("ReferencedSOPInstanceUID", "")), item.get("FailureReason"))
        for item in response.get(keyword, [])
    ]


def test_dicomweb_client_stores_instances_durably_as_received(stow_node, tmp_path):
    node, url = stow_node
    files = make_series(tmp_path / "in", 3)
    datasets = [pydicom.dcmread(f) for f in files]
    response = client(url).store_instances(datasets)
    stored = uids(response, "ReferencedSOPSequence")
    assert sorted(u for u, _ in stored) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert "FailedSOPSequence" not in response
    assert all(
        item.ReferencedSOPClassUID == datasets[0].SOPClassUID for item in response.ReferencedSOPSequence
    )
    recorded = rows(node)
    for f, ds in zip(files, datasets, strict=True):
        row = recorded[ds.SOPInstanceUID]
        assert row.calling_aet == "STOW-RS"
        assert row.sha256 is not None
        # the bytes as the client sent them (dcmwrite of the read file: the file itself)
        assert (node.spool.root / row.path).read_bytes() == f.read_bytes()
    # no temporary body files are left behind
    assert not list(node.spool.tmp_dir.iterdir())
    metrics = httpx.get(f"{url}/metrics").text
    assert 'pacsnode_stow_instance_responses_total{status="0x0000"} 3.0' in metrics
    assert 'pacsnode_instances_received_total{calling_ae="STOW-RS",outcome="stored"} 3.0' in metrics
    assert 'pacsnode_stow_requests_total{code="200"} 1.0' in metrics
    # a resend is a plain duplicate: success, stored once
    again = client(url).store_instances(datasets[:1])
    assert uids(again, "ReferencedSOPSequence") == [(datasets[0].SOPInstanceUID, None)]
    assert len(rows(node)) == 3


def test_an_instance_of_another_study_than_the_path_fails_with_a900(stow_node, tmp_path):
    node, url = stow_node
    (mine,) = make_series(tmp_path / "a", 1)
    (other,) = make_series(tmp_path / "b", 1)
    ours, theirs = pydicom.dcmread(mine), pydicom.dcmread(other)
    response = client(url).store_instances([ours, theirs], study_instance_uid=ours.StudyInstanceUID)
    assert uids(response, "ReferencedSOPSequence") == [(ours.SOPInstanceUID, None)]
    assert uids(response, "FailedSOPSequence") == [(theirs.SOPInstanceUID, 0xA900)]
    assert set(rows(node)) == {ours.SOPInstanceUID}
    raw = httpx.post(
        f"{url}/dicomweb/studies/{ours.StudyInstanceUID}",
        content=body(other.read_bytes()),
        headers={"Content-Type": RELATED, "Authorization": f"Bearer {ADMIN}"},
    )
    assert raw.status_code == 409  # every instance failed
    assert raw.headers["content-type"] == "application/dicom+json"
    failed = raw.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0xA900]
    assert failed["00081155"]["Value"] == [theirs.SOPInstanceUID]


def test_some_failed_is_202_and_each_failure_has_its_c_store_status(stow_node, tmp_path):
    node, url = stow_node
    (good,) = make_series(tmp_path / "a", 1)
    broken = good.read_bytes()[:400]  # truncated: the data set overruns its lengths
    rsp = httpx.post(
        f"{url}/dicomweb/studies",
        content=body(good.read_bytes(), b"not a dicom file at all", broken),
        headers={
            "Content-Type": RELATED,
            "Authorization": f"Bearer {ADMIN}",
            "Accept": "application/dicom+json",
        },
    )
    assert rsp.status_code == 202, rsp.text
    answer = pydicom.Dataset.from_json(rsp.json())
    assert uids(answer, "ReferencedSOPSequence") == [(pydicom.dcmread(good).SOPInstanceUID, None)]
    reasons = [reason for _, reason in uids(answer, "FailedSOPSequence")]
    assert reasons == [0xC000, 0xC000]


def test_duplicate_policy_refuse_applies_to_stow(make_node, tmp_path):
    node = make_node(storage={"duplicates": "refuse"})
    for url in _serve(node):
        (path,) = make_series(tmp_path / "a", 1)
        first = pydicom.dcmread(path)
        client(url).store_instances([first])
        changed = pydicom.dcmread(path)
        changed.SeriesDescription = "other content, same SOP Instance UID"
        with pytest.raises(requests.HTTPError) as refused:
            client(url).store_instances([changed])
        assert refused.value.response.status_code == 409
        answer = pydicom.Dataset.from_json(refused.value.response.json())
        assert uids(answer, "FailedSOPSequence") == [(first.SOPInstanceUID, 0x0111)]


@pytest.mark.parametrize(
    ("headers", "content", "code", "words"),
    [
        ({"Content-Type": "application/dicom"}, b"x", 415, "not multipart/related"),
        ({"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b'}, b"", 415, "only"),
        ({"Content-Type": 'multipart/related; type="application/dicom"'}, b"", 400, "no boundary"),
        ({"Content-Type": RELATED}, body(b"DICM", close=False), 400, "closing boundary"),
        ({"Content-Type": RELATED}, b"garbage with no boundary at all", 400, "malformed"),
        ({"Content-Type": RELATED}, f"--{BOUNDARY}--\r\n".encode(), 400, "no parts"),
        ({"Content-Type": RELATED, "Accept": "application/dicom+xml"}, body(b"x"), 406, "accept"),
    ],
)
def test_malformed_requests_are_refused_naming_what_is_wrong(stow_node, headers, content, code, words):
    _, url = stow_node
    rsp = httpx.post(
        f"{url}/dicomweb/studies", content=content, headers={**headers, "Authorization": f"Bearer {ADMIN}"}
    )
    assert rsp.status_code == code, rsp.text
    assert words.lower() in rsp.json()["detail"].lower()


def test_a_body_over_max_stow_mb_is_413_declared_or_chunked(stow_node, tmp_path):
    node, url = stow_node
    big = b"\0" * (2**20 + 10)
    headers = {"Content-Type": RELATED, "Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{url}/dicomweb/studies", content=body(big), headers=headers).status_code == 413

    def chunks() -> Iterator[bytes]:
        data = body(big)
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    rsp = httpx.post(f"{url}/dicomweb/studies", content=chunks(), headers=headers)  # no Content-Length
    assert rsp.status_code == 413
    assert not rows(node)
    assert not list(node.spool.tmp_dir.iterdir())


def test_storing_needs_the_admin_role_by_bearer_or_basic_and_no_foreign_origin(stow_node, tmp_path):
    node, url = stow_node
    (path,) = make_series(tmp_path / "a", 1)
    content = body(path.read_bytes())
    post = f"{url}/dicomweb/studies"
    assert httpx.post(post, content=content, headers={"Content-Type": RELATED}).status_code == 401
    read = {"Content-Type": RELATED, "Authorization": f"Bearer {READ}"}
    assert httpx.post(post, content=content, headers=read).status_code == 403
    wrong = {"Content-Type": RELATED, "Authorization": "Bearer nope"}
    assert httpx.post(post, content=content, headers=wrong).status_code == 401
    foreign = {"Content-Type": RELATED, "Authorization": f"Bearer {ADMIN}", "Origin": "https://evil.example"}
    assert httpx.post(post, content=content, headers=foreign).status_code == 403
    assert not rows(node)
    basic = base64.b64encode(f"orthanc:{ADMIN}".encode()).decode()
    ok = httpx.post(
        post, content=content, headers={"Content-Type": RELATED, "Authorization": f"Basic {basic}"}
    )
    assert ok.status_code == 200, ok.text
    assert len(rows(node)) == 1


def test_stored_instances_are_routed_and_analysed_like_c_store_ones(make_node, tmp_path):
    node = make_node(
        models={"directory": str(cxr_models(tmp_path))},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
        # nobody listens there: the outputs stay queued in the outbox
        destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": free_port()}],
    )
    study = generate_study("cxr", tmp_path / "cxr", seed=3, label="pneumonia", scale=0.5)
    datasets = [pydicom.dcmread(f) for f in sorted((tmp_path / "cxr").glob("*.dcm"))]
    for url in _serve(node):
        response = DICOMwebClient(url=f"{url}/dicomweb").store_instances(
            datasets, study_instance_uid=study.study_instance_uid
        )
        assert len(response.ReferencedSOPSequence) == len(datasets)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with Session(node.engine) as s:
            jobs = [j for j in s.exec(select(Job)) if j.study_uid == study.study_instance_uid]
            outputs = list(s.exec(select(OutboxItem)))
        if jobs and all(j.state in ANALYSED for j in jobs) and outputs:
            break
        time.sleep(0.2)
    # analysed (sending: the outputs wait in the outbox for a destination nobody serves)
    assert jobs and all(j.state in ANALYSED for j in jobs), [(j.state, j.error) for j in jobs]
    assert {o.job_id for o in outputs} == {j.id for j in jobs}, "the job's outputs are queued"


def test_unsupported_transfer_syntax_and_meta_mismatch(stow_node, tmp_path):
    node, url = stow_node
    odd = fresh_copy(sample_file("CT_small.dcm"), tmp_path / "odd.dcm")
    raw = odd.read_bytes()
    head = raw[:400]
    assert pydicom.dcmread(odd).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    # a transfer syntax the SCP would not accept either (same length: the meta group stays valid)
    unknown = head.replace(b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.99", 1) + raw[400:]
    (tmp_path / "mpeg.dcm").write_bytes(unknown)
    mismatch = pydicom.dcmread(odd)
    mismatch.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mismatch.save_as(tmp_path / "mismatch.dcm")
    rsp = httpx.post(
        f"{url}/dicomweb/studies",
        content=body((tmp_path / "mpeg.dcm").read_bytes(), (tmp_path / "mismatch.dcm").read_bytes()),
        headers={"Content-Type": RELATED, "Authorization": f"Bearer {ADMIN}"},
    )
    assert rsp.status_code == 409
    answer = pydicom.Dataset.from_json(rsp.json())
    assert [r for _, r in uids(answer, "FailedSOPSequence")] == [0xC122, 0xC000]
    assert not rows(node)


def test_a_full_spool_disk_is_503_before_the_body_is_buffered(make_node, tmp_path):
    node = make_node(storage={"min_free_mb": 2**40})  # no disk has that much free
    for url in _serve(node):
        (path,) = make_series(tmp_path / "a", 1)
        rsp = httpx.post(
            f"{url}/dicomweb/studies", content=body(path.read_bytes()), headers={"Content-Type": RELATED}
        )
        assert rsp.status_code == 503
        assert "disk space" in rsp.json()["detail"]
    assert not rows(node)
