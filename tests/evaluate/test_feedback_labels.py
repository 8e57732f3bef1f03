"""``pacs-node evaluate MODEL --labels feedback``: the radiologists' stored verdicts are the
reference labels for the node's recorded scores and decisions; the agreement figures it reports
are the ones computed here, by hand, from the API's listing of the same verdicts."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from node.cli import app
from node.store.tables import JobState
from tests.web.conftest import ADMIN_TOKEN, READ_TOKEN, TOKENS
from tests.web.test_feedback import bearer, job_with

MODELS = Path(__file__).resolve().parents[2] / "models" / "onnx"
runner = CliRunner()

# (version, tuberculosis (probability, positive), pneumonia (probability, positive))
JOBS = [
    ("1.0.0", (0.95, True), (0.10, False)),
    ("1.0.0", (0.81, True), (0.64, True)),
    ("1.0.0", (0.70, True), (0.20, False)),
    ("1.0.0", (0.30, False), (0.88, True)),
    ("1.0.0", (0.12, False), (0.05, False)),
    ("1.0.0", (0.08, False), (0.55, True)),
    ("1.1.0", (0.91, True), (0.15, False)),
    ("1.1.0", (0.20, False), (0.45, False)),
]
# (job index, label, verdict, who); a later verdict of the same user on a finding replaces it
VERDICTS = [
    (0, "tuberculosis", "agree", "viewer"),
    (1, "tuberculosis", "agree", "viewer"),
    (2, "tuberculosis", "disagree", "viewer"),
    (3, "tuberculosis", "disagree", "viewer"),
    (4, "tuberculosis", "agree", "viewer"),
    (5, "tuberculosis", "unsure", "viewer"),
    (0, "tuberculosis", "agree", "it"),
    (2, "tuberculosis", "agree", "it"),
    (0, "pneumonia", "agree", "viewer"),
    (1, "pneumonia", "disagree", "viewer"),
    (1, "pneumonia", "agree", "viewer"),  # re-marked: agree replaces disagree
    (3, "pneumonia", "agree", "viewer"),
    (4, "pneumonia", "disagree", "viewer"),
    (5, "pneumonia", "disagree", "it"),
    (6, "tuberculosis", "agree", "viewer"),
    (7, "tuberculosis", "disagree", "viewer"),
    (7, "pneumonia", "unsure", "viewer"),
]


@pytest.fixture
def fed(make_node, tmp_path: Path) -> tuple[Path, list[dict]]:
    """A node whose cxr jobs (rows with recorded results) got the verdicts through the API; its
    configuration file and the API's listing of the current cxr verdicts."""
    node = make_node(web={"tokens": TOKENS}, runner={"workers": 1})
    node.runner.stop()
    client = TestClient(node.web_app())
    jobs = []
    for i, (version, tb, pn) in enumerate(JOBS):
        findings = [
            {
                "label": "tuberculosis",
                "probability": tb[0],
                "positive": tb[1],
                "normal": False,
                "triage": True,
            },
            {"label": "pneumonia", "probability": pn[0], "positive": pn[1], "normal": False, "triage": True},
        ]
        jobs.append(job_with(node, f"1.2.40.{i}", findings, version=version))
    other = job_with(
        node, "1.2.41", [{"label": "malignant", "probability": 0.9, "positive": True}], model="mammo"
    )
    job_with(node, "1.2.42", [], state=JobState.FAILED)
    tokens = {"viewer": READ_TOKEN, "it": ADMIN_TOKEN}
    for index, label, verdict, who in VERDICTS:
        body = {"label": label, "verdict": verdict}
        answer = client.post(f"/api/v1/jobs/{jobs[index]}/feedback", json=body, headers=bearer(tokens[who]))
        assert answer.status_code == 201, answer.text
    answer = client.post(f"/api/v1/jobs/{other}/feedback", json={"label": "malignant", "verdict": "disagree"},
                         headers=bearer(READ_TOKEN))  # fmt: skip
    assert answer.status_code == 201
    listing = client.get("/api/v1/feedback?model=cxr&limit=1000", headers=bearer(READ_TOKEN)).json()
    assert listing["total"] == len(VERDICTS) - 1  # the re-marked one is history
    return tmp_path / "node.yaml", listing["items"]


