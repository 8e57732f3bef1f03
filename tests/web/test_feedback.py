"""Radiologist feedback per finding (issue 18): the study page's form (sign-in cookie and CSRF
token) and the JSON API store a verdict with what the model said; re-marking replaces the user's
verdict and keeps the old one as history; refusals name what is wrong; the listing filters and
exports CSV and JSON."""

from __future__ import annotations

import csv
import html
import io
import json
import re
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from node.store.tables import Feedback, JobState, utcnow
from node.web.feedback import CSV_COLUMNS
from tests.helpers import add_job
from tests.web.conftest import ADMIN_TOKEN, READ_TOKEN, TOKENS

CXR = [
    {"label": "tuberculosis", "probability": 0.91, "positive": True, "normal": False, "triage": True},
    {"label": "pneumonia", "probability": 0.12, "positive": False, "normal": False, "triage": True},
]
MAMMO = [
    {"label": "normal", "probability": 0.05, "positive": False, "normal": True, "triage": False},
    {"label": "benign", "probability": 0.15, "positive": False, "normal": False, "triage": False},
    {"label": "malignant", "probability": 0.8, "positive": True, "normal": False, "triage": True},
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def job_with(node, study_uid: str, findings: list[dict], model: str = "cxr", version: str = "1.0.0",
             state: str = JobState.DONE) -> int:  # fmt: skip
    """A job row of ``model`` with a recorded result (the runner's JSON)."""
    result = {
        "model": model,
        "version": version,
        "images": 1,
        "frames": 1,
        "findings": findings,
        "outputs": [],
    }
    with Session(node.engine) as s:
        job = add_job(
            s, key=f"{model}|series|{study_uid}.1", state=state, model_id=model, study_uid=study_uid,
            result=json.dumps(result), finished_at=utcnow(),
        )  # fmt: skip
        return job.id


def stored(node) -> list[Feedback]:
    with Session(node.engine) as s:
        return list(s.exec(select(Feedback).order_by(Feedback.id)))


@pytest.fixture
def api(make_node):
    """A node without models (jobs are rows), read and admin tokens; (node, client)."""
    node = make_node(web={"tokens": TOKENS}, runner={"workers": 1})
    node.runner.stop()  # the rows stay as the test writes them
    return node, TestClient(node.web_app(), follow_redirects=False)


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]


