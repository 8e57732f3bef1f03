"""Integrity of stored bytes (issue 21, item 8): each file's SHA-256 is recorded at ingest and
checked before it is analysed or sent. A spool file changed, emptied or removed after it was
acknowledged fails its job at once with the reason (not "not routed", and never analysed as if it
were the data); a resend of the original repairs it; rows from before hashes were recorded are
accepted. An output file damaged in the outbox is parked as failed instead of being sent."""

from __future__ import annotations

import hashlib
import subprocess
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import update
from sqlmodel import Session, select

from node.app import build_node
from node.runner import outbox
from node.send import Delivery, OutgoingFile
from node.settings import DestinationSettings, load_settings
from node.store.db import make_engine
from node.store.tables import Instance, Job, JobState, OutboxItem, OutboxState, Series, SeriesState, utcnow
from node.synth import generate_study
from tests.helpers import StoreSCP, add_job, analysing_config, free_port, need, wait_for

pytestmark = pytest.mark.slow
WHICH = "instance 1 of 1 of the series (Instance Number 1)"
MISMATCH = "changed on disk after it was received (SHA-256 mismatch)"


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN001, ANN201
    need("storescp")
    tmp = tmp_path_factory.mktemp("integrity")
    dest_port = free_port()
    config = analysing_config(
        tmp,
        dest_port,
        # long enough that each test damages its file before the series completes, even under load
        assembly={"series_quiet_s": 3.0, "poll_interval_s": 0.1},
        runner={"max_attempts": 3, "retry_backoff_s": 0},
    )
    scp = StoreSCP(tmp / "received", dest_port)
    node = build_node(load_settings(config))
    node.start()
    generate_study("cxr", tmp / "cxr", seed=5, label="normal", scale=0.25, write_masks=False)
    template = sorted((tmp / "cxr").glob("*.dcm"))[0]
    yield node, scp, template, tmp
    node.stop()
    scp.stop()


def _fresh(template: Path, folder: Path) -> Path:
    """The phantom radiograph under new UIDs (a study of its own)."""
    ds = pydicom.dcmread(template)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _send(port: int, path: Path) -> None:
    run = subprocess.run(
        [need("storescu"), "-aet", "MODALITY", "-aec", "PACSNODE", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def _stored(node, path: Path) -> Instance:  # noqa: ANN001
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    with Session(node.engine) as s:
        row = s.get(Instance, uid)
    assert row is not None
    return row


def _jobs(node, series_uid: str) -> list[Job]:  # noqa: ANN001
    with Session(node.engine) as s:
        return list(s.exec(select(Job).where(Job.series_uids == [series_uid]).order_by(Job.id)))


def _finished(node, series_uid: str, count: int = 1) -> list[Job]:  # noqa: ANN001
    def done() -> list[Job] | None:
        jobs = _jobs(node, series_uid)
        terminal = (JobState.DONE, JobState.FAILED, JobState.SENDING)
        return jobs if len(jobs) >= count and all(j.state in terminal for j in jobs) else None

    return wait_for(done, 120, "the job did not finish")  # type: ignore[return-value]


def _series_state(node, uid: str) -> str:  # noqa: ANN001
    with Session(node.engine) as s:
        series = s.get(Series, uid)
    assert series is not None
    return series.state


def _integrity_failures(node, stage: str) -> float:  # noqa: ANN001
    value = node.metrics.registry.get_sample_value("pacsnode_integrity_failures_total", {"stage": stage})
    return value or 0.0


def test_file_changed_after_ack_fails_the_job_and_a_resend_repairs_it(env):
    node, scp, template, tmp = env
    original = _fresh(template, tmp / "changed")
    before = _integrity_failures(node, "analysis")
    _send(node.scp.port, original)
    row = _stored(node, original)
    stored = node.spool.root / row.path
    received = hashlib.sha256(stored.read_bytes()).hexdigest()
    data = bytearray(stored.read_bytes())  # a few pixels change, the size does not
    data[-2000:-1000] = bytes(255 - b for b in data[-2000:-1000])
    stored.write_bytes(bytes(data))

    (job,) = _finished(node, row.series_uid)
    assert job.state == JobState.FAILED
    assert f"{WHICH} {MISMATCH}" in job.error, job.error
    assert job.attempts == 1, "an integrity failure is permanent: not retried"
    assert job.result == "", "nothing was analysed"
    assert _series_state(node, row.series_uid) == SeriesState.ROUTED, (
        "a damaged file is not a routing outcome"
    )
    assert _integrity_failures(node, "analysis") == before + 1
    with Session(node.engine) as s:
        assert list(s.exec(select(OutboxItem).where(OutboxItem.job_id == job.id))) == []
    assert row.sha256 == received, "the hash recorded at ingest is the file's as written"

    # the sender resends the original: the damaged file is replaced and the series analysed
    _send(node.scp.port, original)
    repaired = _stored(node, original)
    assert repaired.sha256 == row.sha256 and repaired.path != row.path
    assert hashlib.sha256((node.spool.root / repaired.path).read_bytes()).hexdigest() == row.sha256
    assert not stored.exists(), "the damaged file is removed once the repaired copy is recorded"
    jobs = _finished(node, row.series_uid, count=2)
    assert jobs[-1].state in (JobState.DONE, JobState.SENDING), jobs[-1].error
    assert jobs[-1].result


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_bytes(b""), "is empty on disk: its file was truncated after it was received"),
        (lambda p: p.unlink(), "is missing: its file was removed after it was received"),
        (lambda p: p.write_bytes(b"\0" * p.stat().st_size), MISMATCH),
    ],
    ids=["emptied", "removed", "zeroed"],
)
def test_emptied_removed_or_zeroed_file_fails_the_job_not_routing(env, damage, reason):
    node, _, template, tmp = env
    original = _fresh(template, tmp / "damaged")
    _send(node.scp.port, original)
    row = _stored(node, original)
    damage(node.spool.root / row.path)
    (job,) = _finished(node, row.series_uid)
    assert job.state == JobState.FAILED
    assert f"{WHICH} {reason}" in job.error, job.error
    assert _series_state(node, row.series_uid) == SeriesState.ROUTED


