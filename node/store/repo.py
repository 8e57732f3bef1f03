"""State transitions and queries on the store. Callers own the session and the commit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from node.store.tables import Instance, Job, OutboxItem, Series, SeriesState, Study, StudyState


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """What the SCP hands the store for one instance already durable on disk."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    byte_size: int
    path: str
    calling_aet: str
    received_at: datetime


def known_instances(session: Session, uids: Iterable[str]) -> set[str]:
    """The SOP Instance UIDs among ``uids`` already recorded."""
    wanted = list(set(uids))
    if not wanted:
        return set()
    rows = session.exec(select(Instance.sop_instance_uid).where(col(Instance.sop_instance_uid).in_(wanted)))
    return set(rows)


def record_instances(session: Session, received: Sequence[ReceivedInstance]) -> set[str]:
    """Add the instances not yet known, updating their series and study; return the new UIDs.

    A series or study that was already complete is reopened by a late instance, so that it
    completes again after a new quiet period.
    """
    known = known_instances(session, (r.sop_instance_uid for r in received))
    new: dict[str, ReceivedInstance] = {}
    for r in received:
        if r.sop_instance_uid not in known and r.sop_instance_uid not in new:
            new[r.sop_instance_uid] = r
    for r in new.values():
        study = session.get(Study, r.study_uid)
        if study is None:
            study = Study(
                study_uid=r.study_uid, first_received_at=r.received_at, last_received_at=r.received_at
            )
            session.add(study)
        series = session.get(Series, r.series_uid)
        if series is None:
            series = Series(
                series_uid=r.series_uid,
                study_uid=r.study_uid,
                modality=r.modality[:16],
                body_part=r.body_part[:64],
                series_number=r.series_number,
                series_description=r.series_description[:64],
                calling_aet=r.calling_aet,
                first_received_at=r.received_at,
                last_received_at=r.received_at,
            )
            session.add(series)
            study.series_count += 1
            if r.modality and r.modality not in study.modalities.split("\\"):
                study.modalities = "\\".join(m for m in (*study.modalities.split("\\"), r.modality) if m)[:64]
        series.instance_count += 1
        series.byte_size += r.byte_size
        series.last_received_at = max(series.last_received_at, r.received_at)
        series.state = SeriesState.RECEIVING
        series.completed_at = None
        study.instance_count += 1
        study.byte_size += r.byte_size
        study.last_received_at = max(study.last_received_at, r.received_at)
        study.state = StudyState.RECEIVING
        study.completed_at = None
    session.flush()  # parents first: the tables have foreign keys but no ORM relationships
    session.add_all(
        Instance(
            sop_instance_uid=r.sop_instance_uid,
            series_uid=r.series_uid,
            study_uid=r.study_uid,
            sop_class_uid=r.sop_class_uid,
            transfer_syntax_uid=r.transfer_syntax_uid,
            instance_number=r.instance_number,
            byte_size=r.byte_size,
            path=r.path,
            calling_aet=r.calling_aet,
            received_at=r.received_at,
        )
        for r in new.values()
    )
    session.flush()
    return set(new)


def complete_quiet_series(session: Session, now: datetime, quiet: timedelta) -> list[str]:
    """Mark complete every receiving series with no instance for ``quiet``; return their UIDs."""
    due = list(
        session.exec(
            select(Series.series_uid).where(
                Series.state == SeriesState.RECEIVING, col(Series.last_received_at) <= now - quiet
            )
        )
    )
    if due:
        session.exec(  # type: ignore[call-overload]
            update(Series)
            .where(col(Series.series_uid).in_(due), Series.state == SeriesState.RECEIVING)
            .values(state=SeriesState.COMPLETE, completed_at=now)
        )
    return due


def complete_quiet_studies(session: Session, now: datetime, quiet: timedelta) -> list[str]:
    """Study-level grouping: complete every receiving study (and its series) quiet for ``quiet``."""
    due = list(
        session.exec(
            select(Study.study_uid).where(
                Study.state == StudyState.RECEIVING, col(Study.last_received_at) <= now - quiet
            )
        )
    )
    if due:
        session.exec(  # type: ignore[call-overload]
            update(Series)
            .where(col(Series.study_uid).in_(due), Series.state == SeriesState.RECEIVING)
            .values(state=SeriesState.COMPLETE, completed_at=now)
        )
        _mark_studies_complete(session, due, now)
    return due


