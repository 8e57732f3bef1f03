"""Nodes on SEPARATE data folders sharing one PostgreSQL database and one S3 object store (issue 15
part 3, docs/scale.md): a receiver, a worker and a sender, each with its own data folder; SeaweedFS
(tests/seaweed.py) on loopback. Studies sent to the receiver are all analysed (none "not routed:
cannot be read"), every output reaches a DCMTK storescp exactly once.

Without the object store the worker and the sender are refused at start (another data folder);
with it but without the worker's fetch, every job fails (its files are on the receiver)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.synth import generate_study
from tests.helpers import query_db, wait_for
from tests.scale.cluster import Destination, NodeProcess, dcmsend, node_config
from tests.scale.cluster import with_object_store as _with_object_store
from tests.seaweed import SeaweedFS

pytestmark = pytest.mark.slow

STUDIES = 4


@pytest.fixture
def seaweed(tmp_path: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path / "seaweed")
    yield server
    server.stop()


def _drained(db: str, jobs: int) -> bool:
    states = query_db(db, "select state, count(*) from job group by state")
    if sum(n for _, n in states) < jobs or any(s not in ("done", "failed") for s, _ in states):
        return False
    return not query_db(db, "select count(*) from outboxitem where state not in ('sent', 'failed')")[0][0]


def test_receiver_worker_and_sender_on_separate_data_folders_share_bytes_through_s3(
    tmp_path: Path, postgres, seaweed: SeaweedFS
) -> None:
    db = postgres.new_database()
    dest = Destination(tmp_path / "received")
    folders = {role: tmp_path / f"data-{role}" for role in ("receiver", "worker", "sender")}

    def start(role: str) -> NodeProcess:
        config = node_config(tmp_path / role, role, db, folders[role], dest.port, "", lease_s=5.0)
        return NodeProcess(_with_object_store(config, seaweed), role)

    procs = [start("receiver")]
    try:
        procs[0].wait_listening()
        procs += [start("worker"), start("sender")]
        wait_for(lambda: query_db(db, "select count(*) from clusternode")[0][0] == 3, 90, "nodes not up")
        studies = []
        for i in range(STUDIES):
            folder = tmp_path / "in" / f"study{i}"
            generate_study("cxr", folder, seed=300 + i, label="pneumonia", scale=0.5, write_masks=False)
            studies.append(sorted(folder.glob("*.dcm")))
        senders = [threading.Thread(target=dcmsend, args=(procs[0].port, files)) for files in studies]
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        started = time.monotonic()
        wait_for(lambda: _drained(db, STUDIES), 240, "jobs and outbox not drained")
        print(f"drained {time.monotonic() - started:.1f} s after the last study was sent")
        time.sleep(2.0)  # a duplicate send still under way would arrive now

        notes = query_db(db, "select state, route_note from series")
        assert [s for s, _ in notes] == ["routed"] * STUDIES, notes
        assert query_db(db, "select state, count(*) from job group by state") == [("done", STUDIES)]
        assert {r[0] for r in query_db(db, "select owner from job")} == {"worker"}
        timings = [json.loads(r[0]) for r in query_db(db, "select timings from job")]
        fetch = sorted(t.get("fetching", 0.0) for t in timings)
        assert all("fetching" in t for t in timings)  # each job fetched its files from the store
        total = sorted(round(sum(t.values()), 3) for t in timings)
        print(f"fetching per job (s): {fetch}; all stages per job (s): {total}")
        [(instances, uploaded)] = query_db(db, "select count(*), count(uploaded_at) from instance")
        assert instances == uploaded == sum(len(s) for s in studies)

        outputs = [r[0] for r in query_db(db, "select sop_instance_uid from outboxitem")]
        received = dest.counts()
        twice = {uid: n for uid, n in received.items() if n > 1}
        assert not twice, f"{len(twice)} outputs received more than once ({sum(received.values())} C-STOREs)"
        assert sorted(received) == sorted(outputs) and len(outputs) >= 2 * STUDIES

        # what went where: the instances only in the receiver's spool and the store; the worker read
        # them from its cache; the outputs written by the worker, fetched by the sender
        keys = seaweed.keys("site-a/")
        assert sum(k.startswith("site-a/spool/") for k in keys) == instances
        paths = [r[0] for r in query_db(db, "select path from outboxitem")]
        assert {f"site-a/{p}" for p in paths} <= set(keys)
        assert not (folders["worker"] / "spool").exists() or not any(
            (folders["worker"] / "spool").rglob("*.dcm")
        )
        assert len(list((folders["worker"] / "cache" / "spool").rglob("*.dcm"))) == instances
        assert all((folders["sender"] / p).is_file() for p in paths)
        assert all((folders["worker"] / p).is_file() for p in paths)
        assert not (folders["receiver"] / "outbox").exists()
        assert "cannot be read" not in procs[0].text()
    finally:
        for p in procs:
            p.stop()
        dest.stop()


def test_without_an_object_store_separate_folders_are_still_refused_and_with_a_wrong_key_too(
    tmp_path: Path, postgres, seaweed: SeaweedFS
) -> None:
    db = postgres.new_database()
    config = node_config(tmp_path / "receiver", "receiver", db, tmp_path / "data-r", 1, "", lease_s=5.0)
    receiver = NodeProcess(_with_object_store(config, seaweed), "receiver")
    try:
        receiver.wait_listening()
        plain = node_config(tmp_path / "worker", "worker", db, tmp_path / "data-w", 1, "", lease_s=5.0)
        worker = NodeProcess(plain, "worker")  # no object store: it sees another storage
        assert worker.proc.wait(120) == 1
        assert "or one storage.object_store" in worker.text() and "receiver" in worker.text()
        bad = _with_object_store(
            node_config(tmp_path / "worker2", "worker2", db, tmp_path / "data-w2", 1, "", lease_s=5.0),
            seaweed,
            secret_key="not-the-key",
        )
        worker2 = NodeProcess(bad, "worker")
        assert worker2.proc.wait(120) == 1
        assert "refused the credentials" in worker2.text() and "not-the-key" not in worker2.text()
    finally:
        receiver.stop()


def test_a_store_that_is_down_delays_routing_and_loses_nothing(
    tmp_path: Path, postgres, seaweed: SeaweedFS
) -> None:
    db = postgres.new_database()
    dest = Destination(tmp_path / "received")

    def start(role: str) -> NodeProcess:
        config = node_config(tmp_path / role, role, db, tmp_path / f"data-{role}", dest.port, "", lease_s=5.0)
        return NodeProcess(_with_object_store(config, seaweed, max_attempts=1, timeout_s=2), role)

    seaweed.stop()  # down before the nodes start: they start anyway (warned), the receiver accepts
    procs = [start("receiver")]
    try:
        procs[0].wait_listening()
        procs += [start("worker"), start("sender")]
        wait_for(lambda: query_db(db, "select count(*) from clusternode")[0][0] == 3, 90, "nodes not up")
        assert "starting anyway" in procs[1].text()
        folder = tmp_path / "in" / "study"
        generate_study("cxr", folder, seed=400, label="pneumonia", scale=0.5, write_masks=False)
        dcmsend(procs[0].port, sorted(folder.glob("*.dcm")))  # acknowledged: in the receiver's spool
        wait_for(lambda: query_db(db, "select state from series") == [("complete",)], 60, "never complete")
        time.sleep(3.0)  # several routing and upload passes while the store is down
        assert query_db(db, "select state from series") == [("complete",)]  # waits: not routed
        assert query_db(db, "select count(*), count(uploaded_at) from instance")[0][1] == 0
        assert query_db(db, "select count(*) from job")[0][0] == 0
        assert "upload pass failed, retrying" in procs[0].text()

        seaweed.start()  # back: uploaded, routed, analysed, delivered once
        wait_for(lambda: _drained(db, 1), 180, "not analysed and delivered once the store was back")
        time.sleep(1.0)
        assert query_db(db, "select state from job") == [("done",)]
        outputs = [r[0] for r in query_db(db, "select sop_instance_uid from outboxitem")]
        received = dest.counts()
        assert sorted(received) == sorted(outputs) and all(n == 1 for n in received.values())
    finally:
        for p in procs:
            p.stop()
        dest.stop()
