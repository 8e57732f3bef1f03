"""Issue 18: the monitoring page, API and gauges show PPV and agreement from the radiologists'
feedback. A node analyses real chest radiograph phantoms (the reference cxr model, tuberculosis
at threshold 0 so that every study has a positive finding), two readers post verdicts through
the API (one re-marked), and the figures the monitoring shows are the ones computed here from the
posted verdicts and the jobs' recorded decisions, and the same as GET /api/v1/feedback/summary's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from node.web.auth import hash_token
from tests.helpers import raw_store_file, wait_for
from tests.monitoring.common import gauges, model_copy, phantoms
from tests.web.conftest import ADMIN_TOKEN, READ_TOKEN, TOKENS

SECOND_TOKEN = "second-reader-token"
STUDIES = 3


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _expected(verdicts: list[tuple[str, bool]]) -> tuple[float | None, float | None]:
    """(PPV, agreement) of (verdict, the model's positive flag) pairs, by hand: PPV = agreed
    positive decisions / rated positive decisions; agreement = agree / (agree + disagree)."""
    agree_pos = sum(1 for v, pos in verdicts if pos and v == "agree")
    disagree_pos = sum(1 for v, pos in verdicts if pos and v == "disagree")
    agree = sum(1 for v, _ in verdicts if v == "agree")
    disagree = sum(1 for v, _ in verdicts if v == "disagree")
    ppv = agree_pos / (agree_pos + disagree_pos) if agree_pos + disagree_pos else None
    return ppv, (agree / (agree + disagree) if agree + disagree else None)


@pytest.mark.timeout(400)
def test_monitoring_shows_ppv_and_agreement_of_the_posted_feedback(make_node, tmp_path: Path) -> None:  # noqa: ANN001
    models = tmp_path / "models"
    model_copy(models, thresholds={"tuberculosis": 0.0})
    tokens = [*TOKENS, {"name": "second", "sha256": hash_token(SECOND_TOKEN), "role": "read"}]
    node = make_node(
        models={"directory": str(models), "providers": ["CPUExecutionProvider"]},
        web={"tokens": tokens},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
    )
    for path in phantoms(tmp_path / "studies", range(70, 70 + STUDIES)):
        assert raw_store_file(node.scp.port, path) == 0
    client = TestClient(node.web_app(), follow_redirects=False)
    read = _bearer(READ_TOKEN)

    def done() -> list[dict]:
        items = client.get("/api/v1/jobs", headers=read).json()["items"]
        return items if len(items) == STUDIES and all(j["state"] == "done" for j in items) else []

    jobs = sorted(wait_for(done, 300, "every cxr job done"), key=lambda j: j["id"])  # type: ignore[arg-type]
    positive = {(j["id"], f["label"]): f["positive"] for j in jobs for f in j["findings"]}
    assert all(positive[(j["id"], "tuberculosis")] for j in jobs)

    before = client.get("/api/v1/monitoring", headers=read).json()
    cxr = next(m for m in before["models"] if m["model_id"] == "cxr")
    assert cxr["feedback"]["verdicts"] == 0 and cxr["feedback"]["ppv"] is None
    assert cxr["feedback"]["agreement"] is None

    a, b, c = (j["id"] for j in jobs)
    posted = [  # (token, job, label, verdict); the last verdict of a user on a finding counts
        (READ_TOKEN, a, "tuberculosis", "agree"),
        (READ_TOKEN, b, "tuberculosis", "disagree"),
        (READ_TOKEN, c, "tuberculosis", "unsure"),
        (SECOND_TOKEN, a, "tuberculosis", "disagree"),
        (SECOND_TOKEN, b, "tuberculosis", "agree"),
        (SECOND_TOKEN, c, "tuberculosis", "agree"),
        (READ_TOKEN, a, "pneumonia", "agree"),
        (READ_TOKEN, b, "pneumonia", "disagree"),
        (READ_TOKEN, c, "pneumonia", "agree"),
        (READ_TOKEN, c, "pneumonia", "disagree"),  # re-marked: replaces the agree above
        (SECOND_TOKEN, c, "pneumonia", "agree"),
        (ADMIN_TOKEN, a, "pneumonia", "unsure"),
    ]
    current: dict[tuple[str, int, str], str] = {}
    for token, job_id, label, verdict in posted:
        answer = client.post(
            f"/api/v1/jobs/{job_id}/feedback",
            json={"label": label, "verdict": verdict},
            headers=_bearer(token),
        )
        assert answer.status_code == 201, answer.text
        current[(token, job_id, label)] = verdict
    rated = [(v, positive[(job_id, label)]) for (_, job_id, label), v in current.items()]
    ppv, agreement = _expected(rated)
    assert ppv is not None and agreement is not None and 0 < ppv < 1 and 0 < agreement < 1
    per_label = {
        label: _expected([(v, positive[(j, lb)]) for (_, j, lb), v in current.items() if lb == label])
        for label in ("tuberculosis", "pneumonia")
    }

    body = client.get("/api/v1/monitoring", headers=read).json()
    cxr = next(m for m in body["models"] if m["model_id"] == "cxr")
    fb = cxr["feedback"]
    assert fb["verdicts"] == len(current)
    assert fb["ppv"] == pytest.approx(ppv) and fb["agreement"] == pytest.approx(agreement)
    assert (fb["agree"], fb["disagree"], fb["unsure"]) == tuple(
        sum(1 for v in current.values() if v == x) for x in ("agree", "disagree", "unsure")
    )
    by_label = {row["label"]: row for row in fb["labels"]}
    assert set(by_label) == set(per_label)
    for label, (label_ppv, label_agreement) in per_label.items():
        assert by_label[label]["ppv"] == (None if label_ppv is None else pytest.approx(label_ppv))
        assert by_label[label]["agreement_rate"] == pytest.approx(label_agreement)
    # one definition: the per-finding figures are GET /api/v1/feedback/summary's
    summary = client.get("/api/v1/feedback/summary", params={"model": "cxr"}, headers=read).json()
    assert summary["ratings"] == len(current)
    for row in summary["figures"]:
        mine = by_label[row["label"]]
        assert {k: mine[k] for k in row} == row

    page = client.get("/monitoring", headers=read).text
    section = page[page.index('id="model-cxr"') :]
    assert re.search(r'class="feedback-ppv">([^<]*)<', section).group(1) == f"{ppv:.3f}"  # type: ignore[union-attr]
    assert re.search(r'class="feedback-agreement">([^<]*)<', section).group(1) == f"{agreement:.3f}"  # type: ignore[union-attr]
    assert re.search(r'class="feedback-verdicts">([^<]*)<', section).group(1) == str(len(current))  # type: ignore[union-attr]
    row = section[section.index('<tr data-label="tuberculosis">') :].split("</tr>")[0]
    assert f"{per_label['tuberculosis'][1]:.3f}" in row

    names = (
        "pacsnode_model_feedback_ppv",
        "pacsnode_model_feedback_agreement",
        "pacsnode_model_feedback_verdicts",
    )
    scraped = gauges(client.get("/metrics").text, *names)
    model = (("model", "cxr"),)
    assert scraped[("pacsnode_model_feedback_ppv", model)] == pytest.approx(ppv)
    assert scraped[("pacsnode_model_feedback_agreement", model)] == pytest.approx(agreement)
    assert scraped[("pacsnode_model_feedback_verdicts", model)] == len(current)
