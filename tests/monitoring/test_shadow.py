"""Done-when of issue 18 (shadow models): a shadow model routed beside the active one on live
traffic (DCMTK storescu into the node) is analysed and recorded but sends nothing, raises no
triage, and its agreement with the active model shows on the monitoring page and API."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from node.store.tables import Job, ModelRun, OutboxItem, Study
from tests.helpers import StoreSCP, free_port, need, wait_for
from tests.monitoring.common import model_copy, phantoms, wait_runs

pytestmark = pytest.mark.slow

STUDIES = 6


def _rules(folder: Path) -> Path:
    """Chest radiographs to the active cxr and, alongside, the shadow cxr-next."""
    path = folder / "routes.yaml"
    rule = {
        "name": "cxr",
        "match": {"modality": ["CR", "DX"]},
        "models": ["cxr", "cxr-next"],
        "grouping": "image",
    }
    path.write_text(yaml.safe_dump({"rules": [rule]}))
    return path


def test_shadow_model_sends_nothing_and_shows_its_agreement(make_node, tmp_path: Path) -> None:  # noqa: ANN001
    models = tmp_path / "models"
    model_copy(models)
    # the candidate: the same network at thresholds that flag everything (it always disagrees
    # where the active model says negative), and triage on both labels
    model_copy(
        models,
        "cxr-next",
        mode="shadow",
        version="2.0.0-rc1",
        thresholds={"tuberculosis": 0.0, "pneumonia": 0.0},
    )
    port = free_port()
    receiver = StoreSCP(tmp_path / "received", port)
    try:
        node = make_node(
            models={"directory": str(models), "providers": ["CPUExecutionProvider"]},
            routing={"rules_file": str(_rules(tmp_path))},
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": "DEST",
                    "host": "127.0.0.1",
                    "port": port,
                    "parametric_map": False,
                }
            ],
            outputs={"send_to": "all"},
        )
        files = phantoms(tmp_path / "studies", range(40, 40 + STUDIES))
        sent = subprocess.run(
            [
                need("storescu"),
                "-aet",
                "MODALITY",
                "-aec",
                "PACSNODE",
                "127.0.0.1",
                str(node.scp.port),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        wait_runs(node.engine, 2 * STUDIES, timeout=300)

        def delivered() -> bool:
            with Session(node.engine) as s:
                jobs = s.exec(select(Job)).all()
                return len(jobs) == 2 * STUDIES and all(j.state == "done" for j in jobs)

        wait_for(delivered, 300, "every job done (active outputs delivered)")
        with Session(node.engine) as s:
            jobs = {j.id: j for j in s.exec(select(Job)).all()}
            runs = s.exec(select(ModelRun)).all()
            outbox = s.exec(select(OutboxItem)).all()
            studies = s.exec(select(Study)).all()
        received = receiver.received()
    finally:
        receiver.stop()

    shadow_jobs = {i for i, j in jobs.items() if j.model_id == "cxr-next"}
    active_jobs = {i for i, j in jobs.items() if j.model_id == "cxr"}
    assert len(shadow_jobs) == len(active_jobs) == STUDIES
    # recorded: one run per job, the shadow ones marked, every label positive at threshold 0
    assert {r.job_id for r in runs if r.shadow} == shadow_jobs
    assert {r.job_id for r in runs if not r.shadow} == active_jobs
    shadow_results = [jobs[i].recorded_result() for i in shadow_jobs]
    assert all(r is not None for r in shadow_results)
    assert all(f.positive and not f.triage for r in shadow_results for f in r.findings)
    assert all(not r.outputs for r in shadow_results)
    # sent: nothing of the shadow model's; everything received is the active model's
    assert outbox and {o.job_id for o in outbox} == active_jobs
    active_uids = {o.sop_instance_uid for o in outbox}
    assert received and {str(ds.SOPInstanceUID) for ds in received} == active_uids
    # triage is the active model's alone
    active_urgent = any(f.triage for i in active_jobs for f in jobs[i].recorded_result().findings)
    assert {s.priority for s in studies} <= {"routine", "urgent"}
    assert any(s.priority == "urgent" for s in studies) == active_urgent

    # agreement of positive flags: the active model's positives among the paired runs
    active_positive = {
        label: sum(
            1
            for i in active_jobs
            for f in jobs[i].recorded_result().findings
            if f.label == label and f.positive
        )
        for label in ("tuberculosis", "pneumonia")
    }
    client = TestClient(node.web_app())
    api = client.get("/api/v1/monitoring", params={"samples": True}).json()
    shadow = next(m for m in api["models"] if m["model_id"] == "cxr-next")
    assert shadow["mode"] == "shadow" and shadow["runs"] == STUDIES
    by_label = {a["label"]: a for a in shadow["shadow_agreement"]}
    assert set(by_label) == {"tuberculosis", "pneumonia"}
    for label, row in by_label.items():
        assert row["active_model"] == "cxr" and row["pairs"] == STUDIES
        assert row["agreement"] == pytest.approx(active_positive[label] / STUDIES)
        assert len(row["shadow_scores"]) == len(row["active_scores"]) == STUDIES
    page = client.get("/monitoring")
    assert page.status_code == 200
    assert "cxr-next" in page.text and "against the active model" in page.text
    assert page.text.count("<svg") >= 2 + 2  # score curves and scatter plots, inline
    assert f"{by_label['pneumonia']['agreement']:.3f}" in page.text
    assert 'href="/monitoring"' in page.text
