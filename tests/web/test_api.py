"""The JSON API and the triage worklist over a node that processed three phantom studies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from node.store.repo import worklist_order


def test_priorities_and_scores(processed):
    c = processed.client
    studies = {s["study_uid"]: s for s in c.get("/api/v1/studies").json()["items"]}
    assert studies[processed.urgent]["priority"] == "urgent"
    assert studies[processed.urgent]["suspicion"] > 0.5
    assert studies[processed.routine]["priority"] == "routine"
    assert studies[processed.routine]["suspicion"] < 0.5  # pneumonia is flagged for triage: scored
    assert studies[processed.not_analysed]["priority"] == "not analysed"
    assert studies[processed.not_analysed]["suspicion"] is None


def test_worklist_order_api(processed):
    items = processed.client.get("/api/v1/worklist").json()["items"]
    order = [i["study"]["study_uid"] for i in items]
    # urgent first; then arrival order: the CT that no model analysed stays above the later routine
    assert order == [processed.urgent, processed.not_analysed, processed.routine]
    assert [i["arrival_position"] for i in items] == [3, 1, 2]
    assert items[0]["findings"][0]["label"] == "pneumonia"
    assert items[1]["findings"] == [] and items[2]["findings"] == []


def test_worklist_order_rules():
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    at = [t0 + timedelta(minutes=i) for i in range(7)]
    items = [
        ("routine", 0.40, at[0]),
        ("not analysed", None, at[1]),
        ("urgent", 0.70, at[2]),
        ("routine", 0.10, at[3]),
        ("urgent", 0.95, at[4]),
        ("pending", None, at[5]),
        ("urgent", 0.70, at[6]),
    ]
    order = worklist_order(items)
    # urgent by score then arrival; everything else in arrival order, whatever its score
    assert order == [4, 2, 6, 0, 1, 3, 5]
    # no study is pushed below its arrival position by anything but an urgent study
    for position, i in enumerate(order):
        above = order[:position]
        assert all(items[j][0] == "urgent" or items[j][2] < items[i][2] for j in above)
    assert worklist_order([]) == []


def test_studies_series_jobs(processed):
    c = processed.client
    detail = c.get(f"/api/v1/studies/{processed.urgent}").json()
    assert detail["priority"] == "urgent"
    (job,) = detail["jobs"]
    assert job["model_id"] == "cxr" and job["model_version"] == "1.0.0" and job["state"] == "done"
    assert {"preprocessing", "inferring", "writing"} <= set(job["timings"])
    assert job["images"] == 1  # the one radiograph of the study
    assert "1 image analysed" in c.get(f"/studies/{processed.urgent}").text
    (series,) = c.get(f"/api/v1/studies/{processed.urgent}/series").json()
    assert series["route_models"] == ["cxr"]
    assert c.get(f"/api/v1/series/{series['series_uid']}").json()["modality"] == "DX"
    jobs = c.get("/api/v1/jobs").json()["items"]
    assert {j["study_uid"] for j in jobs} == {processed.urgent, processed.routine}
    assert c.get(f"/api/v1/jobs/{job['id']}").json()["id"] == job["id"]
    assert c.get("/api/v1/jobs/999").status_code == 404
    assert c.get("/api/v1/series/1.2.3").status_code == 404
    assert c.get("/api/v1/studies/1.2.3/series").status_code == 404
    assert c.get("/api/v1/jobs?limit=0").status_code == 422


def test_pages_show_the_list_columns_as_lists(processed):
    """Modalities and routed models (JSON lists in the store) read as text on the pages."""
    c = processed.client
    assert c.get(f"/api/v1/studies/{processed.urgent}").json()["modalities"] == ["DX"]
    page = c.get(f"/studies/{processed.urgent}").text
    assert " · DX · " in page and "</b> → cxr (image)" in page
    for html in (page, c.get("/studies").text, c.get("/").text):
        assert "[&#39;" not in html and '["' not in html and "DX" in html


def test_models_outbox_stats(processed):
    c = processed.client
    models = c.get("/api/v1/models").json()
    (cxr,) = models["loaded"]
    assert cxr["id"] == "cxr" and cxr["version"] == "1.0.0" and cxr["provider"].endswith("ExecutionProvider")
    assert any(lb["triage"] for lb in cxr["labels"])
    outbox = c.get("/api/v1/outbox").json()
    assert outbox["items"] == [] and outbox["counts"] == {}  # no destination configured
    assert c.get("/api/v1/outbox?state=nope").status_code == 422
    stats = c.get("/api/v1/stats").json()
    assert stats["last_hour"]["studies"] == 3 and stats["last_day"]["studies"] == 3
    assert stats["job_states"] == {"done": 2}
    assert stats["priorities"] == {"urgent": 1, "routine": 1, "not analysed": 1}
    schema = c.get("/api/openapi.json").json()
    for path in ("/api/v1/worklist", "/api/v1/infer", "/api/v1/models", "/api/v1/outbox", "/api/v1/stats"):
        assert path in schema["paths"], path


def test_no_patient_identifiers_in_api(processed):
    c = processed.client
    text = "".join(
        c.get(p).text
        for p in (
            "/api/v1/studies",
            "/api/v1/worklist",
            "/api/v1/jobs",
            f"/api/v1/studies/{processed.urgent}",
        )
    )
    for value in processed.patient_values:
        assert value not in text