def test_row_without_a_hash_from_before_the_migration_is_accepted(env):
    node, _, template, tmp = env
    original = _fresh(template, tmp / "legacy")
    _send(node.scp.port, original)
    row = _stored(node, original)
    with Session(node.engine) as s:  # as a row written before revision 0004 reads
        s.exec(update(Instance).where(Instance.sop_instance_uid == row.sop_instance_uid).values(sha256=None))  # type: ignore[call-overload]
        s.commit()
    (job,) = _finished(node, row.series_uid)
    assert job.state in (JobState.DONE, JobState.SENDING), job.error
    assert job.result


class _Recorder:
    """A destination that accepts everything and remembers what it was sent."""

    def __init__(self) -> None:
        self.sent: list[Path] = []

    def send(self, files: list[OutgoingFile]) -> list[Delivery]:
        self.sent.extend(f.path for f in files)
        return [Delivery(f.path, True, "Success") for f in files]


def test_output_damaged_in_the_outbox_is_parked_not_sent(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    now = utcnow()
    folder = tmp_path / "outbox" / "1"
    folder.mkdir(parents=True)
    good, bad = folder / "sr-1.dcm", folder / "sc-2.dcm"
    good.write_bytes(b"good output")
    bad.write_bytes(b"bad output")
    dest = DestinationSettings(name="pacs", ae_title="DEST", host="127.0.0.1", port=free_port())
    with Session(engine) as s:
        job = add_job(s, key="m|series|1", study_uid="1", series_uids=["1.1"], state=JobState.SENDING)
        files = [("sr", _Uids("1.2.1"), good), ("sc", _Uids("1.2.2"), bad)]
        assert outbox.queue_outputs(s, job, files, [dest], tmp_path, now) == 2  # type: ignore[arg-type]
        s.commit()
    bad.write_bytes(b"BAD output")  # changed after it was written
    recorder = _Recorder()
    damaged: list[int] = []
    with Session(engine) as s:
        sent = outbox.deliver_due(
            s,
            {"pacs": (dest, recorder)},
            tmp_path,
            now + timedelta(seconds=1),
            on_damaged=lambda: damaged.append(1),
        )
        s.commit()
    assert sent == 1 and recorder.sent == [good]
    assert damaged == [1]
    with Session(engine) as s:
        items = {i.kind: i for i in s.exec(select(OutboxItem))}
        job = s.exec(select(Job)).one()
    assert items["sr"].state == OutboxState.SENT
    assert items["sc"].state == OutboxState.FAILED and items["sc"].attempts == 0
    assert "output sc changed on disk after it was written (SHA-256 mismatch)" in items["sc"].last_error
    assert job.state == JobState.FAILED and "SHA-256 mismatch" in job.error
    engine.dispose()


class _Uids:
    """The two attributes queue_outputs reads from an output data set."""

    def __init__(self, sop: str) -> None:
        self.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
        self.SOPInstanceUID = sop
