"""Job and routing state transitions in the database. Every change is committed by the caller."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, exists, func, or_, update
from sqlalchemy.exc import IntegrityError as RowConflict
from sqlmodel import Session, col, select

from node.errors import DecodeError
from node.inference.decode import check_budget
from node.pipeline.region import middle_paths, region_from_files
from node.pipeline.route import (
    RouteDecision,
    RouteHeader,
    RuleSet,
    UnreadableHeader,
    read_route_dataset,
    route,
    route_header_from_dataset,
    with_pixel_region,
)
from node.store import repo
from node.store.integrity import IntegrityError, check_file
from node.store.tables import (
    ACTIVE_JOB_STATES,
    Instance,
    Job,
    JobState,
    Series,
    SeriesState,
    Study,
    StudyState,
)
from node.types import JobResult, JobTimings

log = logging.getLogger(__name__)


def job_key(model_id: str, level: str, uid: str) -> str:
    """The unique key that makes job creation idempotent."""
    return f"{model_id}|{level}|{uid}"


def _more_instances_than(session: Session, job: Job, series_uids: list[str]) -> bool:
    """True when the series hold instances ``job`` did not analyse: more than the images it
    recorded, or (a job that failed before recording them) any received after it started."""
    in_series = col(Instance.series_uid).in_(series_uids)
    since = job.started_at or job.created_at
    replaced = select(Instance.sop_instance_uid).where(in_series, col(Instance.replaced_at) > since).limit(1)
    if session.exec(replaced).first() is not None:  # a copy replaced one it analysed (keep_last)
        return True
    recorded = job.recorded_result()
    analysed = recorded.images if recorded is not None else None
    if analysed is not None:
        return int(session.exec(select(func.count()).select_from(Instance).where(in_series)).one()) > analysed
    later = select(Instance.sop_instance_uid).where(in_series, col(Instance.received_at) > since).limit(1)
    return session.exec(later).first() is not None


#: Hands a job just created (or requeued) to the queue in the same transaction
#: (``cluster.queue: procrastinate``; see node/runner/queue.py).
Enqueue = Callable[[Session, Job], object]


def _new_job(
    session: Session,
    model_id: str,
    rule: str,
    level: str,
    study_uid: str,
    series: list[str],
    now: datetime,
    enqueue: Enqueue | None = None,
) -> bool | None:
    """Create the job for (model, level, uid) unless one covers the current instances already.

    Instances that arrive after a series was analysed reopen it; when it completes again, a
    revision job (key ``<key>#<n>``, so new output UIDs) analyses the whole series, unless the last
    job is still queued (it will read the new files when it runs). True: created; False: nothing
    to do; None: the last job is running, decide again once it has finished.
    """
    uid = study_uid if level == "study" else series[0]
    key = job_key(model_id, level, uid)
    jobs = list(
        session.exec(
            select(Job)
            .where(or_(col(Job.key) == key, col(Job.key).startswith(key + "#")))
            .order_by(col(Job.id))
        )
    )
    if jobs:
        last = jobs[-1]
        if last.state == JobState.QUEUED:
            return False
        if last.state in ACTIVE_JOB_STATES:
            return None
        if not _more_instances_than(session, last, series):
            return False
        key = f"{key}#{len(jobs) + 1}"
        log.info("job %d (%s): more instances arrived after it ran; revision %s", last.id, model_id, key)
    job = Job(
        key=key,
        model_id=model_id,
        rule=rule,
        level=level,
        study_uid=study_uid,
        series_uids=list(series),
        created_at=now,
        updated_at=now,
        not_before=now,
    )
    try:  # idempotent on the key: another node may have created it a moment ago
        with session.begin_nested():
            session.add(job)
    except RowConflict:
        log.info("job %s was created by another node", key)
        return False
    if enqueue is not None:  # in this transaction: the row and its queue entry commit together
        enqueue(session, job)
    return True


#: Makes a job's or a series' files local (fetched from the object store when not in this spool).
Localise = Callable[[list["StoredFile"]], list["StoredFile"]]


def _decide(
    rules: RuleSet, spool_root: Path, series: Series, session: Session, localise: Localise | None = None
) -> RouteDecision | str:
    """Route on the first instance's header; a rule that needs the body region of a CT or MR whose
    header names none gets it from the pixels of up to three instances around the series' middle
    (read only then, once; the evidence is in the reason stored on the series)."""
    instances = repo.series_instances(session, series.series_uid)
    if not instances:
        return "not routed: the series has no instance on record"
    stored = _stored_files(instances, spool_root, "the series")
    if localise is not None:
        stored = localise(stored)
    first, damage = _first_intact(stored)
    if first is None:  # no file to read: route on what was recorded at ingest; its jobs fail, naming it
        log.error("routing: no file of a series holds the bytes received: %s", damage)
        recorded = RouteHeader(
            modality=series.modality or None,
            sop_class_uid=instances[0].sop_class_uid or None,
            body_part=series.body_part or None,
            series_description=series.series_description or None,
        )
        decision = route(rules, recorded)
        if decision.rule and decision.models:
            return decision
        return f"not routed: the series' files are damaged: {damage}"
    try:
        ds = read_route_dataset(first.path)
    except UnreadableHeader as exc:
        return f"not routed: its first instance cannot be read ({exc})"
    checks = {f.path: f for f in stored}
    header = with_pixel_region(
        route_header_from_dataset(ds),
        lambda: region_from_files(
            middle_paths([f.path for f in stored]), read=partial(_read_within_budget, checks=checks)
        ),
    )
    return route(rules, header)


def _first_intact(stored: Sequence[StoredFile]) -> tuple[StoredFile | None, str]:
    """The first file of a series that holds the bytes recorded for it (routing reads its header;
    a damaged one fails the series' jobs, which check every file), and what was wrong with the
    ones before it."""
    damage = ""
    for f in stored:
        try:
            f.check()
        except IntegrityError as exc:
            damage = damage or str(exc)
            continue
        if damage:
            log.error("routing: %s; routed on a later instance", damage)
        return f, damage
    return None, damage


def _read_within_budget(path: Path, checks: dict[Path, StoredFile] | None = None) -> Dataset:
    """A slice for the body-region look-up, refused (as unreadable: its region stays unknown) when
    decoding it would exceed the resource budget — routing must not decode a pixel bomb — or when
    it is not the file that was received (``checks``: the recorded hash of each path)."""
    if checks is not None and path in checks:
        try:
            checks[path].check()
        except IntegrityError as exc:
            raise ValueError(f"not read for routing: {exc}") from exc
    ds = dcmread(path)
    try:
        check_budget(ds)
    except DecodeError as exc:
        raise ValueError(f"not decoded for routing: {exc}") from exc
    return ds


def route_complete_series(
    session: Session,
    rules: RuleSet,
    available: Callable[[str], bool],
    spool_root: Path,
    now: datetime,
    localise: Localise | None = None,
    uploaded_only: bool = False,
    enqueue: Enqueue | None = None,
) -> int:
    """Route every complete, not yet routed series; create its jobs (series/image level).
    Returns the number of series routed or recorded as not routed (not those left complete
    until a running job of theirs has finished). With ``uploaded_only`` (an object store) a
    series waits until every instance of it is uploaded; ``localise`` fetches its files when
    they are not in this node's spool."""
    # claimed by a row lock held until the caller commits: another node's pass skips these series
    # (SKIP LOCKED) and, once committed, no longer finds them complete; a no-op on SQLite (one node)
    pending = list(
        session.exec(
            select(Series)
            .where(Series.state == SeriesState.COMPLETE, *([~_not_uploaded()] if uploaded_only else []))
            .order_by(col(Series.series_uid))
            .with_for_update(skip_locked=True)
        )
    )
    waiting = 0
    for series in pending:
        decision = _decide(rules, spool_root, series, session, localise)
        if isinstance(decision, str):
            series.state, series.route_note = SeriesState.NOT_ROUTED, decision[:512]
            continue
        models = [m for m in decision.models if available(m)]
        if not decision.rule or not decision.models:
            series.state, series.route_note = SeriesState.NOT_ROUTED, decision.reason[:512]
            continue
        if not models:
            missing = ", ".join(decision.models)
            series.state = SeriesState.NOT_ROUTED
            series.route_note = (
                f"not routed: rule '{decision.rule}' names model {missing}, which is not loaded "
                f"({decision.reason})"
            )[:512]
            continue
        series.state = SeriesState.ROUTED
        series.route_rule = decision.rule[:64]
        series.route_models = models
        series.route_grouping = str(decision.grouping)
        series.route_note = decision.reason[:512]
        if decision.grouping != "study":
            outcomes = [
                _new_job(
                    session,
                    model_id,
                    decision.rule,
                    str(decision.grouping),
                    series.study_uid,
                    [series.series_uid],
                    now,
                    enqueue,
                )
                for model_id in models
            ]
            if None in outcomes:  # a job of this series is running: route it again next pass
                series.state = SeriesState.COMPLETE
                waiting += 1
    decided = len(pending) - waiting
    if decided:
        log.info("routing: %d series decided", decided)
    return decided


def _not_uploaded() -> ColumnElement[bool]:
    """A series holds an instance not yet in the object store."""
    return exists().where(
        col(Instance.series_uid) == col(Series.series_uid), col(Instance.uploaded_at).is_(None)
    )


def create_study_jobs(session: Session, now: datetime, enqueue: Enqueue | None = None) -> int:
    """For complete studies, one job per study-level model over all its series routed to it."""
    created = 0
    studies = session.exec(
        select(Study.study_uid)
        .join(Series, col(Series.study_uid) == col(Study.study_uid))
        .where(
            Study.state == StudyState.COMPLETE,
            Series.route_grouping == "study",
            Series.state == SeriesState.ROUTED,
        )
        .distinct()
    )
    for study_uid in list(studies):
        # one node at a time per study (the lock is held until the caller commits); others skip it
        locked = select(Study.study_uid).where(Study.study_uid == study_uid).with_for_update(skip_locked=True)
        if session.exec(locked).first() is None:
            continue
        series = repo.study_series(session, study_uid)
        if any(s.state in (SeriesState.RECEIVING, SeriesState.COMPLETE) for s in series):
            continue  # wait until every series of the study is routed
        by_model: dict[str, tuple[str, list[str]]] = {}
        for s in series:
            if s.state == SeriesState.ROUTED and s.route_grouping == "study":
                for model_id in s.route_models:
                    by_model.setdefault(model_id, (s.route_rule, []))[1].append(s.series_uid)
        for model_id, (rule, uids) in by_model.items():
            created += bool(_new_job(session, model_id, rule, "study", study_uid, uids, now, enqueue))
    return created


def claim_job(session: Session, now: datetime, owner: str = "", lease_s: float = 30.0) -> Job | None:
    """Take the oldest queued job that is due for ``owner`` (a node id), with a lease of
    ``lease_s`` that its heartbeat renews (:func:`renew_leases`); None when there is none. The
    caller commits."""
    job = session.exec(
        select(Job)
        .where(Job.state == JobState.QUEUED, col(Job.not_before) <= now)
        .order_by(col(Job.id))
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    if job is None:
        return None
    assert job.id is not None
    if not _take(session, job.id, now, owner, now + timedelta(seconds=lease_s)):
        return None
    session.refresh(job)
    return job


def _take(session: Session, job_id: int, now: datetime, owner: str, lease_until: datetime | None) -> bool:
    """Move the queued job ``job_id`` to its first running state for ``owner``, counting the
    attempt; False when it is no longer queued (another claim won)."""
    claimed = session.exec(
        update(Job)
        .where(col(Job.id) == job_id, col(Job.state) == JobState.QUEUED)
        .values(
            state=JobState.PREPROCESSING,
            attempts=Job.attempts + 1,
            started_at=now,
            updated_at=now,
            error="",
            owner=owner,
            lease_until=lease_until,
        )
    )
    return bool(claimed.rowcount == 1)


def claim_job_by_id(session: Session, job_id: int, now: datetime, owner: str) -> Job | None:
    """Take the queued job ``job_id`` for ``owner`` (the queue handed it to this node: its
    procrastinate job's schedule kept the back-off, so ``not_before`` is not checked again); None
    when it is not queued (another claim won, or it finished). No lease: procrastinate's worker
    heartbeats stand for it. The caller commits."""
    if not _take(session, job_id, now, owner, None):
        return None
    return session.get(Job, job_id, populate_existing=True)


def set_state(session: Session, job_id: int, state: str, now: datetime, owner: str | None = None) -> None:
    """Record the stage a job is in (with ``owner``: only while that node still holds it)."""
    query = update(Job).where(col(Job.id) == job_id)
    if owner is not None:
        query = query.where(col(Job.owner) == owner, col(Job.state).in_(ACTIVE_JOB_STATES))
    session.exec(query.values(state=state, updated_at=now))


def finish(
    session: Session,
    job: Job,
    state: str,
    now: datetime,
    timings: dict[str, float],
    result: JobResult | None = None,
    error: str = "",
) -> None:
    """Record the end of a job's processing (sending, done or failed)."""
    job.state = state
    job.updated_at = now
    job.timings = JobTimings.of(timings).model_dump_json()
    if result is not None:
        job.result = result.to_json()
    job.error = error[:1024]
    if state in (JobState.DONE, JobState.FAILED):
        job.finished_at = now
    session.add(job)


def retry_later(session: Session, job: Job, now: datetime, delay_s: float, error: str) -> None:
    """Put a job back in the queue after a transient error."""
    job.state = JobState.QUEUED
    job.not_before = now + timedelta(seconds=delay_s)
    job.updated_at = now
    job.error = f"attempt {job.attempts} failed, will retry: {error}"[:1024]
    session.add(job)


def _requeue(session: Session, where: list, now: datetime, max_attempts: int, why: str) -> int:
    """Active jobs matching ``where`` back to the queue, or failed when they used every attempt."""
    active = col(Job.state).in_(ACTIVE_JOB_STATES)
    exhausted = list(session.exec(select(Job.id).where(active, *where, col(Job.attempts) >= max_attempts)))
    if exhausted:
        error = f"interrupted {max_attempts} times: {why} while each attempt ran"
        session.exec(
            update(Job)
            .where(col(Job.id).in_(exhausted), active)
            .values(state=JobState.FAILED, error=error, updated_at=now, finished_at=now, lease_until=None)
        )
        log.error("%d interrupted jobs failed: they had used all %d attempts", len(exhausted), max_attempts)
    result = session.exec(
        update(Job)
        .where(active, *where)
        .values(state=JobState.QUEUED, not_before=now, updated_at=now, owner="", lease_until=None)
    )
    return int(result.rowcount)


def requeue_interrupted(session: Session, now: datetime, max_attempts: int, owner: str = "") -> int:
    """At start: the jobs this node (``owner``) left mid-way go back to the queue (their outputs
    are deterministic), except those that have used every attempt: they fail instead, so a job
    that takes the process down each time it runs (memory, a crash in a native library) does not
    do so for ever. Jobs running on other nodes are left alone (they come back through
    :func:`reclaim_expired` if their node is gone); jobs from before leases existed (no owner)
    count as this node's. The caller commits. Returns how many were requeued."""
    mine = or_(col(Job.owner) == owner, col(Job.owner) == "")
    count = _requeue(session, [mine], now, max_attempts, "the node stopped")
    if count:
        log.info("resuming %d interrupted jobs", count)
    return count


def reclaim_expired(session: Session, now: datetime, max_attempts: int) -> int:
    """Any node, now and then: running jobs whose lease expired (their node died or lost the
    database) go back to the queue, or fail once they used every attempt. The caller commits."""
    expired = col(Job.lease_until) < now
    count = _requeue(session, [expired], now, max_attempts, "its node stopped")
    if count:
        log.warning("%d jobs whose node stopped renewing their lease were requeued", count)
    return count


def requeue_job(session: Session, job_id: int, now: datetime, max_attempts: int, why: str) -> str:
    """Job ``job_id``, if it is running, back to the queue (or failed when it used every attempt);
    returns its state afterwards. The caller commits."""
    _requeue(session, [col(Job.id) == job_id], now, max_attempts, why)
    state = session.exec(select(Job.state).where(col(Job.id) == job_id)).first()
    return state or JobState.FAILED


def renew_leases(session: Session, owner: str, now: datetime, lease_s: float) -> int:
    """The heartbeat: extend the lease of every job ``owner`` is running. The caller commits."""
    result = session.exec(
        update(Job)
        .where(col(Job.owner) == owner, col(Job.state).in_(ACTIVE_JOB_STATES))
        .values(lease_until=now + timedelta(seconds=lease_s))
    )
    return int(result.rowcount)


def still_owned(job: Job | None, owner: str) -> bool:
    """True when ``job`` (read afresh) is still running under ``owner``'s claim: its lease was not
    taken over by another node after this one stalled."""
    return job is not None and job.state in ACTIVE_JOB_STATES and job.owner == owner


def job_files(session: Session, job: Job, spool_root: Path) -> list[Path]:
    """The spool paths of every instance a job covers."""
    return [f.path for f in job_stored_files(session, job, spool_root)]


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A received instance's file with what was recorded about it at ingest."""

    path: Path
    sha256: str | None  # None: received before hashes were recorded (presence and size checked)
    byte_size: int
    what: str  # names it for people: "instance 3 of 40 of the series" (no patient data)

    def check(self) -> None:
        """Raise IntegrityError unless the file holds the bytes received (see check_file)."""
        check_file(self.path, self.sha256, self.byte_size, self.what)


def _stored_files(instances: Sequence[Instance], spool_root: Path, series: str) -> list[StoredFile]:
    n = len(instances)
    return [
        StoredFile(
            spool_root / inst.path,
            inst.sha256,
            inst.byte_size,
            f"instance {k} of {n} of {series}"
            + (f" (Instance Number {inst.instance_number})" if inst.instance_number is not None else ""),
        )
        for k, inst in enumerate(instances, start=1)
    ]


def job_stored_files(session: Session, job: Job, spool_root: Path) -> list[StoredFile]:
    """Every instance file a job covers, in analysis order, with its recorded hash and size."""
    uids = job.series_uids
    out: list[StoredFile] = []
    for i, uid in enumerate(uids, start=1):
        name = "the series" if len(uids) == 1 else f"series {i} of {len(uids)}"
        out.extend(_stored_files(repo.series_instances(session, uid), spool_root, name))
    return out


def check_stored_files(files: Sequence[StoredFile]) -> None:
    """Raise IntegrityError (permanent: the job fails) naming the first file that is missing,
    empty or changed since it was received, and how many others are damaged too."""
    damaged: list[IntegrityError] = []
    for f in files:
        try:
            f.check()
        except IntegrityError as exc:
            damaged.append(exc)
    if damaged:
        more = f" (and {len(damaged) - 1} more of the {len(files)} instances)" if len(damaged) > 1 else ""
        raise IntegrityError(f"{damaged[0]}{more}; not analysed: resend the series") from damaged[0]
