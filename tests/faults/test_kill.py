"""SIGKILL of the node process during inference and during sending, then a restart: the work
resumes, and the destination receives each output once, under the SOP Instance UIDs the node
chose before it died (never a second copy under new UIDs)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from node.synth import generate_study
from tests.helpers import (
    StoreSCP,
    analysing_config,
    free_port,
    need,
    node_db_url,
    query_db,
    raw_store_file,
    start_node_process,
    wait_for,
)

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, dest_port: int) -> Path:
    return analysing_config(
        tmp_path,
        dest_port,
        {"max_attempts": 100, "backoff_initial_s": 0.2, "backoff_max_s": 0.5},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
    )


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def _send_cxr(tmp_path: Path, port: int) -> None:
    generate_study("cxr", tmp_path / "cxr", seed=3, label="pneumonia", scale=0.5, write_masks=False)
    for f in sorted((tmp_path / "cxr").glob("*.dcm")):
        assert raw_store_file(port, f) == 0


def _received_uids(scp: StoreSCP) -> list[str]:
    return [str(d.SOPInstanceUID) for d in scp.received()]


def test_sigkill_during_sending_then_restart_delivers_once(tmp_path):
    need("storescp")
    dest_port = free_port()  # nothing listens yet: the destination is down
    config = _config(tmp_path, dest_port)
    db = node_db_url(config)
    log = tmp_path / "node.log"
    node = start_node_process(config, log)
    scp = None
    try:
        import yaml

        port = yaml.safe_load(config.read_text())["dicom"]["port"]
        _send_cxr(tmp_path, port)
        # outputs queued and already tried at least once against the dead destination
        tried = "select count(*) from outboxitem where state='pending' and attempts>0"
        wait_for(lambda: query_db(db, tried)[0][0], 90, "no pending outbox rows")
        queued = {r[0] for r in query_db(db, "select sop_instance_uid from outboxitem")}
        assert len(queued) >= 2  # SR + secondary capture
        _kill(node)
        scp = StoreSCP(tmp_path / "received", dest_port)
        node = start_node_process(config, log)
        wait_for(
            lambda: query_db(db, "select count(*) from outboxitem where state!='sent'")[0][0] == 0,
            60,
            "outbox not drained after restart",
        )
        received = _received_uids(scp)
        assert sorted(received) == sorted(queued)  # each output once, under the UIDs chosen before the kill
        assert {r[0] for r in query_db(db, "select sop_instance_uid from outboxitem")} == queued
        assert query_db(db, "select state from job") == [("done",)]
    finally:
        node.kill()
        node.wait(10)
        if scp is not None:
            scp.stop()


def _node_sent_a_cxr(tmp_path: Path) -> tuple[Path, str, Path, StoreSCP, subprocess.Popen, int]:
    """A node process with its destination up, sent a CXR study: (config, database URL, log,
    destination, process, DICOM port)."""
    import yaml

    need("storescp")
    dest_port = free_port()
    config = _config(tmp_path, dest_port)
    log = tmp_path / "node.log"
    scp = StoreSCP(tmp_path / "received", dest_port)
    node = start_node_process(config, log)
    port = yaml.safe_load(config.read_text())["dicom"]["port"]
    _send_cxr(tmp_path, port)
    return config, node_db_url(config), log, scp, node, port


def test_sigkill_during_inference_then_restart_resumes(tmp_path):
    config, db, log, scp, node, _ = _node_sent_a_cxr(tmp_path)
    try:
        wait_for(
            lambda: query_db(db, "select 1 from job where state in ('preprocessing', 'inferring')"),
            90,
            "job never reached inference",
        )
        _kill(node)
        assert query_db(db, "select count(*) from outboxitem")[0][0] == 0  # killed before any output
        assert _received_uids(scp) == []
        node = start_node_process(config, log)
        wait_for(
            lambda: (
                query_db(db, "select state from job") == [("done",)]
                and query_db(db, "select count(*) from outboxitem where state!='sent'")[0][0] == 0
            ),
            90,
            "interrupted job not resumed to done",
        )
        queued = {r[0] for r in query_db(db, "select sop_instance_uid from outboxitem")}
        received = _received_uids(scp)
        assert len(queued) >= 2
        assert sorted(received) == sorted(queued)  # one copy each
        assert query_db(db, "select attempts from job")[0][0] >= 2  # it really ran again
    finally:
        node.kill()
        node.wait(10)
        scp.stop()


def test_a_job_that_takes_the_node_down_each_time_fails_after_max_attempts(tmp_path):
    """Issue 21, item 1's crash loop: a job that the node dies in on every attempt (here the node
    is killed while the job runs, as the kernel's OOM killer did) is resumed at each restart only
    while it has attempts left; at the restart after the last one it fails, naming why, and is
    never run again. A study sent afterwards is analysed: the node serves on."""
    attempts = 3  # runner.max_attempts, the default
    config, db, log, scp, node, port = _node_sent_a_cxr(tmp_path)
    try:
        running = (
            "select 1 from job where state in ('preprocessing', 'inferring', 'writing') and attempts = {}"
        )
        for attempt in range(1, attempts + 1):  # the row of the run killed before reads 'inferring' too
            wait_for(lambda n=attempt: query_db(db, running.format(n)), 90, f"attempt {attempt} never ran")
            _kill(node)
            assert query_db(db, "select attempts from job") == [(attempt,)]
            node = start_node_process(config, log)
        wait_for(
            lambda: query_db(db, "select state from job") == [("failed",)], 60, "crash-looping job not failed"
        )
        ((error, tried),) = query_db(db, "select error, attempts from job")
        assert f"interrupted {attempts} times" in error and "node stopped" in error
        assert tried == attempts
        assert query_db(db, "select count(*) from outboxitem")[0][0] == 0
        # the node serves on: another study is analysed; the failed job stays failed
        generate_study("cxr", tmp_path / "next", seed=4, label="normal", scale=0.5, write_masks=False)
        for f in sorted((tmp_path / "next").glob("*.dcm")):
            assert raw_store_file(port, f) == 0
        wait_for(
            lambda: sorted(r[0] for r in query_db(db, "select state from job")) == ["done", "failed"],
            90,
            "the next study was not analysed",
        )
        assert query_db(db, "select attempts from job where state='failed'") == [(attempts,)]
    finally:
        node.kill()
        node.wait(10)
        scp.stop()
