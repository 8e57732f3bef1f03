"""Errors that mean what they say: an output that cannot be built from the data fails its job at
once (no retry: building SR/SC/PM is pure and deterministic), with a message that names the
attribute and what the images hold; I/O errors are still retried; the study shows "failed" on
the worklist and its page, with the job's error; a job interrupted on every attempt stops."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

import node.runner as runner_module
from node.outputs import OutputError
from node.store.tables import Job, JobState, utcnow
from node.synth import generate_study
from tests.helpers import REPO, raw_store_file


def _models(folder: Path) -> Path:
    """A models folder with only the cxr reference model (fast start)."""
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "cxr").symlink_to(REPO / "models" / "onnx" / "cxr")
    return models


def _cxr_without_spacing(folder: Path) -> tuple[str, Path]:
    """A phantom chest radiograph whose ImagerPixelSpacing was removed (as some exports do)."""
    truth = generate_study("cxr", folder / "cxr", seed=5, label="normal", scale=0.25, write_masks=False)
    (path,) = sorted((folder / "cxr").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    for keyword in ("ImagerPixelSpacing", "PixelSpacing"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    return truth.study_instance_uid, path


def _builder_needing_spacing(result, sources, identity, settings):  # noqa: ANN001, ANN202
    """An output builder that reads ImagerPixelSpacing from the source, as the SR's image
    region code once did, and wraps the AttributeError in OutputError as node/outputs does."""
    try:
        _ = sources[0].ImagerPixelSpacing
    except AttributeError as exc:
        raise OutputError(f"measurement report content could not be built: {exc}") from exc
    raise AssertionError("the source image should have no ImagerPixelSpacing")


def _builder_disk_error(result, sources, identity, settings):  # noqa: ANN001, ANN202
    raise OSError(28, "No space left on device")


def _wait_finished(node, timeout: float = 90.0) -> Job:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(node.engine) as s:
            jobs = list(s.exec(select(Job)))
        if jobs and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs):
            (job,) = jobs
            return job
        time.sleep(0.1)
    raise AssertionError(f"job did not finish: {[(j.state, j.attempts, j.error) for j in jobs]}")


@pytest.fixture
def failing_node(make_node, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    def start(builder):  # noqa: ANN001, ANN202
        monkeypatch.setattr(runner_module, "build_outputs", builder)
        return make_node(
            models={"directory": str(_models(tmp_path)), "providers": ["CPUExecutionProvider"]},
            assembly={"series_quiet_s": 0.3, "poll_interval_s": 0.1},
            runner={"max_attempts": 3, "retry_backoff_s": 0},
        )

    return start


def test_output_that_cannot_be_built_from_the_data_fails_at_once(failing_node, tmp_path):
    node = failing_node(_builder_needing_spacing)
    study_uid, path = _cxr_without_spacing(tmp_path)
    assert raw_store_file(node.scp.port, path) == 0
    job = _wait_finished(node)
    assert job.state == JobState.FAILED
    assert job.attempts == 1, job.error  # permanent: not retried
    assert job.error.startswith("OutputError: measurement report content could not be built: ")
    assert "ImagerPixelSpacing (0018,1164) is absent in 1 of 1 source images" in job.error
    assert "DX Digital X-Ray Image Storage" in job.error or "CR Computed Radiography" in job.error
    assert "retry" not in job.error and "attempts" not in job.error

    client = TestClient(node.web_app())
    worklist = client.get("/api/v1/worklist").json()
    (item,) = [i for i in worklist["items"] if i["study"]["study_uid"] == study_uid]
    assert item["study"]["priority"] == "failed"
    detail = client.get(f"/api/v1/studies/{study_uid}").json()
    assert detail["priority"] == "failed"
    assert "ImagerPixelSpacing" in detail["jobs"][0]["error"]
    page = client.get(f"/studies/{study_uid}").text
    assert 'class="prio prio-failed">failed<' in page
    assert "ImagerPixelSpacing (0018,1164) is absent" in page
    listing = client.get("/worklist").text
    assert 'class="prio prio-failed">failed<' in listing and "analysis failed" in listing
    assert 'class="prio prio-pending"' not in listing


def test_io_error_while_writing_is_retried(failing_node, tmp_path):
    node = failing_node(_builder_disk_error)
    _, path = _cxr_without_spacing(tmp_path)
    assert raw_store_file(node.scp.port, path) == 0
    job = _wait_finished(node)
    assert job.state == JobState.FAILED
    assert job.attempts == 3
    assert job.error.startswith("after 3 attempts: OSError")


def test_job_interrupted_on_every_attempt_is_failed_not_requeued(make_node, tmp_path):
    """A job that was running when the node stopped goes back to the queue, unless it has used
    every attempt: then it fails, so that a job that kills the node does not do so for ever."""
    node = make_node(tmp_path, runner={"max_attempts": 2})
    now = utcnow()

    def job(key: str, attempts: int) -> Job:
        return Job(
            key=key,
            model_id="absent-model",
            rule="r",
            level="series",
            study_uid="1.2.3",
            series_uids=["1.2.3.4"],
            state=JobState.INFERRING,
            attempts=attempts,
            created_at=now,
            updated_at=now,
            not_before=now + timedelta(hours=1),
        )

    node.runner.stop()
    with Session(node.engine) as s:
        s.add(job("exhausted", 2))
        s.add(job("again", 1))
        s.commit()
    node.runner.start()
    with Session(node.engine) as s:
        rows = {j.key: j for j in s.exec(select(Job))}
    assert rows["exhausted"].state == JobState.FAILED and rows["exhausted"].attempts == 2
    assert rows["exhausted"].error == "interrupted 2 times: the node stopped while each attempt ran"
    assert rows["exhausted"].finished_at is not None
    assert rows["again"].state != JobState.FAILED or "interrupted" not in rows["again"].error
