"""The outbox against a real DCMTK storescp: backoff while the destination is down, parking after
the last attempt, `pacs-node retry`, and delivery exactly once per (destination, SOP instance)."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from node.runner import outbox
from node.send.cstore import CStoreDestination
from node.settings import DestinationSettings
from node.store.repo import requeue_failed_jobs
from node.store.tables import Job, JobState, OutboxItem, OutboxState, utcnow
from tests import helpers
from tests.helpers import StoreSCP, free_port, need, sample_file, wait_port, write_config


def _outputs(data_dir: Path, count: int) -> list[tuple[str, pydicom.Dataset]]:
    """Stand-ins for a job's outputs: CT_small copies with fresh UIDs (any storable object will do)."""
    out = []
    for i in range(count):
        ds = pydicom.dcmread(sample_file("CT_small.dcm"))
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["outbox test", str(data_dir), str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(("sc", ds))
    return out


@pytest.fixture
def store(tmp_path):
    engine = helpers.make_test_engine(tmp_path)
    with Session(engine) as s:
        return engine, helpers.add_job(s, key="m|series|1.2.3").id


def _queue(engine, job_id: int, data_dir: Path, dest: DestinationSettings, count: int) -> None:
    written = outbox.write_output_files(data_dir / "outbox", job_id, _outputs(data_dir, count))
    now = utcnow()
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert outbox.queue_outputs(s, job, written, [dest], data_dir, now) == count
        job.state = JobState.SENDING
        job.result = '{"findings": []}'
        s.add(job)
        s.commit()


def _items(engine) -> list[OutboxItem]:
    with Session(engine) as s:
        return list(s.exec(select(OutboxItem)))


def _deliver(engine, destinations, data_dir: Path, at) -> int:
    with Session(engine) as s:
        sent = outbox.deliver_due(s, destinations, data_dir, at)
        s.commit()
    return sent


def test_backoff_then_parked_then_retried_and_delivered_once(store, tmp_path):
    engine, job_id = store
    port = free_port()
    dest = DestinationSettings(
        name="pacs",
        ae_title="DEST",
        host="127.0.0.1",
        port=port,
        max_attempts=3,
        backoff_initial_s=10,
        backoff_max_s=15,
    )
    destinations = {"pacs": (dest, CStoreDestination(dest, calling_aet="PACSNODE", timeout_s=5))}
    _queue(engine, job_id, tmp_path, dest, 3)

    t0 = utcnow()
    assert _deliver(engine, destinations, tmp_path, t0) == 0  # nothing listens on the port
    items = _items(engine)
    assert all(i.state == OutboxState.PENDING and i.attempts == 1 for i in items)
    assert all("association" in i.last_error for i in items)
    assert all(i.next_attempt_at >= t0 + timedelta(seconds=9) for i in items)  # backed off
    assert _deliver(engine, destinations, tmp_path, t0 + timedelta(seconds=1)) == 0
    assert all(i.attempts == 1 for i in _items(engine)), "not due yet: no attempt"

    _deliver(engine, destinations, tmp_path, t0 + timedelta(seconds=11))  # attempt 2, backoff 15 s (cap)
    assert {i.attempts for i in _items(engine)} == {2}
    _deliver(engine, destinations, tmp_path, t0 + timedelta(seconds=30))  # attempt 3: parked
    items = _items(engine)
    assert all(i.state == OutboxState.FAILED and i.attempts == 3 for i in items)
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.FAILED and "not delivered to pacs" in job.error

    scp = StoreSCP(tmp_path / "received", port)
    try:
        (tmp_path / "cfg").mkdir()
        url = engine.url.render_as_string(hide_password=False)  # SQLite here, or the PostgreSQL test database
        config = write_config(tmp_path / "cfg", storage={"data_dir": str(tmp_path), "database_url": url})
        cli = subprocess.run(
            [sys.executable, "-m", "node", "retry", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        assert "requeued 0 jobs and 3 outputs" in cli.stdout
        with Session(engine) as s:
            assert s.get(Job, job_id).state == JobState.SENDING
        assert _deliver(engine, destinations, tmp_path, utcnow()) == 3
        assert _deliver(engine, destinations, tmp_path, utcnow() + timedelta(hours=1)) == 0  # nothing twice
        received = scp.received()
    finally:
        scp.stop()
    assert sorted(str(d.SOPInstanceUID) for d in received) == sorted(
        i.sop_instance_uid for i in _items(engine)
    )
    assert all(i.state == OutboxState.SENT and i.sent_at is not None for i in _items(engine))
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.DONE and job.finished_at is not None


def test_refused_sop_class_is_a_failure_with_the_reason(store, tmp_path):
    """storescp that accepts only CT: an MR output is reported, not silently dropped."""
    engine, job_id = store
    port = free_port()
    dest = DestinationSettings(name="pacs", ae_title="DEST", host="127.0.0.1", port=port, max_attempts=1)
    destinations = {"pacs": (dest, CStoreDestination(dest, calling_aet="PACSNODE", timeout_s=5))}
    written = outbox.write_output_files(
        tmp_path / "outbox", job_id, [("sr", pydicom.dcmread(sample_file("MR_small.dcm")))]
    )
    with Session(engine) as s:
        outbox.queue_outputs(s, s.get(Job, job_id), written, [dest], tmp_path, utcnow())
        s.commit()
    proc = subprocess.Popen(
        [
            need("storescp"),
            "--aetitle",
            "DEST",
            "-od",
            str(tmp_path),
            "-xf",
            str(_ct_only_config(tmp_path)),
            "CTOnly",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, 20)
        assert _deliver(engine, destinations, tmp_path, utcnow()) == 0
    finally:
        proc.terminate()
        proc.wait(10)
    (item,) = _items(engine)
    assert item.state == OutboxState.FAILED
    assert "no context" in item.last_error or "association" in item.last_error


def _ct_only_config(folder: Path) -> Path:
    cfg = folder / "storescp.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LittleEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n"
        "[[PresentationContexts]]\n[CTOnly]\nPresentationContext1 = CTImageStorage\\Uncompressed\n"
        "[[Profiles]]\n[CTOnly]\nPresentationContexts = CTOnly\n"
    )
    return cfg


def test_failed_analysis_jobs_are_requeued_with_fresh_attempts(store):
    engine, job_id = store
    with Session(engine) as s:
        job = s.get(Job, job_id)
        job.state, job.attempts, job.error = JobState.FAILED, 3, "after 3 attempts: InferenceError: boom"
        s.add(job)
        s.commit()
        assert requeue_failed_jobs(s, utcnow()) == 1
        s.commit()
        job = s.get(Job, job_id)
        assert job.state == JobState.QUEUED and job.attempts == 0 and job.finished_at is None
