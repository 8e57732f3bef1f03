"""GET /api/v1/studies, /studies/{uid}, /studies/{uid}/series and /series/{uid}: over a node that
received real instances (no model: not routed, with why) and over the shared processed node
(priorities, suspicion scores, jobs), and no patient identifier in what they answer."""

from __future__ import annotations

import time

from tests.helpers import fresh_copy, make_series, raw_store_file, sample_file
from tests.web.routes.support import client_of

PATIENT = "Phantom^Secret^Name"


def test_studies_api_and_page(make_node, tmp_path):
    node = make_node(assembly={"series_quiet_s": 0.5})
    ct = make_series(tmp_path / "ct", 3, body_part="ABDOMEN")
    mr = fresh_copy(sample_file("MR_small.dcm"), tmp_path / "mr.dcm", patient_name=PATIENT)
    for f in [*ct, mr]:
        assert raw_store_file(node.scp.port, f) == 0
    time.sleep(1.5)
    client = client_of(node)

    page = client.get("/api/v1/studies")
    assert page.status_code == 200
    body = page.json()
    assert body["total"] == 2
    by_modality = {tuple(s["modalities"]): s for s in body["items"]}
    assert by_modality[("CT",)]["instance_count"] == 3
    assert by_modality[("CT",)]["state"] == "complete"
    assert by_modality[("MR",)]["series_count"] == 1
    assert PATIENT not in page.text and "Phantom" not in page.text

    uid = by_modality[("CT",)]["study_uid"]
    detail = client.get(f"/api/v1/studies/{uid}")
    assert detail.status_code == 200
    (series,) = detail.json()["series"]
    assert series["instance_count"] == 3 and series["modality"] == "CT"
    # no model is loaded in this node: the series is complete and recorded as not routed, with why
    assert series["state"] == "not routed"
    assert "ct-liver" in series["route_note"] and "not loaded" in series["route_note"]
    assert detail.json()["jobs"] == []
    assert series["calling_aet"] == "RAWSCU"

    missing = client.get("/api/v1/studies/1.2.3.4")
    assert missing.status_code == 404
    assert "1.2.3.4" in missing.json()["detail"]
    assert client.get("/api/v1/studies?limit=0").status_code == 422
    assert client.get("/api/v1/studies?state=complete").json()["total"] == 2
    assert client.get("/api/v1/studies?state=receiving").json()["total"] == 0

    html = client.get("/")
    assert html.status_code == 200
    assert "PACSNODE" in html.text
    assert uid in html.text
    assert "which is not loaded" in html.text
    assert "Images today<b>4</b>" in html.text
    assert PATIENT not in html.text and "Phantom" not in html.text
    assert client.get("/api/openapi.json").status_code == 200


def test_priorities_and_scores(processed):
    c = processed.client
    studies = {s["study_uid"]: s for s in c.get("/api/v1/studies").json()["items"]}
    assert studies[processed.urgent]["priority"] == "urgent"
    assert studies[processed.urgent]["suspicion"] > 0.5
    assert studies[processed.routine]["priority"] == "routine"
    assert studies[processed.routine]["suspicion"] < 0.5  # pneumonia is flagged for triage: scored
    assert studies[processed.not_analysed]["priority"] == "not analysed"
    assert studies[processed.not_analysed]["suspicion"] is None


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
