"""Several receiving processes of one host on one DICOM port (``dicom.reuse_port``, issue 16): the
kernel spreads the associations over both node processes, each files what it accepted with its own
committer, every study is analysed and delivered once; when one process dies, the port keeps
answering from the other and nothing acknowledged is lost.

Without ``SO_REUSEPORT`` the second process cannot bind the port (the test fails at its start)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import free_port, query_db, wait_for, write_config
from tests.scale.cluster import Destination, NodeProcess, dcmsend, node_config
from tests.scale.test_cluster import _drained, _studies

pytestmark = pytest.mark.slow

FIRST = 12  # one association each: the chance that the kernel gives every one to the same process is 2**-11
AFTER_KILL = 3


def _shared_port_config(config: Path, port: int) -> tuple[Path, int]:
    """The cluster node's configuration on the shared DICOM port, with its status page on (its
    /metrics counts the associations it accepted)."""
    data = yaml.safe_load(config.read_text())
    data["dicom"].update(port=port, reuse_port=True)
    data["web"] = {"enabled": True, "host": "127.0.0.1", "port": free_port()}
    config.write_text(yaml.safe_dump(data))
    return config, data["web"]["port"]


def _accepted(web_port: int) -> int:
    try:
        text = httpx.get(f"http://127.0.0.1:{web_port}/metrics", timeout=10).text
    except httpx.TransportError:
        return -1  # the status page is not up yet
    return sum(
        int(float(n))
        for n in re.findall(r'pacsnode_associations_total\{[^}]*outcome="accepted"[^}]*\} (\S+)', text)
    )


def _send_all(port: int, studies: list[list[Path]]) -> None:
    """Each study over its own association, all at once; every one must succeed."""
    errors: list[BaseException] = []

    def send(files: list[Path]) -> None:
        try:
            dcmsend(port, files)
        except BaseException as exc:  # noqa: BLE001 (reported below, from the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(files,)) for files in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors


def test_two_processes_share_the_port_and_one_survives_the_other(tmp_path, postgres):
    db = postgres.new_database()
    shared = tmp_path / "shared-data"
    dest = Destination(tmp_path / "received")
    port = free_port()
    nodes, web_ports = [], []
    for name in ("node-a", "node-b"):
        config, web_port = _shared_port_config(
            node_config(tmp_path / name, name, db, shared, dest.port, "", lease_s=20.0), port
        )
        nodes.append(NodeProcess(config))
        web_ports.append(web_port)
    try:
        for node in nodes:
            node.wait_listening()
        for web_port in web_ports:
            wait_for(lambda p=web_port: _accepted(p) == 0, 60, "status page not up")  # noqa: B023
        studies = _studies(tmp_path / "in", FIRST + AFTER_KILL)
        _send_all(port, studies[:FIRST])
        accepted = [_accepted(p) for p in web_ports]
        assert sum(accepted) == FIRST and min(accepted) >= 1, f"associations per process: {accepted}"
        wait_for(lambda: _drained(db, FIRST), 240, "jobs and outbox not drained")

        nodes[0].kill()  # the port still answers: from the other process only
        _send_all(port, studies[FIRST:])
        assert _accepted(web_ports[1]) == accepted[1] + AFTER_KILL
        total = FIRST + AFTER_KILL
        wait_for(lambda: _drained(db, total), 240, "jobs after the kill not drained")
        sent = sum(len(files) for files in studies)
        assert query_db(db, "select count(*), count(distinct sop_instance_uid) from instance") == [
            (sent, sent)
        ]
        assert query_db(db, "select state, count(*) from job group by state") == [("done", total)]
        outputs = [r[0] for r in query_db(db, "select sop_instance_uid from outboxitem")]
        received = dest.counts()
        assert sorted(received) == sorted(outputs) and all(n == 1 for n in received.values())
    finally:
        for node in nodes:
            node.stop()
        dest.stop()


def test_a_shared_port_is_refused_on_sqlite(tmp_path: Path):
    """Two processes on one SQLite file would both claim every job: the setting needs PostgreSQL."""
    from node.app import build_node
    from node.errors import ConfigError
    from node.settings import load_settings

    config = write_config(
        tmp_path, storage={"database_url": f"sqlite:///{tmp_path / 'node.db'}"}, dicom={"reuse_port": True}
    )
    with pytest.raises(ConfigError, match="dicom.reuse_port .* PostgreSQL"):
        build_node(load_settings(config))
