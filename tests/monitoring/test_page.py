"""The monitoring page and API: the read role is needed, the window is validated, runs recorded
by record_run show per day with their positive rate, a model without a validation reference has
no drift figures, and an input that cannot be read again still records the run."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from node.inference.registry import load_model
from node.monitoring.record import record_run, subject
from node.types import AlgorithmIdentity, AnalysisResult, Code, LabelScore
from tests.helpers import REPO, add_job
from tests.web.conftest import READ_TOKEN, TOKENS


def _result(probabilities: dict[str, float]) -> AnalysisResult:
    code = Code("1", "99PACSNODE", "x")
    return AnalysisResult(
        algorithm=AlgorithmIdentity(model_id="cxr", name="n", version="1.0.0", sha256="0" * 64),
        study_uid="1.2",
        series_uids=("1.2.3",),
        level="series",
        findings=tuple(LabelScore(k, code, p, 0.5, p >= 0.5, True) for k, p in probabilities.items()),
        images=(),
        uid_seed="s",
    )


def test_page_and_api_need_the_read_role_and_show_recorded_runs(make_node, tmp_path: Path) -> None:  # noqa: ANN001
    node = make_node(web={"tokens": TOKENS}, models={"directory": str(REPO / "models" / "onnx")})
    manifest = load_model(REPO / "models" / "onnx" / "cxr").manifest
    broken = tmp_path / "gone.dcm"
    broken.write_bytes(b"not dicom")
    with Session(node.engine, expire_on_commit=False) as s:
        jobs = [add_job(s, key=f"cxr|series|1.2.{i}", model_id="cxr") for i in range(3)]
    for job, p in zip(jobs, (0.9, 0.2, 0.7), strict=True):
        row = record_run(node.engine, job, manifest, _result({"tuberculosis": p, "pneumonia": 0.1}), [broken])
        assert row is not None and row.images == 1 and row.p50 is None  # unreadable: no statistics
    assert subject(jobs[0]) == "series|1.2.0"

    client = TestClient(node.web_app(), follow_redirects=False)
    assert client.get("/api/v1/monitoring").status_code == 401
    page = client.get("/monitoring")
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/monitoring"
    auth = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert client.get("/api/v1/monitoring", params={"days": 0}, headers=auth).status_code == 422

    body = client.get("/api/v1/monitoring", headers=auth).json()
    cxr = next(m for m in body["models"] if m["model_id"] == "cxr")
    assert cxr["runs"] == 3 and cxr["mode"] == "active" and cxr["has_reference"] is False
    assert [d["runs"] for d in cxr["daily"]] == [3] and cxr["daily"][0]["positive_runs"] == 2
    tb = next(lb for lb in cxr["labels"] if lb["label"] == "tuberculosis")
    assert tb["positive_rate"] == pytest.approx(2 / 3) and tb["psi"] is None and tb["ks"] is None
    assert cxr["input_drift_psi"] == {}
    html = client.get("/monitoring", headers=auth)
    assert html.status_code == 200 and "<svg" in html.text and "cdn" not in html.text.lower()
    assert "0.667" in html.text
    metrics = client.get("/metrics").text
    assert 'pacsnode_model_positive_rate{label="tuberculosis",mode="active",model="cxr"} 0.666' in metrics
    assert "pacsnode_model_score_psi{" not in metrics  # no reference, no drift gauge
