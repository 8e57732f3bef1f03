"""GET /api/v1/worklist, /models, /outbox and /stats over the shared processed node: the triage
worklist's order, the loaded model, the empty outbox and the counts."""

from __future__ import annotations


def test_worklist_order_api(processed):
    items = processed.client.get("/api/v1/worklist").json()["items"]
    order = [i["study"]["study_uid"] for i in items]
    # urgent first; then arrival order: the CT that no model analysed stays above the later routine
    assert order == [processed.urgent, processed.not_analysed, processed.routine]
    assert [i["arrival_position"] for i in items] == [3, 1, 2]
    assert items[0]["findings"][0]["label"] == "pneumonia"
    assert items[1]["findings"] == [] and items[2]["findings"] == []


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