def test_page_form_round_trip(processed):
    """A signed-in reader marks a finding of a real analysed job on the study page; the verdict is
    shown, listed by the API with the model's version, threshold, score and decision; re-marking
    replaces it and the history keeps both."""
    node, api = processed.node, processed.client
    (job,) = api.get(f"/api/v1/studies/{processed.urgent}").json()["jobs"]
    assert job["state"] == "done"
    finding = next(f for f in job["findings"] if f["label"] == "pneumonia")
    threshold = next(
        lb.threshold for lb in node.models.registry.models["cxr"].manifest.labels if lb.name == "pneumonia"
    )
    browser = TestClient(node.web_app(), follow_redirects=False)
    form = browser.get("/login?next=/").text
    assert browser.post("/login", data={"token": READ_TOKEN, "csrf": csrf_of(form)}).status_code == 303
    page = browser.get(f"/studies/{processed.urgent}")
    assert page.status_code == 200
    assert f'id="feedback-{job["id"]}"' in page.text
    assert page.text.count(f'action="/jobs/{job["id"]}/feedback"') == len(job["findings"])
    token = csrf_of(page.text)
    before = len(stored(node))

    # no CSRF token (another site's form): refused, nothing stored
    refused = browser.post(f"/jobs/{job['id']}/feedback", data={"label": "pneumonia", "verdict": "agree"})
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]
    # not signed in: refused
    stranger = TestClient(node.web_app(), follow_redirects=False)
    assert (
        stranger.post(
            f"/jobs/{job['id']}/feedback", data={"label": "pneumonia", "verdict": "agree"}
        ).status_code
        == 401
    )
    assert len(stored(node)) == before

    comment = "consolidation right lower lobe, <b>clear</b>"
    answer = browser.post(
        f"/jobs/{job['id']}/feedback",
        data={"label": "pneumonia", "verdict": "agree", "comment": comment, "csrf": token},
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/studies/{processed.urgent}#feedback-{job['id']}"
    page = browser.get(f"/studies/{processed.urgent}").text
    row = page[page.index('data-label="pneumonia"') :].split("</tr>")[0]
    assert "<b>agree</b>" in row and html.escape(comment) in row and "<b>clear</b>" not in row
    assert 'value="agree" required checked' in row

    listed = api.get(f"/api/v1/feedback?job_id={job['id']}").json()
    assert listed["total"] == 1
    (item,) = listed["items"]
    assert item["user_name"] == "viewer"  # the signed-in token's name
    assert (item["model_id"], item["model_version"], item["study_uid"]) == (
        "cxr",
        job["model_version"],
        processed.urgent,
    )
    assert (item["label"], item["score"], item["positive"]) == (
        "pneumonia",
        finding["probability"],
        finding["positive"],
    )
    assert item["threshold"] == threshold
    assert (item["verdict"], item["correct_label"], item["comment"]) == ("agree", None, comment)
    assert item["reference"] is finding["positive"]

    # re-marking: disagree replaces the verdict; the old row stays, superseded
    answer = browser.post(
        f"/jobs/{job['id']}/feedback",
        data={"label": "pneumonia", "verdict": "disagree", "comment": "", "csrf": token},
    )
    assert answer.status_code == 303
    row = browser.get(f"/studies/{processed.urgent}").text
    row = row[row.index('data-label="pneumonia"') :].split("</tr>")[0]
    assert "<b>disagree</b>" in row and html.escape(comment) not in row
    (current,) = api.get(f"/api/v1/feedback?job_id={job['id']}").json()["items"]
    flipped = "negative" if finding["positive"] else "positive"
    assert (current["verdict"], current["correct_label"], current["reference"]) == (
        "disagree",
        flipped,
        not finding["positive"],
    )
    history = api.get(f"/api/v1/feedback?job_id={job['id']}&history=true").json()["items"]
    assert [h["verdict"] for h in history] == ["agree", "disagree"]
    assert history[0]["superseded_at"] is not None and history[1]["superseded_at"] is None
    # another user's verdict on the same finding is counted apart, not replaced
    admin = api.post(f"/api/v1/jobs/{job['id']}/feedback", json={"label": "pneumonia", "verdict": "unsure"},
                     headers=bearer(ADMIN_TOKEN))  # fmt: skip
    assert admin.status_code == 201 and admin.json()["user_name"] == "it"
    row = browser.get(f"/studies/{processed.urgent}").text
    row = row[row.index('data-label="pneumonia"') :].split("</tr>")[0]
    assert "<b>disagree</b>" in row and "others: unsure 1" in row
    assert api.get(f"/api/v1/feedback?job_id={job['id']}").json()["total"] == 2


def test_api_stores_verdicts_and_refuses_bad_ones(api):
    node, client = api
    read = bearer(READ_TOKEN)
    done = job_with(node, "1.2.10", [{**CXR[0], "threshold": 0.42}, CXR[1]])
    running = job_with(node, "1.2.11", CXR, state=JobState.INFERRING)

    answer = client.post(
        f"/api/v1/jobs/{done}/feedback",
        json={"label": "tuberculosis", "verdict": "disagree", "comment": "old scar"},
        headers=read,
    )
    assert answer.status_code == 201, answer.text
    body = answer.json()
    assert body["replaced"] is False and body["user_name"] == "viewer" and body["job_id"] == done
    assert (body["model_id"], body["model_version"], body["study_uid"]) == ("cxr", "1.0.0", "1.2.10")
    assert (body["score"], body["positive"], body["threshold"]) == (0.91, True, 0.42)  # as recorded
    assert (body["correct_label"], body["reference"]) == ("negative", False)
    again = client.post(f"/api/v1/jobs/{done}/feedback", json={"label": "tuberculosis", "verdict": "agree"},
                        headers=read)  # fmt: skip
    assert again.status_code == 201 and again.json()["replaced"] is True
    other = client.post(
        f"/api/v1/jobs/{done}/feedback", json={"label": "pneumonia", "verdict": "agree"}, headers=read
    )
    assert other.json()["threshold"] is None  # not recorded and the model is not loaded: not known
    rows = stored(node)
    assert [(r.label, r.verdict, r.superseded_at is None) for r in rows] == [
        ("tuberculosis", "disagree", False),
        ("tuberculosis", "agree", True),
        ("pneumonia", "agree", True),
    ]

    def refused(job_id: int, body: dict, status: int, *words: str, headers: dict | None = None) -> None:
        answer = client.post(
            f"/api/v1/jobs/{job_id}/feedback", json=body, headers=read if headers is None else headers
        )
        assert answer.status_code == status, answer.text
        text = json.dumps(answer.json()["detail"])
        for word in words:
            assert word in text, (word, text)

    refused(999999, {"label": "tuberculosis", "verdict": "agree"}, 404, "no job with id 999999")
    refused(running, {"label": "tuberculosis", "verdict": "agree"}, 409, "inferring", "not done")
    refused(done, {"label": "effusion", "verdict": "agree"}, 422, "'effusion'", "tuberculosis, pneumonia")
    refused(done, {"label": "tuberculosis", "verdict": "maybe"}, 422, "verdict", "agree", "unsure")
    refused(done, {"label": "tuberculosis"}, 422, "verdict", "missing")
    refused(done, {"label": "tuberculosis", "verdict": "agree", "correct_label": "negative"}, 422,
            "only for a disagree verdict")  # fmt: skip
    # the model called tuberculosis: disagreeing with "positive" contradicts itself
    refused(done, {"label": "tuberculosis", "verdict": "disagree", "correct_label": "positive"}, 422,
            "called tuberculosis", "negative")  # fmt: skip
    refused(done, {"label": "tuberculosis", "verdict": "disagree", "correct_label": "pneumonia"}, 422,
            "multi-label", "positive or negative")  # fmt: skip
    refused(
        done, {"label": "tuberculosis", "verdict": "disagree", "correct_label": "lymphoma"}, 422, "'lymphoma'"
    )
    refused(done, {"label": "tuberculosis", "verdict": "agree", "who": "me"}, 422, "who")
    refused(done, {"label": "tuberculosis", "verdict": "agree", "comment": "x" * 2001}, 422, "2000")
    refused(done, {"label": "tuberculosis", "verdict": "agree"}, 401, "bearer token", headers={})
    assert len(stored(node)) == 3  # nothing refused was stored


def test_multi_class_correct_label_is_another_class(api):
    node, client = api
    job = job_with(node, "1.2.20", MAMMO, model="mammo", version="2.0.0")
    # no model loaded: a result with a "no finding" class is a multi-class model's
    answer = client.post(f"/api/v1/jobs/{job}/feedback",
                         json={"label": "malignant", "verdict": "disagree", "correct_label": "benign"},
                         headers=bearer(READ_TOKEN))  # fmt: skip
    assert answer.status_code == 201, answer.text
    assert (answer.json()["correct_label"], answer.json()["reference"]) == ("benign", False)
    # the model did not call benign: disagreeing means it is benign, not another class
    answer = client.post(f"/api/v1/jobs/{job}/feedback",
                         json={"label": "benign", "verdict": "disagree", "correct_label": "malignant"},
                         headers=bearer(READ_TOKEN))  # fmt: skip
    assert answer.status_code == 422 and "did not call benign" in answer.json()["detail"]
    answer = client.post(f"/api/v1/jobs/{job}/feedback", json={"label": "benign", "verdict": "disagree",
                         "correct_label": "benign"}, headers=bearer(READ_TOKEN))  # fmt: skip
    assert answer.status_code == 201 and (answer.json()["correct_label"], answer.json()["reference"]) == (
        "positive",
        True,
    )


def test_listing_filters_and_csv_json_export(api):
    node, client = api
    read, admin = bearer(READ_TOKEN), bearer(ADMIN_TOKEN)
    cxr = job_with(node, "1.2.30", CXR)
    mammo = job_with(node, "1.2.31", MAMMO, model="mammo", version="2.0.0")
    evil = '=HYPERLINK("http://x","y"), "quoted"'
    posts = [
        (cxr, "tuberculosis", "agree", evil, read),
        (cxr, "pneumonia", "disagree", "missed, subtle", read),
        (cxr, "tuberculosis", "unsure", "", admin),
        (mammo, "malignant", "agree", "", admin),
    ]
    for job, label, verdict, comment, who in posts:
        answer = client.post(f"/api/v1/jobs/{job}/feedback", json={"label": label, "verdict": verdict,
                             "comment": comment}, headers=who)  # fmt: skip
        assert answer.status_code == 201, answer.text

    def listed(query: str = "") -> dict:
        answer = client.get(f"/api/v1/feedback{query}", headers=read)
        assert answer.status_code == 200, answer.text
        return answer.json()

    everything = listed()
    assert everything["total"] == 4 and [i["verdict"] for i in everything["items"]] == [
        "agree",
        "disagree",
        "unsure",
        "agree",
    ]
    assert listed("?model=cxr")["total"] == 3 and listed("?model=mammo&version=2.0.0")["total"] == 1
    assert listed("?model=mammo&version=1.0.0")["total"] == 0
    assert [i["label"] for i in listed("?verdict=disagree")["items"]] == ["pneumonia"]
    assert listed("?user=it")["total"] == 2 and listed("?label=tuberculosis")["total"] == 2
    now = utcnow()
    assert listed(f"?since={(now - timedelta(minutes=5)).isoformat()}".replace("+", "%2B"))["total"] == 4
    assert (
        listed(f"?until={(now - timedelta(minutes=5)).strftime('%Y-%m-%dT%H:%M:%S')}")["total"] == 0
    )  # no zone: UTC
    assert listed(f"?since={(now + timedelta(days=1)).date().isoformat()}")["total"] == 0
    page = listed("?limit=2&offset=1")
    assert (page["total"], page["limit"], page["offset"]) == (4, 2, 1)
    assert [i["id"] for i in page["items"]] == [i["id"] for i in everything["items"][1:3]]
    assert client.get("/api/v1/feedback?verdict=maybe", headers=read).status_code == 422
    assert client.get("/api/v1/feedback?since=yesterday", headers=read).status_code == 422
    assert client.get("/api/v1/feedback?limit=5000", headers=read).status_code == 422
    assert client.get("/api/v1/feedback").status_code == 401

    for path in ("/api/v1/feedback?format=csv", "/api/v1/feedback.csv"):
        answer = client.get(path, headers=read)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
        assert "attachment" in answer.headers["content-disposition"]
        rows = list(csv.reader(io.StringIO(answer.text)))
        assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 5
        for row, item in zip(rows[1:], everything["items"], strict=True):
            record = dict(zip(CSV_COLUMNS, row, strict=True))
            assert int(record["id"]) == item["id"] and int(record["job_id"]) == item["job_id"]
            assert (record["model_id"], record["model_version"], record["label"]) == (
                item["model_id"], item["model_version"], item["label"])  # fmt: skip
            assert float(record["score"]) == item["score"]
            assert record["positive"] == ("true" if item["positive"] else "false")
            assert record["reference"] == {True: "true", False: "false", None: ""}[item["reference"]]
            assert (record["verdict"], record["user_name"]) == (item["verdict"], item["user_name"])
            assert record["threshold"] == "" and record["superseded_at"] == ""
        assert rows[1][CSV_COLUMNS.index("comment")] == "'" + evil  # a formula is not run by a spreadsheet
        assert rows[2][CSV_COLUMNS.index("comment")] == "missed, subtle"
    filtered = client.get("/api/v1/feedback.csv?model=mammo", headers=read).text
    assert len(list(csv.reader(io.StringIO(filtered)))) == 2
    json_export = listed("?format=json")
    assert json_export == everything

    summary = client.get("/api/v1/feedback/summary?model=cxr", headers=read).json()
    figures = {f["label"]: f for f in summary["figures"]}
    assert summary["ratings"] == 3 and set(figures) == {"tuberculosis", "pneumonia"}
    assert (figures["tuberculosis"]["agree"], figures["tuberculosis"]["unsure"]) == (1, 1)
    assert figures["tuberculosis"]["agreement_rate"] == 1.0 and figures["tuberculosis"]["ppv"] == 1.0
    assert figures["pneumonia"]["agreement_rate"] == 0.0 and figures["pneumonia"]["ppv"] is None
    assert figures["pneumonia"]["sensitivity"] == 0.0  # missed: present, the model said negative
