"""Resumption: a job that a stopped node left mid-way is run again by the next start, and its
outputs keep their SOP Instance UIDs, so the destination never holds two copies of a result."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session, select

from node.app import build_node
from node.settings import load_settings
from node.store.tables import Job, JobState, OutboxItem, OutboxState
from node.synth import generate_study
from tests.helpers import StoreSCP, free_port, raw_store_file, wait_first_job_finished, write_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_interrupted_job_resumes_with_the_same_output_uids(tmp_path):
    port = free_port()
    config = write_config(
        tmp_path,
        models={"directory": str(ROOT / "models" / "onnx")},
        assembly={"series_quiet_s": 1.0, "poll_interval_s": 0.2},
        destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": port}],
        outputs={"send_to": "all"},
    )
    scp = StoreSCP(tmp_path / "received", port)
    try:
        node = build_node(load_settings(config))
        node.start()
        try:
            generate_study("cxr", tmp_path / "cxr", seed=11, label="pneumonia", scale=0.5)
            for f in sorted((tmp_path / "cxr").glob("*.dcm")):
                assert raw_store_file(node.scp.port, f) == 0
            first = wait_first_job_finished(node, 180.0)
        finally:
            node.stop()
        assert first.state == JobState.DONE, first.error
        with Session(node.engine) as s:
            sent_first = {i.sop_instance_uid for i in s.exec(select(OutboxItem))}
            # as if the process had died while inferring: the job is mid-way, nothing queued to send
            job = s.get(Job, first.id)
            job.state, job.result = JobState.INFERRING, ""
            s.add(job)
            for item in s.exec(select(OutboxItem)):
                s.delete(item)
            s.commit()
        received_first = {str(d.SOPInstanceUID) for d in scp.received()}
        assert received_first == sent_first and len(sent_first) >= 2  # SR + heatmap at least

        restarted = build_node(load_settings(config))
        restarted.start()
        try:
            again = wait_first_job_finished(restarted, 180.0)
        finally:
            restarted.stop()
        assert again.id == first.id and again.state == JobState.DONE
        assert again.attempts == first.attempts + 1
        with Session(restarted.engine) as s:
            items = list(s.exec(select(OutboxItem)))
        assert {i.sop_instance_uid for i in items} == sent_first  # the same objects, re-sent
        assert all(i.state == OutboxState.SENT for i in items)
        # the destination got the same SOP Instance UIDs again: a PACS keeps one copy of each
        received = [str(d.SOPInstanceUID) for d in scp.received()]
        assert set(received) == sent_first
    finally:
        scp.stop()
