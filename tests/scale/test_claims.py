"""Claims and leases in the store, with two sessions standing for two nodes (issue 15): what one
node has claimed and not yet committed, the other skips (PostgreSQL: FOR UPDATE SKIP LOCKED);
a node requeues at start only its own interrupted jobs; any node requeues a job whose lease
expired, counting attempts; roles other than ``all`` are refused on SQLite; a node whose data
folder differs from the running nodes' is refused."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from node.errors import ConfigError
from node.pipeline.route import load_rules
from node.runner import jobs, outbox
from node.send import Delivery, OutgoingFile
from node.settings import DestinationSettings
from node.store import cluster, repo
from node.store.db import make_engine
from node.store.tables import (
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
    SeriesState,
    Study,
    StudyState,
    utcnow,
)
from tests.helpers import REPO, add_job, write_config


def _job(s: Session, key: str, state: str = JobState.QUEUED, **extra: object) -> Job:
    return add_job(s, key=key, state=state, series_uids=[key], **extra)


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_engine(postgres):
    engine = make_engine(postgres.new_database())
    yield engine
    engine.dispose()


def test_start_requeues_only_own_jobs_and_expired_leases_come_back_counted(engine):
    now = utcnow()
    later = now + timedelta(seconds=60)
    with Session(engine) as s:
        mine = _job(s, "mine", JobState.INFERRING, owner="a", lease_until=later, attempts=1).id
        peer = _job(s, "peer", JobState.INFERRING, owner="b", lease_until=later, attempts=1).id
        legacy = _job(s, "legacy", JobState.WRITING, attempts=1).id  # from before leases: no owner
        dead = _job(
            s, "dead", JobState.PREPROCESSING, owner="c", lease_until=now - timedelta(seconds=1), attempts=1
        ).id
        spent = _job(
            s, "spent", JobState.INFERRING, owner="c", lease_until=now - timedelta(seconds=1), attempts=3
        ).id
        assert jobs.requeue_interrupted(s, now, max_attempts=3, owner="a") == 2
        s.commit()
        state = {j.id: (j.state, j.attempts, j.owner) for j in s.exec(select(Job))}
        assert state[mine] == (JobState.QUEUED, 1, "") and state[legacy] == (JobState.QUEUED, 1, "")
        assert state[peer] == (JobState.INFERRING, 1, "b")  # a live peer's job is left alone
        assert state[dead][0] == JobState.PREPROCESSING
        assert jobs.renew_leases(s, "b", now, 30.0) == 1
        assert jobs.reclaim_expired(s, now + timedelta(seconds=5), max_attempts=3) == 1
        s.commit()
        state = {j.id: (j.state, j.attempts, j.error) for j in s.exec(select(Job))}
        assert state[peer][0] == JobState.INFERRING  # renewed: still its
        assert state[dead][:2] == (JobState.QUEUED, 1)
        assert state[spent][0] == JobState.FAILED and "interrupted 3 times" in state[spent][2]
        claimed = jobs.claim_job(s, now + timedelta(seconds=5), owner="b", lease_s=10.0)
        s.commit()
        assert claimed is not None and claimed.owner == "b" and claimed.attempts == 2
        assert claimed.lease_until is not None and claimed.lease_until > now


def test_a_claimed_outbox_batch_is_skipped_by_the_other_sender(pg_engine, tmp_path):
    now = utcnow()
    (tmp_path / "out.dcm").write_bytes(b"x")
    with Session(pg_engine) as s:
        job_id = _job(s, "j", JobState.SENDING).id
        for i in range(4):
            s.add(
                OutboxItem(
                    job_id=job_id or 0,
                    destination="pacs",
                    kind="sc",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                    sop_instance_uid=f"1.2.3.{i}",
                    path="out.dcm",
                    next_attempt_at=now,
                    created_at=now,
                )
            )
        s.commit()
    sent: list[str] = []

    class Recording:
        def send(self, files: list[OutgoingFile]) -> list[Delivery]:
            sent.extend(str(f.path) for f in files)
            return [Delivery(f.path, True, "ok") for f in files]

    dest = DestinationSettings(name="pacs", ae_title="DEST", host="127.0.0.1", port=104)
    destinations = {"pacs": (dest, Recording())}
    first, second = Session(pg_engine), Session(pg_engine)
    try:
        assert outbox.deliver_due(first, destinations, tmp_path, now) == 4  # not committed yet
        assert outbox.deliver_due(second, destinations, tmp_path, now) == 0  # skipped: claimed
        first.commit()
        second.rollback()
        assert outbox.deliver_due(second, destinations, tmp_path, now) == 0  # committed: sent
        second.commit()
    finally:
        first.close()
        second.close()
    assert len(sent) == 4
    with Session(pg_engine) as s:
        assert {i.state for i in s.exec(select(OutboxItem))} == {OutboxState.SENT}
        assert s.get(Job, job_id).state == JobState.DONE


def test_a_series_is_routed_and_a_notification_claimed_by_one_node(pg_engine, tmp_path):
    now = utcnow()
    with Session(pg_engine) as s:
        s.add(
            Study(
                study_uid="1.2",
                first_received_at=now,
                last_received_at=now,
                state=StudyState.COMPLETE,
                notify_state="pending",
                notify_next_at=now,
            )
        )
        s.flush()
        s.add(
            Series(
                series_uid="1.2.3",
                study_uid="1.2",
                state=SeriesState.COMPLETE,
                first_received_at=now,
                last_received_at=now,
            )
        )
        s.commit()
    rules = load_rules(REPO / "config" / "routes.yaml")
    first, second = Session(pg_engine), Session(pg_engine)
    try:
        assert jobs.route_complete_series(first, rules, lambda m: True, tmp_path, now) == 1
        assert jobs.route_complete_series(second, rules, lambda m: True, tmp_path, now) == 0
        first.commit()
        second.rollback()
        assert jobs.route_complete_series(second, rules, lambda m: True, tmp_path, now) == 0
        second.commit()
        claimed = repo.claim_notification(first, now)
        assert claimed is not None and claimed.study_uid == "1.2"
        assert repo.claim_notification(second, now) is None  # the other notifier skips it
        claimed.notify_state = "sent"
        first.add(claimed)
        first.commit()
        second.rollback()
        assert repo.claim_notification(second, now) is None
    finally:
        first.close()
        second.close()


def test_a_node_on_another_data_folder_is_refused(pg_engine, tmp_path):
    now = utcnow()
    a = cluster.storage_id(tmp_path / "a")
    assert cluster.storage_id(tmp_path / "a") == a  # kept in the folder
    b = cluster.storage_id(tmp_path / "b")
    assert a != b
    cluster.register(pg_engine, "node-a", a, "all", "t", now, 30.0)
    cluster.register(pg_engine, "node-c", a, "worker", "t", now, 30.0)  # same folder: fine
    with pytest.raises(ConfigError, match="must share storage.data_dir"):
        cluster.register(pg_engine, "node-b", b, "worker", "t", now, 30.0)
    cluster.stopped(pg_engine, "node-a", now)
    cluster.stopped(pg_engine, "node-c", now)
    cluster.register(pg_engine, "node-b", b, "worker", "t", now, 30.0)  # no running node on a


def test_roles_other_than_all_are_refused_on_sqlite(tmp_path: Path):
    config = write_config(tmp_path, storage={"database_url": f"sqlite:///{tmp_path / 'node.db'}"})
    done = subprocess.run(
        [sys.executable, "-m", "node", "serve", "--config", str(config), "--role", "worker"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "role 'worker' needs the other roles' database" in done.stdout + done.stderr