def by_hand(items: list[dict]) -> dict[tuple[str, str], dict]:
    """Agreement figures from the listing: agree keeps the model's decision, disagree flips it
    (multi-label), unsure is left out."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for item in items:
        groups[(item["model_version"], item["label"])].append(item)
    figures = {}
    for key, members in groups.items():
        rated = [(m["positive"] if m["verdict"] == "agree" else not m["positive"], m["positive"])
                 for m in members if m["verdict"] != "unsure"]  # fmt: skip
        agree = sum(m["verdict"] == "agree" for m in members)
        disagree = sum(m["verdict"] == "disagree" for m in members)
        called = [ref for ref, positive in rated if positive]
        present = [positive for ref, positive in rated if ref]
        figures[key] = {
            "ratings": len(members),
            "agree": agree,
            "disagree": disagree,
            "unsure": len(members) - agree - disagree,
            "agreement_rate": agree / (agree + disagree) if agree + disagree else None,
            "ppv": sum(called) / len(called) if called else None,
            "sensitivity": sum(present) / len(present) if present else None,
            "model_positive": len(called),
        }
    return figures


def test_evaluate_with_feedback_labels_reproduces_the_agreement_figures(fed, tmp_path: Path) -> None:
    config, items = fed
    expected = by_hand(items)
    assert expected[("1.0.0", "tuberculosis")]["agreement_rate"] == 5 / 7  # the table above, counted
    assert expected[("1.0.0", "tuberculosis")]["ppv"] == 4 / 5
    out = tmp_path / "report"
    args = ["evaluate", "cxr", "--labels", "feedback", "--config", str(config), "--models", str(MODELS)]
    result = runner.invoke(app, [*args, "-o", str(out), "--bootstrap", "200"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["source"] == "feedback" and report["model"]["id"] == "cxr"
    assert report["versions"] == ["1.0.0", "1.1.0"]
    assert report["excluded_unsure"] == 2 and report["cases"] == len(items) - 2
    got = {(f["model_version"], f["label"]): f for f in report["agreement"]}
    assert set(got) == set(expected)
    for key, figures in expected.items():
        for name, value in figures.items():
            assert got[key][name] == pytest.approx(value), (key, name)
    # the evaluation metrics at the model's decision are the same figures
    for f in report["findings"]:
        figures = expected[(f["model_version"], f["label"])]
        assert f["metrics"]["accuracy"] == pytest.approx(figures["agreement_rate"])
        assert f["metrics"]["ppv"] == (None if figures["ppv"] is None else pytest.approx(figures["ppv"]))
        assert f["cases"] == figures["agree"] + figures["disagree"]
    assert "agreement rate     0.714" in result.output
    page = (out / "report.html").read_text()
    assert "Agreement with the feedback" in page and "tuberculosis (1.0.0)" in page

    one = runner.invoke(
        app, [*args, "-o", str(tmp_path / "v11"), "--model-version", "1.1.0", "--bootstrap", "0"]
    )
    assert one.exit_code == 0, one.output
    v11 = json.loads((tmp_path / "v11" / "report.json").read_text())
    assert {f["model_version"] for f in v11["agreement"]} == {"1.1.0"}


def test_evaluate_with_feedback_labels_refusals(fed, tmp_path: Path) -> None:
    config, _ = fed
    base = ["evaluate", "--labels", "feedback", "--config", str(config), "--models", str(MODELS)]
    none = runner.invoke(app, [base[0], "ct-liver", *base[1:], "-o", str(tmp_path / "x")])
    assert none.exit_code == 1 and "no feedback on model ct-liver" in none.output
    later = runner.invoke(
        app, [base[0], "cxr", *base[1:], "--since", "2999-01-01", "-o", str(tmp_path / "y")]
    )
    assert later.exit_code == 1 and "since 2999-01-01" in later.output
    with_data = runner.invoke(app, [base[0], "cxr", str(tmp_path), *base[1:]])
    assert with_data.exit_code == 2 and "give no DATA folder" in with_data.output
    no_data = runner.invoke(app, ["evaluate", "cxr", "--models", str(MODELS)])
    assert no_data.exit_code == 2 and "labelled DICOM" in no_data.output
    bad_config = runner.invoke(
        app, [base[0], "cxr", "--labels", "feedback", "--config", str(tmp_path / "none.yaml")]
    )
    assert bad_config.exit_code == 2
