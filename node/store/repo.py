"""State transitions and queries on the store. Callers own the session and the commit."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, update
from sqlmodel import Session, col, select

from node.store.tables import (
    DuplicateEvent,
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Priority,
    Series,
    SeriesState,
    Study,
    StudyState,
)
from node.triage import study_triage, worklist_order

_log = logging.getLogger(__name__)


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
        session.exec(
            update(Series)
            .where(col(Series.series_uid).in_(due), col(Series.state) == SeriesState.RECEIVING)
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
        session.exec(
            update(Series)
            .where(col(Series.study_uid).in_(due), col(Series.state) == SeriesState.RECEIVING)
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
        session.exec(
            update(Study)
            .where(col(Study.study_uid).in_(uids), col(Study.state) == StudyState.RECEIVING)
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


def studies_series(session: Session, study_uids: Sequence[str]) -> dict[str, list[Series]]:
    """The series of several studies in one query (each study's in study_series' order)."""
    out: dict[str, list[Series]] = {uid: [] for uid in study_uids}
    if study_uids:
        query = (
            select(Series)
            .where(col(Series.study_uid).in_(study_uids))
            .order_by(col(Series.series_number).asc().nulls_last(), col(Series.first_received_at))
        )
        for series in session.exec(query):
            out[series.study_uid].append(series)
    return out


def studies_jobs(session: Session, study_uids: Sequence[str]) -> dict[str, list[Job]]:
    """The jobs of several studies in one query (each study's oldest first)."""
    out: dict[str, list[Job]] = {uid: [] for uid in study_uids}
    if study_uids:
        for job in session.exec(select(Job).where(col(Job.study_uid).in_(study_uids)).order_by(col(Job.id))):
            out[job.study_uid].append(job)
    return out


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


# ------------------------------------------------------------------------------------------ triage
# the policy (what makes a study urgent, the reading order) is node.triage's; here its inputs are
# read and its outcome stored
def refresh_study_triage(
    session: Session,
    study_uid: str,
    now: datetime,
    triage_labels: Mapping[str, Collection[str]],
    notify: bool,
) -> bool:
    """Recompute a study's priority and score from its jobs; when it has just become urgent and
    ``notify``, queue its webhook notification. Returns True when it became urgent now."""
    study = session.get(Study, study_uid)
    if study is None:
        return False
    priority, score = study_triage(study_jobs(session, study_uid), triage_labels)
    became_urgent = priority == Priority.URGENT and study.priority != Priority.URGENT
    study.priority, study.suspicion, study.triaged_at = priority, score, now
    if became_urgent and notify and study.notify_state is None:
        study.notify_state, study.notify_attempts, study.notify_next_at = "pending", 0, now
    session.add(study)
    return became_urgent


#: Display priority of a study whose analysis failed (shown, never stored: a retry that succeeds
#: stores urgent or routine).
FAILED_PRIORITY = Priority.FAILED


def failed_studies(session: Session, study_uids: Collection[str]) -> set[str]:
    """The studies among ``study_uids`` whose analysis failed: the latest job of some model (the
    last revision of its job key) failed without a result, and none of their latest jobs is
    queued or running any more. Jobs that failed only in delivery (a result, parked outputs) are
    the outbox's, and do not count."""
    failed_analysis = select(Job.study_uid).where(Job.state == JobState.FAILED, Job.result == "").distinct()
    wanted = set(study_uids)
    candidates = [uid for uid in session.exec(failed_analysis) if uid in wanted]
    if not candidates:
        return set()
    latest: dict[tuple[str, str], tuple[int, str, str]] = {}
    query = select(  # type: ignore[call-overload]  # sqlmodel types select() for up to 4 columns
        Job.study_uid, Job.key, Job.id, Job.state, Job.result
    ).where(col(Job.study_uid).in_(candidates))
    for study_uid, key, job_id, state, result in session.exec(query):
        base = (study_uid, key.split("#", 1)[0])
        if base not in latest or job_id > latest[base][0]:
            latest[base] = (job_id, state, result)
    failed: set[str] = set()
    busy: set[str] = set()
    for (study_uid, _), (_, state, result) in latest.items():
        if state == JobState.FAILED and not result:
            failed.add(study_uid)
        elif state not in (JobState.DONE, JobState.FAILED, JobState.SENDING):
            busy.add(study_uid)
    return failed - busy


def display_priorities(session: Session, studies: Sequence[Study]) -> dict[str, str]:
    """Each study's priority for people: urgent when stored so; failed when its analysis failed
    (see failed_studies; a study left "pending" for ever would hide it); else the stored one,
    else pending (routed, or not decided yet) or not analysed (every series complete and none
    routed)."""
    failed = failed_studies(session, [s.study_uid for s in studies if s.priority != Priority.URGENT])
    uids = [s.study_uid for s in studies if not s.priority and s.study_uid not in failed]
    open_states: dict[str, bool] = {}
    if uids:
        rows = session.exec(select(Series.study_uid, Series.state).where(col(Series.study_uid).in_(uids)))
        for uid, state in rows:
            open_states[uid] = open_states.get(uid, False) or state != SeriesState.NOT_ROUTED
    out: dict[str, str] = {}
    for s in studies:
        if s.study_uid in failed:
            out[s.study_uid] = FAILED_PRIORITY
        elif s.priority:
            out[s.study_uid] = s.priority
        elif open_states.get(s.study_uid, True):
            out[s.study_uid] = Priority.PENDING
        else:
            out[s.study_uid] = Priority.NOT_ANALYSED
    return out


def worklist(session: Session, limit: int = 200) -> list[tuple[Study, str]]:
    """The most recent ``limit`` studies by arrival, in reading order, with display priority."""
    recent = list(session.exec(select(Study).order_by(col(Study.first_received_at).desc()).limit(limit)))
    priorities = display_priorities(session, recent)
    items = [(priorities[s.study_uid], s.suspicion, s.first_received_at) for s in recent]
    return [(recent[i], items[i][0]) for i in worklist_order(items)]


def due_notifications(session: Session, now: datetime, limit: int = 20) -> list[Study]:
    """Urgent studies whose webhook notification is due."""
    query = (
        select(Study)
        .where(Study.notify_state == "pending", col(Study.notify_next_at) <= now)
        .order_by(col(Study.notify_next_at))
        .limit(limit)
    )
    return list(session.exec(query))


def claim_notification(session: Session, now: datetime, skip: Collection[str] = ()) -> Study | None:
    """The next due notification (not in ``skip``), locked until the caller commits its outcome
    (FOR UPDATE SKIP LOCKED: a notifier on another node takes another one, and finds this one
    sent once committed). SQLite: no lock clause (one node)."""
    query = (
        select(Study)
        .where(Study.notify_state == "pending", col(Study.notify_next_at) <= now)
        .order_by(col(Study.notify_next_at))
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if skip:
        query = query.where(col(Study.study_uid).not_in(list(skip)))
    return session.exec(query).first()


# ------------------------------------------------------------------------------ lists for the pages
def list_jobs(session: Session, limit: int = 100, offset: int = 0, state: str | None = None) -> list[Job]:
    """Jobs, most recent first."""
    query = select(Job).order_by(col(Job.id).desc()).offset(offset).limit(limit)
    if state:
        query = query.where(Job.state == state)
    return list(session.exec(query))


def list_outbox(
    session: Session, limit: int = 100, offset: int = 0, state: str | None = None
) -> list[OutboxItem]:
    """Outbox rows, most recent first."""
    query = select(OutboxItem).order_by(col(OutboxItem.id).desc()).offset(offset).limit(limit)
    if state:
        query = query.where(OutboxItem.state == state)
    return list(session.exec(query))


def failed_jobs(session: Session, limit: int = 20) -> list[Job]:
    """The most recent failed jobs."""
    return list_jobs(session, limit, state=JobState.FAILED)


def failed_outputs(session: Session, limit: int = 20) -> list[OutboxItem]:
    """The most recent parked outbox rows."""
    return list_outbox(session, limit, state=OutboxState.FAILED)


def study_of_job(session: Session, job_id: int) -> str | None:
    """The Study Instance UID of a job."""
    job = session.get(Job, job_id)
    return job.study_uid if job else None


def jobs_finished_since(session: Session, since: datetime) -> dict[str, int]:
    """Jobs finished (done or failed) at or after ``since``, by state."""
    rows = session.exec(
        select(Job.state, func.count()).where(col(Job.finished_at) >= since).group_by(Job.state)
    )
    return {state: count for state, count in rows}


def find_output(session: Session, sop_instance_uid: str) -> OutboxItem | None:
    """One outbox row of an output object (any destination)."""
    return session.exec(
        select(OutboxItem).where(OutboxItem.sop_instance_uid == sop_instance_uid).limit(1)
    ).first()


def requeue_failed_jobs(session: Session, now: datetime, job_id: int | None = None) -> int:
    """Put failed jobs whose analysis failed (no output written) back in the queue with a fresh
    attempt budget. Jobs that failed only in delivery are the outbox's (see requeue_failed_outputs)."""
    query = select(Job).where(Job.state == JobState.FAILED, Job.result == "")
    if job_id is not None:
        query = query.where(Job.id == job_id)
    failed = list(session.exec(query))
    for job in failed:
        job.state, job.attempts, job.not_before, job.updated_at = JobState.QUEUED, 0, now, now
        job.finished_at = None
        session.add(job)
    if failed:
        _log.info("requeued %d failed jobs", len(failed))
    return len(failed)


def requeue_failed_outputs(session: Session, now: datetime, job_id: int | None = None) -> int:
    """Put parked outputs back in the queue (attempts start again) and their jobs back to sending.
    Returns the number of outputs requeued."""
    query = select(OutboxItem).where(OutboxItem.state == OutboxState.FAILED)
    if job_id is not None:
        query = query.where(OutboxItem.job_id == job_id)
    items = list(session.exec(query))
    for item in items:
        item.state, item.attempts, item.next_attempt_at = OutboxState.PENDING, 0, now
        session.add(item)
    for jid in {i.job_id for i in items}:
        job = session.get(Job, jid)
        if job is not None and job.state == JobState.FAILED:
            job.state, job.finished_at, job.updated_at = JobState.SENDING, None, now
            session.add(job)
    if items:
        _log.info("requeued %d parked outputs", len(items))
    return len(items)


# ------------------------------------------------------------------------------------- duplicates
def study_duplicates(session: Session, study_uid: str, limit: int = 100) -> list[DuplicateEvent]:
    """Copies of known instances received for a study (stored in it, or naming it while the
    instance is stored in another study), most recent first."""
    query = (
        select(DuplicateEvent)
        .where(
            or_(
                col(DuplicateEvent.study_uid) == study_uid,
                col(DuplicateEvent.received_study_uid) == study_uid,
            )
        )
        .order_by(col(DuplicateEvent.id).desc())
        .limit(limit)
    )
    return list(session.exec(query))


def duplicate_counts(session: Session) -> dict[str, int]:
    """Duplicate events recorded, by action (kept first, replaced, refused)."""
    rows = session.exec(select(DuplicateEvent.action, func.count()).group_by(DuplicateEvent.action))
    return {action: count for action, count in rows}
