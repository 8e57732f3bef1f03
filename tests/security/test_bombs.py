"""Decompression bombs against a running node (issue 21, items 1 and 2): a 5 kB JPEG whose frame
header claims 65535x65535x3, a JPEG 2000 whose SIZ claims 40000x40000, an RLE header that lies
about its segments, and a 3 MB deflate bomb (3 GiB inflated), over C-STORE and POST
/api/v1/infer. The node runs in a subprocess under an address-space limit (tests/security/limited),
so a regression fails this test instead of taking the machine down. Each bomb ends in one clear
refusal naming the limit, the node keeps serving, and a normal study sent right after is analysed.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

from node.synth import generate_study
from tests.helpers import (
    StoreSCP,
    analysing_config,
    free_port,
    fresh_copy,
    need,
    node_db_url,
    query_db,
    wait_port,
)
from tests.security.bombs import DEFLATE_SYNTAX, deflate_bomb_body, j2k_bomb, jpeg_bomb, rle_lying
from tests.security.limited import start_limited_node

pytestmark = pytest.mark.slow
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _store(port: int, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> Dataset:
    """Send ``data`` as one C-STORE data set, unchecked; return the response (Status, ErrorComment)."""
    ae = AE(ae_title="BOMBSCU")
    ae.add_requested_context(sop_class, [transfer_syntax])
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established, "association refused"
    try:
        context = assoc._get_valid_context(sop_class, transfer_syntax, "scu")
        req = C_STORE()
        req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = 1, sop_class, sop_instance
        req.Priority = 2
        req.DataSet = BytesIO(data)
        assoc._reactor_checkpoint.clear()  # the hand-off Association.send_c_store makes
        deadline = time.monotonic() + 10
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        out = Dataset()
        out.Status = int(rsp.Status)
        out.ErrorComment = str(getattr(rsp, "ErrorComment", "") or "")
        return out
    finally:
        assoc.release()


def _part10(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _body(ds: Dataset) -> bytes:
    """The data set without its file meta, as a C-STORE carries it."""
    raw = _part10(ds)
    meta_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + meta_len :]


def _jobs(db: str, series_uid: str) -> list[tuple]:
    return query_db(db, f"SELECT state, attempts, error FROM job WHERE series_uids LIKE '%{series_uid}%'")


def _wait_job(db: str, series_uid: str, proc, timeout: float = 120) -> tuple:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the node died"
        jobs = _jobs(db, series_uid)
        if jobs and all(j[0] in ("done", "failed") for j in jobs):
            assert len(jobs) == 1, jobs
            return jobs[0]
        time.sleep(0.2)
    raise AssertionError(f"no finished job for series {series_uid}: {_jobs(db, series_uid)}")


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN001, ANN201
    need("storescp")
    tmp = tmp_path_factory.mktemp("bombs")
    dest_port, web_port = free_port(), free_port()
    config = analysing_config(
        tmp,
        dest_port,
        assembly={"series_quiet_s": 0.3, "poll_interval_s": 0.1},
        runner={"max_attempts": 3, "retry_backoff_s": 0},
        web={"enabled": True, "host": "127.0.0.1", "port": web_port},
    )
    generate_study("cxr", tmp / "cxr", seed=5, label="normal", scale=0.25, write_masks=False)
    template = sorted((tmp / "cxr").glob("*.dcm"))[0]
    scp = StoreSCP(tmp / "received", dest_port)
    proc = start_limited_node(config, tmp / "node.log")
    try:
        wait_port(web_port, 60)  # start_limited_node waits for the DICOM port only
    except TimeoutError:
        proc.kill()
        raise
    client = httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=120)
    yield proc, config, template, scp, client, tmp
    client.close()
    proc.terminate()
    try:
        proc.wait(30)
    except Exception:
        proc.kill()
    scp.stop()


def _normal_study_is_analysed(env, name: str) -> None:  # noqa: ANN001
    proc, config, template, scp, _, tmp = env
    port = _port(config)
    good = fresh_copy(
        template, tmp / "good" / f"{name}.dcm", pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    )
    ds = pydicom.dcmread(good)
    rsp = _store(port, DX, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID), _body(ds))
    assert rsp.Status == 0, f"the node no longer stores after {name}: {rsp}"
    state, _, error = _wait_job(node_db_url(config), str(ds.SeriesInstanceUID), proc)
    assert state == "done", f"a normal study after {name} was not analysed: {error}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(str(r.StudyInstanceUID) == str(ds.StudyInstanceUID) for r in scp.received()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no output sent for the normal study after {name}")


def _port(config: Path) -> int:
    import yaml

    return int(yaml.safe_load(config.read_text())["dicom"]["port"])


@pytest.mark.parametrize(
    ("name", "build", "named"),
    [
        ("jpeg-65535x65535x3", jpeg_bomb, "limits.max_frame_pixels"),
        ("j2k-40000x40000", j2k_bomb, "limits.max_frame_pixels"),
        ("rle-15-segments", rle_lying, "declares 15 segments"),
    ],
)
def test_pixel_bomb_over_cstore_fails_its_job_once(env, name, build, named) -> None:  # noqa: ANN001
    proc, config, template, _, _, _ = env
    bomb = build(template)
    assert len(_part10(bomb)) < 64 * 1024, "the bomb is meant to be small"
    rsp = _store(
        _port(config), DX, str(bomb.SOPInstanceUID), str(bomb.file_meta.TransferSyntaxUID), _body(bomb)
    )
    assert rsp.Status == 0, "the bytes are stored as received (no decode on ingest)"
    state, attempts, error = _wait_job(node_db_url(config), str(bomb.SeriesInstanceUID), proc)
    assert state == "failed", error
    assert attempts == 1, f"a permanent refusal is not retried (attempts {attempts})"
    assert named in error, error
    assert proc.poll() is None, "the node died"
    _normal_study_is_analysed(env, name)


@pytest.mark.parametrize(
    ("name", "build"), [("jpeg-65535x65535x3", jpeg_bomb), ("j2k-40000x40000", j2k_bomb)]
)
def test_pixel_bomb_upload_is_refused_with_the_limit(env, name, build) -> None:  # noqa: ANN001
    proc, _, template, _, client, _ = env
    answer = client.post(
        "/api/v1/infer", files={"file": ("bomb.dcm", _part10(build(template)), "application/dicom")}
    )
    assert answer.status_code == 413, answer.text
    assert "limits.max_frame_pixels" in answer.text
    assert proc.poll() is None, "the node died"
    normal = client.post(
        "/api/v1/infer", files={"file": ("cxr.dcm", template.read_bytes(), "application/dicom")}
    )
    assert normal.status_code == 200, normal.text


def test_deflate_bomb_over_cstore_is_refused(env) -> None:  # noqa: ANN001
    proc, config, _, _, _, _ = env
    sop_instance, body = deflate_bomb_body(3072)  # 3 GiB inflated: over the 1 GiB default and the 3 GiB limit
    assert len(body) < 4 * 2**20
    rsp = _store(_port(config), DX, sop_instance, DEFLATE_SYNTAX, body)
    assert rsp.Status == 0xC000, rsp
    assert "limits.max_inflated_mb" in rsp.ErrorComment, rsp.ErrorComment
    assert proc.poll() is None, "the node died"
    assert (
        query_db(node_db_url(config), f"SELECT 1 FROM instance WHERE sop_instance_uid = '{sop_instance}'")
        == []
    )
    _normal_study_is_analysed(env, "deflate-bomb")


def test_deflate_bomb_upload_is_refused(env) -> None:  # noqa: ANN001
    proc, _, _, _, client, _ = env
    sop_instance, body = deflate_bomb_body(3072)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = DEFLATE_SYNTAX
    out = BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(out, meta, enforce_standard=True)
    answer = client.post(
        "/api/v1/infer", files={"file": ("bomb.dcm", out.getvalue() + body, "application/dicom")}
    )
    assert answer.status_code == 413, answer.text
    assert "limits.max_inflated_mb" in answer.text
    assert proc.poll() is None, "the node died"


def test_ct_bomb_without_body_part_is_not_decoded_for_routing(env) -> None:  # noqa: ANN001
    """Routing reads the pixels of a CT naming no body region: a bomb there must not be decoded
    either. Its region stays unknown (not routed, with the reason) and the node keeps serving."""
    proc, config, _, _, _, tmp = env
    generate_study("ct", tmp / "ct-bomb", seed=3, label="normal", slices=1, body_part=False)
    ct = pydicom.dcmread(sorted((tmp / "ct-bomb").glob("*.dcm"))[0])
    bomb = jpeg_bomb(ct)
    assert bomb.Modality == "CT" and "BodyPartExamined" not in bomb
    ct_storage = str(bomb.SOPClassUID)
    rsp = _store(
        _port(config),
        ct_storage,
        str(bomb.SOPInstanceUID),
        str(bomb.file_meta.TransferSyntaxUID),
        _body(bomb),
    )
    assert rsp.Status == 0
    db, series = node_db_url(config), str(bomb.SeriesInstanceUID)
    deadline = time.monotonic() + 60
    rows: list[tuple] = []
    while time.monotonic() < deadline and not rows:
        assert proc.poll() is None, "the node died"
        rows = query_db(
            db, f"SELECT state, route_note FROM series WHERE series_uid = '{series}' AND state = 'not routed'"
        )
        time.sleep(0.2)
    assert rows, query_db(db, f"SELECT state, route_note FROM series WHERE series_uid = '{series}'")
    assert "body region unknown" in rows[0][1], rows[0][1]
    assert not _jobs(db, series)
    # the look-up refused the slice before decoding it (under this test's memory limit a decode
    # would only have raised MemoryError; without one the kernel kills the node)
    from node.runner.jobs import _read_within_budget

    path = tmp / "ct-bomb.dcm"
    bomb.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError, match="not decoded for routing: .*limits.max_frame_pixels"):
        _read_within_budget(path)
    _normal_study_is_analysed(env, "ct-bomb")
