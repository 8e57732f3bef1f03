"""Several `pacs-node serve` processes on one PostgreSQL database and one shared data folder
(issue 15): every output reaches the destination exactly once, every series is routed once, every
urgent study is notified once; a worker killed mid-job loses it to another after its lease.

Mutation check (docs/scale.md): run the node processes on a copy of ``node`` whose
``deliver_due`` lacks ``.with_for_update(skip_locked=True)`` (PACS_NODE_TEST_NODE_SRC): the
exactly-once test fails with SOP instances received twice."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from node.synth import generate_study
from tests.helpers import free_port, query_db, wait_for
from tests.scale.cluster import Destination, NodeProcess, WebhookReceiver, dcmsend, node_config

pytestmark = pytest.mark.slow

STUDIES = 6


def _studies(folder: Path, count: int) -> list[list[Path]]:
    out = []
    for i in range(count):
        study = folder / f"study{i}"
        generate_study("cxr", study, seed=100 + i, label="pneumonia", scale=0.5, write_masks=False)
        out.append(sorted(study.glob("*.dcm")))
    return out


def _drained(db: str, jobs: int) -> bool:
    states = query_db(db, "select state, count(*) from job group by state")
    if sum(n for _, n in states) < jobs or any(s not in ("done", "failed") for s, _ in states):
        return False
    if query_db(db, "select count(*) from outboxitem where state != 'sent'")[0][0]:
        return False
    return not query_db(db, "select count(*) from study where notify_state = 'pending'")[0][0]


def _decided(node: NodeProcess) -> int:
    return sum(int(n) for n in re.findall(r"routing: (\d+) series decided", node.text()))


def test_two_nodes_deliver_route_and_notify_exactly_once(tmp_path, postgres):
    db = postgres.new_database()
    shared = tmp_path / "shared-data"
    dest_port = free_port()  # the destination is down at first: both senders retry the same backlog
    dest: Destination | None = None
    hook = WebhookReceiver()
    nodes = [
        NodeProcess(node_config(tmp_path / name, name, db, shared, dest_port, hook.url, lease_s=5.0))
        for name in ("node-a", "node-b")
    ]
    try:
        for node in nodes:
            node.wait_listening()
        studies = _studies(tmp_path / "in", STUDIES)
        senders = [
            threading.Thread(target=dcmsend, args=(nodes[i % 2].port, files))
            for i, files in enumerate(studies)
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join(120)
        tried = "select count(*) from job where state = 'sending'"
        wait_for(lambda: query_db(db, tried)[0][0] == STUDIES, 240, "jobs did not reach sending")
        dest = Destination(tmp_path / "received", dest_port)  # back up: the backlog goes out
        wait_for(lambda: _drained(db, STUDIES), 240, "jobs, outbox and webhooks not drained")
        time.sleep(2.0)  # a duplicate send still under way would arrive now
        outputs = [r[0] for r in query_db(db, "select sop_instance_uid from outboxitem")]
        received = dest.counts()
        twice = {uid: n for uid, n in received.items() if n > 1}
        assert not twice, f"{len(twice)} outputs received more than once ({sum(received.values())} C-STOREs)"
        assert sorted(received) == sorted(outputs) and len(outputs) >= 2 * STUDIES
        assert query_db(db, "select count(*), count(distinct key) from job") == [(STUDIES, STUDIES)]
        assert query_db(db, "select state, count(*) from job group by state") == [("done", STUDIES)]
        series = query_db(db, "select count(*) from series where state = 'routed'")[0][0]
        assert series == STUDIES and sum(_decided(n) for n in nodes) == series  # each routed by one node
        notified = {r[0] for r in query_db(db, "select study_uid from study where notify_state = 'sent'")}
        assert notified, "no study became urgent: the webhook part tests nothing"
        assert dict(hook.posts) == dict.fromkeys(notified, 1)
        owners = {r[0] for r in query_db(db, "select owner from job")}
        print(f"outputs {len(outputs)}, C-STOREs {sum(received.values())}, jobs run by {sorted(owners)}")
    finally:
        for node in nodes:
            node.stop()
        if dest is not None:
            dest.stop()
        hook.stop()


def test_killed_worker_loses_its_job_after_the_lease_and_it_finishes_once(tmp_path, postgres):
    db = postgres.new_database()
    shared = tmp_path / "shared-data"
    dest = Destination(tmp_path / "received")
    lease = 2.0

    def start(name: str, role: str) -> NodeProcess:
        return NodeProcess(node_config(tmp_path / name, name, db, shared, dest.port, "", lease_s=lease), role)

    receiver = start("receiver", "receiver")
    workers = {name: start(name, "worker") for name in ("worker-1", "worker-2")}
    sender = start("sender", "sender")
    procs = [receiver, sender, *workers.values()]
    try:
        receiver.wait_listening()
        wait_for(lambda: query_db(db, "select count(*) from clusternode")[0][0] == 4, 60, "nodes not up")
        (files,) = _studies(tmp_path / "in", 1)
        dcmsend(receiver.port, files)
        running = "select owner from job where state in ('preprocessing', 'inferring', 'writing')"
        owner = wait_for(lambda: query_db(db, running), 120, "job never ran")[0][0]
        workers[owner].kill()
        killed_at = time.monotonic()
        assert query_db(db, "select count(*) from outboxitem")[0][0] == 0, "killed too late: outputs queued"
        wait_for(lambda: _drained(db, 1), 120, "the killed worker's job was not finished by another")
        (survivor,) = set(workers) - {owner}
        [(state, attempts, final_owner)] = query_db(db, "select state, attempts, owner from job")
        assert (state, attempts, final_owner) == ("done", 2, survivor)
        assert time.monotonic() - killed_at >= lease * 0.5  # not before its lease ran out
        assert any(
            "whose node stopped renewing their lease" in p.text() for p in procs if p is not workers[owner]
        )
        outputs = [r[0] for r in query_db(db, "select sop_instance_uid from outboxitem")]
        received = dest.counts()
        assert sorted(received) == sorted(outputs) and all(n == 1 for n in received.values())
    finally:
        for p in procs:
            p.stop()
        dest.stop()


def test_a_node_on_a_separate_data_folder_is_refused_at_start(tmp_path, postgres):
    db = postgres.new_database()
    a = NodeProcess(node_config(tmp_path / "a", "node-a", db, tmp_path / "data-a", free_port(), "", 5.0))
    try:
        a.wait_listening()
        b = NodeProcess(node_config(tmp_path / "b", "node-b", db, tmp_path / "data-b", free_port(), "", 5.0))
        assert b.proc.wait(120) == 1
        assert "must share storage.data_dir (a NAS mount)" in b.text()
        assert "node-a" in b.text().split("must share")[0]  # names the running node
        assert query_db(db, "select node_id from clusternode") == [("node-a",)]
    finally:
        a.stop()
