"""Instances that arrive after their series was analysed: the series is analysed again, whole, as
a revision job with its own output UIDs; the first job and its outputs stay as they were."""

from __future__ import annotations

import time
from pathlib import Path

from pydicom.uid import generate_uid
from sqlmodel import Session, col, select

from node.store.tables import Job, JobState
from tests.helpers import make_series, raw_store_file

ROOT = Path(__file__).resolve().parents[2]


def _jobs(node) -> list[Job]:
    with Session(node.engine) as s:
        return list(s.exec(select(Job).order_by(col(Job.id))))


def _wait_done(node, count: int, timeout: float = 60.0) -> list[Job]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _jobs(node)
        if len(jobs) == count and all(j.state == JobState.DONE for j in jobs):
            return jobs
        time.sleep(0.1)
    raise AssertionError(f"expected {count} done jobs, have {[(j.key, j.state) for j in _jobs(node)]}")


def test_late_instances_are_analysed_by_a_revision_job(make_node, tmp_path):
    node = make_node(
        models={"directory": str(ROOT / "models" / "onnx"), "providers": ["CPUExecutionProvider"]},
        assembly={"series_quiet_s": 1.5, "poll_interval_s": 0.1},
    )
    study, series = generate_uid(), generate_uid()
    files = make_series(tmp_path / "in", 5, body_part="ABDOMEN", study_uid=study, series_uid=series)
    for f in files[:3]:
        assert raw_store_file(node.scp.port, f) == 0
    (first,) = _wait_done(node, 1)
    assert first.recorded_result().images == 3

    for f in files[3:]:  # the rest of the series, after it was analysed
        assert raw_store_file(node.scp.port, f) == 0
    first_again, revision = _wait_done(node, 2)
    assert revision.key == f"{first.key}#2" and revision.series_uids == [series]
    assert revision.recorded_result().images == 5
    assert (first_again.result, first_again.finished_at) == (first.result, first.finished_at)
    first_uids = {o.sop_instance_uid for o in first.recorded_result().outputs}
    second_uids = {o.sop_instance_uid for o in revision.recorded_result().outputs}
    assert first_uids and second_uids and not first_uids & second_uids  # new UIDs for the new result

    for f in files:  # everything again: duplicates only, nothing new to analyse
        assert raw_store_file(node.scp.port, f) == 0
    time.sleep(2.5)
    assert len(_jobs(node)) == 2
