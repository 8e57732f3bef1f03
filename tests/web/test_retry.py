"""Failed jobs and sends appear on the overview with a retry button for admins; the button (and
the API) puts them back in the queue for the runner."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlmodel import Session, select

from node.store.tables import Job, JobState, OutboxItem, OutboxState, Study, utcnow
from tests.web.conftest import ADMIN_TOKEN, READ_TOKEN, TOKENS


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
