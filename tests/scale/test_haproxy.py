"""Receivers behind one address (issue 15, part 5): two identical receivers (same AE title) behind
a real HAProxy in TCP mode, run on deploy/haproxy/haproxy.cfg itself (its site values are
environment variables; here loopback ports), with a worker and a sender on the same PostgreSQL
database and data folder.

- Several modalities (concurrent ``dcmsend`` processes) send to HAProxy's port; both receivers get
  associations; one receiver is killed with SIGKILL while an association to it is open. The cut
  sends are retried, as a modality retries; HAProxy's /readyz check marks the dead receiver down
  and every later association goes to the other. At the end every instance is stored once,
  every job done once and every output received by the destination once.
- A receiver whose /readyz says "not ready" (its spool below storage.min_free_mb) is out of
  rotation: no association reaches it, all go to the ready one.

Mutation check: without ``option httpchk`` (or without ``check`` on the servers) HAProxy keeps
handing associations to the not-ready receiver and the second test fails."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import query_db, wait_for
from tests.scale.cluster import (
    Destination,
    HAProxy,
    Modality,
    NodeProcess,
    dcmsend,
    haproxy_binary,
    node_config,
    ready,
    receiver_config,
)
from tests.scale.test_cluster import _drained, _studies
from tests.scale.test_reuse_port import _accepted

pytestmark = pytest.mark.slow

SENDERS = 4  # concurrent modalities
ROUNDS = 3  # associations per modality
PER_ASSOCIATION = 2  # studies per association
# no node is killed mid-job here; a short lease on this loaded machine expired while a busy worker
# ran its first jobs (heartbeat late) and the job ran twice, which is not what this test is about
LEASE_S = 20.0


def _counted_once(db: str, dest: Destination, studies: int) -> None:
    sent = "select count(*), count(distinct sop_instance_uid) from instance"
    assert query_db(db, sent) == [(studies, studies)]  # one CXR instance per study
    assert query_db(db, "select state, count(*), max(attempts) from job group by state") == [
        ("done", studies, 1)
    ]
    outputs = [r[0] for r in query_db(db, "select sop_instance_uid from outboxitem")]
    received = dest.counts()
    twice = {uid: n for uid, n in received.items() if n > 1}
    assert not twice, f"{len(twice)} outputs received more than once"
    assert sorted(received) == sorted(outputs) and len(outputs) >= studies


def _cluster(tmp_path: Path, db: str, dest: Destination, *, full: str = "") -> tuple[list, list[int], list]:
    """Two receivers (``full``: the one whose spool is "full") and a worker and a sender."""
    shared = tmp_path / "shared-data"
    receivers, web_ports = [], []
    for name in ("receiver-1", "receiver-2"):
        config, web_port = receiver_config(
            node_config(tmp_path / name, name, db, shared, dest.port, "", lease_s=LEASE_S)
        )
        if name == full:
            data = yaml.safe_load(config.read_text())
            data["storage"]["min_free_mb"] = 1 << 40  # more than any disk has: every C-STORE refused
            config.write_text(yaml.safe_dump(data))
        receivers.append(NodeProcess(config, role="receiver"))
        web_ports.append(web_port)
    others = [
        NodeProcess(node_config(tmp_path / name, name, db, shared, dest.port, "", lease_s=LEASE_S), role=name)
        for name in ("worker", "sender")
    ]
    return receivers, web_ports, others


def test_two_receivers_behind_haproxy_one_killed_mid_association(tmp_path, postgres):
    haproxy_binary()
    db = postgres.new_database()
    dest = Destination(tmp_path / "received")
    receivers, web_ports, others = _cluster(tmp_path, db, dest)
    proxy: HAProxy | None = None
    try:
        for node in receivers:
            node.wait_listening()
            node.wait_ready(60)
        proxy = HAProxy(
            tmp_path / "haproxy", [(n.port, w) for n, w in zip(receivers, web_ports, strict=True)]
        )
        wait_for(lambda: all(s["status"] == "UP" for s in proxy.servers().values()), 30, "receivers not UP")

        total = SENDERS * ROUNDS * PER_ASSOCIATION
        studies = _studies(tmp_path / "in", total)
        files = [f for study in studies for f in study]
        batches = [files[i : i + PER_ASSOCIATION] for i in range(0, total, PER_ASSOCIATION)]
        modalities = [Modality(proxy.port, batches[i::SENDERS]) for i in range(SENDERS)]
        for m in modalities:
            m.thread.start()

        # kill receiver-1 while an association to it is open (after each receiver had some)
        def mid_association() -> bool:
            s = proxy.servers()
            return (
                int(s["receiver-2"]["stot"]) >= 1
                and int(s["receiver-1"]["stot"]) >= 2
                and (int(s["receiver-1"]["scur"]) >= 1)
            )

        wait_for(mid_association, 120, "no association open on receiver-1 while both had some")
        before = proxy.servers()
        receivers[0].kill()
        wait_for(
            lambda: proxy.status("receiver-1").startswith("DOWN"), 10, "HAProxy kept the dead receiver UP"
        )
        after_down = int(proxy.servers()["receiver-1"]["stot"])

        for m in modalities:
            m.thread.join(300)
        assert not [e for m in modalities for e in m.errors], [e for m in modalities for e in m.errors]
        assert sum(m.failures for m in modalities) >= 1, "no association was cut by the kill"
        s = proxy.servers()
        # nothing more was handed to the dead receiver once it was DOWN; the survivor took the rest
        assert int(s["receiver-1"]["stot"]) == after_down
        assert int(s["receiver-2"]["stot"]) > int(before["receiver-2"]["stot"])
        assert _accepted(web_ports[1]) >= 1

        wait_for(lambda: _drained(db, total), 300, "jobs and outbox not drained")
        time.sleep(2.0)  # a duplicate send still under way would arrive now
        _counted_once(db, dest, total)
    finally:
        if proxy is not None:
            proxy.stop()
        for node in receivers + others:
            node.stop()
        dest.stop()


def test_a_receiver_that_is_not_ready_gets_no_association(tmp_path, postgres):
    haproxy_binary()
    db = postgres.new_database()
    dest = Destination(tmp_path / "received")
    receivers, web_ports, others = _cluster(tmp_path, db, dest, full="receiver-2")
    proxy: HAProxy | None = None
    try:
        for node in receivers:
            node.wait_listening()
        receivers[0].wait_ready(60)
        wait_for(lambda: _accepted(web_ports[1]) == 0, 60, "receiver-2's status page not up")
        assert ready(web_ports[1]) == 503  # listening, but its spool is "full"
        proxy = HAProxy(
            tmp_path / "haproxy", [(n.port, w) for n, w in zip(receivers, web_ports, strict=True)]
        )
        wait_for(lambda: proxy.status("receiver-2").startswith("DOWN"), 30, "not-ready receiver not DOWN")
        assert proxy.status("receiver-1") == "UP"

        studies = _studies(tmp_path / "in", 6)
        threads = [threading.Thread(target=dcmsend, args=(proxy.port, study)) for study in studies]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        s = proxy.servers()
        assert (int(s["receiver-1"]["stot"]), int(s["receiver-2"]["stot"])) == (6, 0)
        assert _accepted(web_ports[1]) == 0 and _accepted(web_ports[0]) == 6
        wait_for(lambda: _drained(db, 6), 240, "jobs and outbox not drained")
        _counted_once(db, dest, 6)
    finally:
        if proxy is not None:
            proxy.stop()
        for node in receivers + others:
            node.stop()
        dest.stop()
