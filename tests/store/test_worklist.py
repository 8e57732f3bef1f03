"""The worklist's order (repo.worklist_order: urgent by score, everything else in arrival order)
and the "failed" display priority: a study whose analysis failed says so (not "pending" for
ever), unless a later revision of that job succeeded or is still running, or only the delivery
failed, or the study is urgent anyway."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from sqlmodel import Session

from node.store import repo
from node.store.db import make_engine
from node.store.repo import worklist_order
from node.store.tables import Job, JobState, Priority, Series, SeriesState, Study, utcnow


def _study(session: Session, uid: str, priority: str | None = None) -> Study:
    now = utcnow()
    study = Study(study_uid=uid, first_received_at=now, last_received_at=now, priority=priority)
    session.add(study)
    session.flush()  # the series row refers to it
    session.add(
        Series(
            series_uid=uid + ".1",
            study_uid=uid,
            state=SeriesState.ROUTED,
            first_received_at=now,
            last_received_at=now,
        )
    )
    return study


def _job(session: Session, uid: str, key: str, state: str, result: dict | None = None, n: int = 0) -> None:
    now = utcnow() + timedelta(seconds=n)
    session.add(
        Job(
            key=key,
            model_id="cxr",
            rule="r",
            level="series",
            study_uid=uid,
            series_uids=[uid + ".1"],
            state=state,
            result=json.dumps(result) if result else "",
            error="OutputError: x" if state == JobState.FAILED else "",
            created_at=now,
            updated_at=now,
            not_before=now,
        )
    )


def test_display_priority_of_failed_analysis(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    done = {"findings": [], "images": 1}
    with Session(engine) as s:
        cases = {
            "1.1": None,  # failed: pending for ever before
            "1.2": None,  # failed, then its revision succeeded
            "1.3": None,  # failed, its revision is running
            "1.4": Priority.ROUTINE,  # analysed, delivery failed (a result): the outbox's problem
            "1.5": Priority.URGENT,  # one model urgent, another failed: urgent stays first
            "1.6": Priority.ROUTINE,  # one model routine, another failed: failed
            "1.7": None,  # never failed: pending
        }
        studies = [_study(s, uid, prio) for uid, prio in cases.items()]
        _job(s, "1.1", "cxr|series|1.1.1", JobState.FAILED)
        _job(s, "1.2", "cxr|series|1.2.1", JobState.FAILED)
        _job(s, "1.2", "cxr|series|1.2.1#2", JobState.DONE, done, n=1)
        _job(s, "1.3", "cxr|series|1.3.1", JobState.FAILED)
        _job(s, "1.3", "cxr|series|1.3.1#2", JobState.INFERRING, n=1)
        _job(s, "1.4", "cxr|series|1.4.1", JobState.FAILED, done)
        _job(s, "1.5", "cxr|series|1.5.1", JobState.DONE, done)
        _job(s, "1.5", "mammo|series|1.5.1", JobState.FAILED)
        _job(s, "1.6", "cxr|series|1.6.1", JobState.DONE, done)
        _job(s, "1.6", "mammo|series|1.6.1", JobState.FAILED)
        _job(s, "1.7", "cxr|series|1.7.1", JobState.QUEUED)
        s.commit()
        for study in studies:
            s.refresh(study)
        shown = repo.display_priorities(s, studies)
        assert shown == {
            "1.1": "failed",
            "1.2": Priority.PENDING,  # the done revision stored no priority here; the runner would
            "1.3": Priority.PENDING,
            "1.4": Priority.ROUTINE,
            "1.5": Priority.URGENT,
            "1.6": "failed",
            "1.7": Priority.PENDING,
        }
        order = [study.study_uid for study, _ in repo.worklist(s)]
        assert order[0] == "1.5"  # urgent first; failed keeps its arrival place
    engine.dispose()


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
