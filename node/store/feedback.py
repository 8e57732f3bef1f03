"""Radiologist feedback on the store: record a verdict (superseding the user's previous one on the
same finding), list and filter verdicts. Callers own the session; ``record`` commits (it retries
once when another request of the same user on the same finding committed in between)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from node.store.tables import Feedback, Instance


@dataclass(frozen=True)
class FeedbackFilter:
    """Which verdicts to list (every field optional; ``history`` adds superseded rows)."""

    model_id: str | None = None
    model_version: str | None = None
    label: str | None = None
    verdict: str | None = None
    user_name: str | None = None
    study_uid: str | None = None
    job_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    history: bool = False


def _where(query: SelectOfScalar, f: FeedbackFilter) -> SelectOfScalar:
    if not f.history:
        query = query.where(col(Feedback.superseded_at).is_(None))
    for column, value in (
        (Feedback.model_id, f.model_id),
        (Feedback.model_version, f.model_version),
        (Feedback.label, f.label),
        (Feedback.verdict, f.verdict),
        (Feedback.user_name, f.user_name),
        (Feedback.study_uid, f.study_uid),
        (Feedback.job_id, f.job_id),
    ):
        if value is not None:
            query = query.where(col(column) == value)
    if f.since is not None:
        query = query.where(col(Feedback.created_at) >= f.since)
    if f.until is not None:
        query = query.where(col(Feedback.created_at) < f.until)
    return query


def list_feedback(
    session: Session, f: FeedbackFilter, limit: int | None = None, offset: int = 0
) -> list[Feedback]:
    """Verdicts matching ``f``, oldest first (by time, then id); all of them when ``limit`` is None."""
    query = _where(select(Feedback), f).order_by(col(Feedback.created_at), col(Feedback.id)).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    return list(session.exec(query))


def count_feedback(session: Session, f: FeedbackFilter) -> int:
    """How many verdicts match ``f``."""
    return session.exec(_where(select(func.count()).select_from(Feedback), f)).one()


def current_for_jobs(session: Session, job_ids: Sequence[int]) -> list[Feedback]:
    """The current verdicts (every user's) on the findings of these jobs."""
    if not job_ids:
        return []
    return list(
        session.exec(
            select(Feedback)
            .where(col(Feedback.job_id).in_(job_ids), col(Feedback.superseded_at).is_(None))
            .order_by(col(Feedback.created_at), col(Feedback.id))
        )
    )


def record(session: Session, row: Feedback) -> tuple[Feedback, bool]:
    """Store ``row`` as the current verdict of its user on its finding, superseding the previous
    one (kept, with ``superseded_at``); commit. Returns (the stored row, whether it replaced one)."""
    for attempt in (1, 2):
        replaced = session.exec(
            update(Feedback)
            .where(
                col(Feedback.job_id) == row.job_id,
                col(Feedback.label) == row.label,
                col(Feedback.user_name) == row.user_name,
                col(Feedback.superseded_at).is_(None),
            )
            .values(superseded_at=row.created_at)
        ).rowcount
        fresh = Feedback.model_validate(row.model_dump(exclude={"id"}))
        session.add(fresh)
        try:
            session.commit()
        except IntegrityError:  # the same user's concurrent verdict on the finding committed first
            session.rollback()
            if attempt == 2:
                raise
            continue
        session.refresh(fresh)
        return fresh, bool(replaced)
    raise AssertionError("unreachable")


def study_sample_path(session: Session, study_uid: str) -> str | None:
    """The stored path (relative to the spool) of one instance of the study, or None."""
    return session.exec(
        select(Instance.path)
        .where(Instance.study_uid == study_uid, col(Instance.replaced_at).is_(None))
        .limit(1)
    ).first()
