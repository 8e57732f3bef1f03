"""Health probes, the JSON API and the status page, over a node that received real instances."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from tests.helpers import make_series, raw_store_file, sample_file

PATIENT = "Phantom^Secret^Name"


def _client(node) -> TestClient:
    return TestClient(node.web_app())


def test_health_and_readiness(make_node):
    node = make_node()
    client = _client(node)
    assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {
        "database": True,
        "database_writable": True,
        "dicom": True,
        "dicom_slots": True,
        "disk": True,
    }
    node.scp.stop()
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"]["dicom"] is False


def test_not_ready_while_the_disk_is_below_its_watermark(make_node):
    """Below the free-space watermark every C-STORE is refused: the node must not say ready."""
    node = make_node(storage={"min_free_mb": 2**40})  # more than any disk has free
    ready = _client(node).get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {
        "database": True,
        "database_writable": True,
        "dicom": True,
        "dicom_slots": True,
        "disk": False,
    }


def test_studies_api_and_page(make_node, tmp_path):
    from tests.helpers import fresh_copy

    node = make_node(assembly={"series_quiet_s": 0.5})
    ct = make_series(tmp_path / "ct", 3, body_part="ABDOMEN")
    mr = fresh_copy(sample_file("MR_small.dcm"), tmp_path / "mr.dcm", patient_name=PATIENT)
    for f in [*ct, mr]:
        assert raw_store_file(node.scp.port, f) == 0
    time.sleep(1.5)
    client = _client(node)

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
