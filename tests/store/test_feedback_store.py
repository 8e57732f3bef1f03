"""The feedback table keeps one current verdict per job, finding and user (a partial unique index,
on SQLite and PostgreSQL); recording a new verdict supersedes the user's previous one and keeps it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from node.store.db import make_engine
from node.store.feedback import FeedbackFilter, count_feedback, list_feedback, record
from node.store.tables import Feedback, utcnow


def _verdict(user: str = "viewer", verdict: str = "agree", label: str = "pneumonia", **fields) -> Feedback:
    values = {"job_id": 7, "study_uid": "1.2.3", "model_id": "cxr", "model_version": "1.0.0", "score": 0.8,
              "positive": True, "created_at": utcnow()}  # fmt: skip
    values.update(fields)
    return Feedback(label=label, verdict=verdict, user_name=user, **values)


def test_one_current_verdict_per_user_and_finding(database_url):
    engine = make_engine(database_url)
    try:
        with Session(engine) as s:
            first, replaced = record(s, _verdict())
            assert not replaced
            second, replaced = record(s, _verdict(verdict="disagree", correct_label="negative"))
            assert replaced and second.id != first.id
            record(s, _verdict(user="it", verdict="unsure"))  # another user: a row of its own
            record(s, _verdict(label="tuberculosis"))  # another finding: a row of its own
            current = list_feedback(s, FeedbackFilter(job_id=7))
            assert [(r.user_name, r.label, r.verdict) for r in current] == [
                ("viewer", "pneumonia", "disagree"),
                ("it", "pneumonia", "unsure"),
                ("viewer", "tuberculosis", "agree"),
            ]
            history = list_feedback(s, FeedbackFilter(job_id=7, history=True))
            assert len(history) == 4 and history[0].superseded_at == second.created_at
            assert count_feedback(s, FeedbackFilter(user_name="viewer")) == 2
            assert count_feedback(s, FeedbackFilter(since=utcnow() + timedelta(seconds=5))) == 0
            # the database itself refuses a second current row for the same user and finding
            s.add(_verdict(verdict="unsure"))
            with pytest.raises(IntegrityError):
                s.commit()
            s.rollback()
            s.add(_verdict(verdict="unsure", superseded_at=utcnow()))  # a superseded one is fine
            s.commit()
    finally:
        engine.dispose()