def complete_studies_of_complete_series(session: Session, now: datetime) -> list[str]:
    """Series-level grouping: a receiving study whose series are all complete is complete."""
    receiving_series = select(Series.study_uid).where(Series.state == SeriesState.RECEIVING)
    due = list(
        session.exec(
            select(Study.study_uid).where(
                Study.state == StudyState.RECEIVING, col(Study.study_uid).not_in(receiving_series)
            )
        )
    )
    _mark_studies_complete(session, due, now)
    return due


def _mark_studies_complete(session: Session, uids: list[str], now: datetime) -> None:
    if uids:
        session.exec(  # type: ignore[call-overload]
            update(Study)
            .where(col(Study.study_uid).in_(uids), Study.state == StudyState.RECEIVING)
            .values(state=StudyState.COMPLETE, completed_at=now)
        )


def list_studies(session: Session, limit: int = 50, offset: int = 0, state: str | None = None) -> list[Study]:
    """Studies, most recently received first."""
    query = select(Study).order_by(col(Study.last_received_at).desc()).offset(offset).limit(limit)
    if state:
        query = query.where(Study.state == state)
    return list(session.exec(query))


def study_series(session: Session, study_uid: str) -> list[Series]:
    """The series of one study, by series number then arrival."""
    query = (
        select(Series)
        .where(Series.study_uid == study_uid)
        .order_by(col(Series.series_number).asc().nulls_last(), col(Series.first_received_at))
    )
    return list(session.exec(query))


def series_instances(session: Session, series_uid: str) -> list[Instance]:
    """The instances of one series, by instance number then arrival."""
    query = (
        select(Instance)
        .where(Instance.series_uid == series_uid)
        .order_by(col(Instance.instance_number).asc().nulls_last(), col(Instance.received_at))
    )
    return list(session.exec(query))


@dataclass(frozen=True, slots=True)
class Totals:
    """How much arrived since a moment."""

    studies: int
    series: int
    instances: int
    bytes: int


def totals_since(session: Session, since: datetime) -> Totals:
    """Counts of what arrived at or after ``since``."""
    instances, size = session.exec(
        select(func.count(), func.coalesce(func.sum(Instance.byte_size), 0)).where(
            col(Instance.received_at) >= since
        )
    ).one()
    studies = session.exec(
        select(func.count(func.distinct(Instance.study_uid))).where(col(Instance.received_at) >= since)
    ).one()
    series = session.exec(
        select(func.count(func.distinct(Instance.series_uid))).where(col(Instance.received_at) >= since)
    ).one()
    return Totals(studies=studies, series=series, instances=instances, bytes=int(size))


def state_counts(session: Session) -> dict[str, int]:
    """Number of series in each state."""
    rows = session.exec(select(Series.state, func.count()).group_by(Series.state))
    return {state: count for state, count in rows}


def study_jobs(session: Session, study_uid: str) -> list[Job]:
    """The jobs of one study, oldest first."""
    return list(session.exec(select(Job).where(Job.study_uid == study_uid).order_by(col(Job.id))))


def job_outbox(session: Session, job_ids: Sequence[int]) -> list[OutboxItem]:
    """The outbox rows of some jobs."""
    if not job_ids:
        return []
    query = select(OutboxItem).where(col(OutboxItem.job_id).in_(job_ids)).order_by(col(OutboxItem.id))
    return list(session.exec(query))


def job_state_counts(session: Session) -> dict[str, int]:
    """Number of jobs in each state."""
    rows = session.exec(select(Job.state, func.count()).group_by(Job.state))
    return {state: count for state, count in rows}


def outbox_state_counts(session: Session) -> dict[str, int]:
    """Number of outbox rows in each state."""
    rows = session.exec(select(OutboxItem.state, func.count()).group_by(OutboxItem.state))
    return {state: count for state, count in rows}
