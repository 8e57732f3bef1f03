"""The node's configured resource budget (``limits``) is the one its jobs decode under, not only
the default: a site that lowers it sees its jobs refuse what is over it, once, naming the limit."""

from __future__ import annotations

import time

from sqlmodel import Session, select

from node.store.tables import Job, JobState
from node.synth import generate_study
from tests.helpers import REPO, raw_store_file


def test_jobs_decode_under_the_configured_limits(make_node, tmp_path):
    node = make_node(
        models={"directory": str(REPO / "models" / "onnx"), "providers": ["CPUExecutionProvider"]},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
        runner={"max_attempts": 3, "retry_backoff_s": 0},
        limits={"max_frame_pixels": 100_000},  # below the phantom radiograph's ~190 000 pixels
    )
    truth = generate_study("cxr", tmp_path / "cxr", seed=4, label="normal", scale=0.25, write_masks=False)
    for instance in truth.instances:
        assert raw_store_file(node.scp.port, tmp_path / "cxr" / instance.file) == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with Session(node.engine) as s:
            jobs = list(s.exec(select(Job)))
        if jobs and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs):
            break
        time.sleep(0.2)
    (job,) = jobs
    assert job.state == JobState.FAILED and job.attempts == 1, (job.state, job.attempts, job.error)
    assert "limits.max_frame_pixels (100000)" in job.error, job.error
