"""GET /api/v1/jobs and /jobs/{id}, POST /jobs/{id}/retry and /retry.

Retry: failed jobs and sends appear on the overview with a retry button for admins; the button
(and the API) puts them back in the queue for the runner.

Shadow jobs (issue 18): a job result records the threshold in force per finding and whether the
model ran in shadow; the jobs API and the study page mark a shadow model's job (and the status
line names it), feedback on a shadow job's findings is accepted and counts in the shadow model's
figures only, and the feedback takes the recorded threshold before the loaded manifest's. Results
written before either was recorded still load (threshold unknown, shadow read from the monitoring
run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from node.store.tables import Feedback, Job, JobState, ModelRun, OutboxItem, OutboxState, Study, utcnow
from node.types import JobResult
from tests.helpers import REPO, add_job, raw_store_file, wait_for
from tests.monitoring.common import model_copy, phantoms
from tests.web.conftest import ADMIN_TOKEN, READ_TOKEN, TOKENS

SHADOW_THRESHOLDS = {"tuberculosis": 0.0, "pneumonia": 0.0}  # the candidate calls everything


def _rules(folder: Path) -> Path:
    path = folder / "routes.yaml"
    rule = {
        "name": "cxr",
        "match": {"modality": ["CR", "DX"]},
        "models": ["cxr", "cxr-next"],
        "grouping": "image",
    }
    path.write_text(yaml.safe_dump({"rules": [rule]}))
    return path


@pytest.mark.timeout(300)
def test_shadow_job_marked_thresholds_recorded_and_feedback_kept_apart(make_node, tmp_path: Path) -> None:  # noqa: ANN001
    models = tmp_path / "models"
    active_manifest = yaml.safe_load((model_copy(models) / "manifest.yaml").read_text())
    model_copy(models, "cxr-next", mode="shadow", version="2.0.0-rc1", thresholds=SHADOW_THRESHOLDS)
    node = make_node(
        models={"directory": str(models), "providers": ["CPUExecutionProvider"]},
        routing={"rules_file": str(_rules(tmp_path))},
        web={"tokens": TOKENS},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
    )
    (path,) = phantoms(tmp_path / "studies", range(90, 91))
    assert raw_store_file(node.scp.port, path) == 0
    client = TestClient(node.web_app(), follow_redirects=False)
    read = {"Authorization": f"Bearer {READ_TOKEN}"}

    def done() -> list[dict]:
        items = client.get("/api/v1/jobs", headers=read).json()["items"]
        return items if len(items) == 2 and all(j["state"] == "done" for j in items) else []

    jobs = {j["model_id"]: j for j in wait_for(done, 240, "both jobs done")}  # type: ignore[union-attr]
    active, shadow = jobs["cxr"], jobs["cxr-next"]
    assert (active["shadow"], shadow["shadow"]) == (False, True)
    assert client.get(f"/api/v1/jobs/{shadow['id']}", headers=read).json()["shadow"] is True
    # each finding carries the threshold its model ran at, in the API and in the stored result
    active_thresholds = {lb["name"]: lb["threshold"] for lb in active_manifest["labels"]}
    assert {f["label"]: f["threshold"] for f in active["findings"]} == active_thresholds
    assert {f["label"]: f["threshold"] for f in shadow["findings"]} == SHADOW_THRESHOLDS
    with Session(node.engine) as s:
        stored = {j.model_id: json.loads(j.result) for j in s.exec(select(Job))}
    assert stored["cxr-next"]["shadow"] is True and stored["cxr"]["shadow"] is False
    assert {f["label"]: f["threshold"] for f in stored["cxr"]["findings"]} == active_thresholds

    # the study page marks the shadow job (and its feedback panel); the status line names it
    study_uid = shadow["study_uid"]
    page = client.get(f"/studies/{study_uid}", headers=read).text
    shadow_table = page[page.index(f'id="job-{shadow["id"]}"') :].split("</table>")[0]
    active_table = page[page.index(f'id="job-{active["id"]}"') :].split("</table>")[0]
    assert 'class="job shadow"' in page and ">shadow</span>" in shadow_table
    assert ">shadow</span>" not in active_table
    panel = page[page.index(f'id="feedback-{shadow["id"]}"') :].split("</thead>")[0]
    assert ">shadow</span>" in panel
    assert ">shadow</span>" not in page[page.index(f'id="feedback-{active["id"]}"') :].split("</thead>")[0]
    status = client.get("/", headers=read).text
    assert "cxr-next (shadow):" in status

    # feedback on the shadow job's finding: accepted, with the recorded threshold, and counted in
    # the shadow model's monitoring figures, not the active model's
    answer = client.post(
        f"/api/v1/jobs/{shadow['id']}/feedback",
        json={"label": "tuberculosis", "verdict": "disagree"},
        headers=read,
    )
    assert answer.status_code == 201, answer.text
    assert (answer.json()["model_id"], answer.json()["threshold"]) == ("cxr-next", 0.0)
    figures = {m["model_id"]: m for m in client.get("/api/v1/monitoring", headers=read).json()["models"]}
    assert figures["cxr-next"]["mode"] == "shadow"
    assert figures["cxr-next"]["feedback"]["verdicts"] == 1
    assert figures["cxr-next"]["feedback"]["ppv"] == 0.0  # its one rated positive was wrong
    assert figures["cxr"]["feedback"]["verdicts"] == 0


def test_the_recorded_threshold_comes_before_the_manifest_and_old_results_load(make_node) -> None:  # noqa: ANN001
    node = make_node(
        models={"directory": str(REPO / "models" / "onnx"), "providers": ["CPUExecutionProvider"]},
        web={"tokens": TOKENS},
        runner={"workers": 1},
    )
    node.runner.stop()
    manifest = node.models.registry.models["cxr"].manifest
    version = manifest.version
    loaded = {lb.name: lb.threshold for lb in manifest.labels}
    recorded = {"label": "pneumonia", "probability": 0.4, "positive": True, "threshold": 0.35}
    old = {"label": "tuberculosis", "probability": 0.2, "positive": False}  # before thresholds were kept
    rows = {}
    with Session(node.engine) as s:
        for name, findings, ver in (
            ("recorded", [recorded, old], version),
            ("other-version", [old], "0.9.0"),
        ):
            result = {"model": "cxr", "version": ver, "findings": findings, "outputs": []}
            rows[name] = add_job(
                s, key=f"cxr|series|{name}", state="done", model_id="cxr", study_uid=f"1.2.{len(rows)}",
                result=json.dumps(result), finished_at=utcnow(),
            ).id  # fmt: skip
        # a shadow job from before the result recorded it: its monitoring run says so
        s.add(ModelRun(job_id=rows["other-version"], model_id="cxr", model_version="0.9.0", shadow=True,
                       recorded_at=utcnow(), subject="series|1.2.1"))  # fmt: skip
        s.commit()
    parsed = JobResult.model_validate_json(json.dumps({"model": "cxr", "findings": [old]}))
    assert parsed.findings[0].threshold is None and parsed.shadow is None

    client = TestClient(node.web_app())
    read = {"Authorization": f"Bearer {READ_TOKEN}"}

    def verdict(job_id: int, label: str) -> float | None:
        answer = client.post(
            f"/api/v1/jobs/{job_id}/feedback", json={"label": label, "verdict": "agree"}, headers=read
        )
        assert answer.status_code == 201, answer.text
        return answer.json()["threshold"]

    assert verdict(rows["recorded"], "pneumonia") == 0.35 != loaded["pneumonia"]  # recorded first
    assert verdict(rows["recorded"], "tuberculosis") == loaded["tuberculosis"]  # same version: manifest
    assert verdict(rows["other-version"], "tuberculosis") is None  # not known
    with Session(node.engine) as s:
        assert sorted(f.threshold for f in s.exec(select(Feedback)) if f.threshold is not None) == sorted(
            [0.35, loaded["tuberculosis"]]
        )
    jobs = {j["id"]: j for j in client.get("/api/v1/jobs", headers=read).json()["items"]}
    assert jobs[rows["other-version"]]["shadow"] is True and jobs[rows["recorded"]]["shadow"] is False
    findings = {f["label"]: f["threshold"] for f in jobs[rows["recorded"]]["findings"]}
    assert findings == {"pneumonia": 0.35, "tuberculosis": None}


def _failed_rows(node) -> int:
    now = utcnow()
    with Session(node.engine) as s:
        s.add(Study(study_uid="1.2.3", modalities=["DX"], first_received_at=now, last_received_at=now))
        s.flush()
        analysis = Job(
            key="nomodel|image|1.2.3.1", model_id="nomodel", level="image", study_uid="1.2.3",
            series_uids=["1.2.3.1"], state=JobState.FAILED, error="DecodeError: broken pixels",
            created_at=now, updated_at=now, not_before=now, finished_at=now, attempts=3,
        )  # fmt: skip
        delivery = Job(
            key="nomodel|image|1.2.3.2", model_id="nomodel", level="image", study_uid="1.2.3",
            series_uids=["1.2.3.2"], state=JobState.FAILED, error="1 outputs not delivered", result="{}",
            created_at=now, updated_at=now, not_before=now, finished_at=now, attempts=1,
        )  # fmt: skip
        s.add(analysis)
        s.add(delivery)
        s.flush()
        s.add(
            OutboxItem(
                job_id=delivery.id,
                destination="pacs",
                kind="sr",
                sop_class_uid="1.2",
                sop_instance_uid="9.9",
                path="outbox/x.dcm",
                state=OutboxState.FAILED,
                attempts=8,
                last_error="association rejected",
                next_attempt_at=now,
                created_at=now,
            )  # fmt: skip
        )
        s.commit()
        return analysis.id


def test_retry_button(make_node):
    node = make_node(web={"tokens": TOKENS}, runner={"workers": 1})
    node.runner.stop()  # keep the rows as the test leaves them
    job_id = _failed_rows(node)
    client = TestClient(node.web_app(), follow_redirects=False)

    read_page = client.get("/", headers={"Authorization": f"Bearer {READ_TOKEN}"}).text
    assert "Recent errors" in read_page and "DecodeError: broken pixels" in read_page
    assert "association rejected" in read_page
    assert "<button>retry</button>" not in read_page  # read-only: no button

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    admin_page = client.get("/", headers=admin).text
    assert admin_page.count("<button>retry</button>") == 3  # two failed jobs, one parked output
    study_page = client.get("/studies/1.2.3", headers=admin).text
    assert "DecodeError: broken pixels" in study_page and "<button>retry</button>" in study_page

    answer = client.post("/retry", data={"job_id": str(job_id), "back": "/studies/1.2.3"}, headers=admin)
    assert answer.status_code == 303 and answer.headers["location"] == "/studies/1.2.3"
    with Session(node.engine) as s:
        assert s.get(Job, job_id).state == JobState.QUEUED
    assert client.post("/api/v1/retry", headers=admin).json() == {"jobs": 0, "outputs": 1}
    with Session(node.engine) as s:
        (item,) = s.exec(select(OutboxItem)).all()
        assert item.state == OutboxState.PENDING and item.attempts == 0
