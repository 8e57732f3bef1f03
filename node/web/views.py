"""The API's and pages' views of the stored rows: studies, series and jobs as their schemas
(``node.web.schemas``), the worklist, the counters, one line per study for the pages; each list
built with a fixed number of queries, not one per row."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlmodel import Session, select

from node.monitoring.record import shadow_jobs
from node.store import repo
from node.store.repo import requeue_failed_jobs, requeue_failed_outputs
from node.store.tables import Job, JobState, OutboxItem, Series, SeriesState, Study, utcnow
from node.types import JobResult, OutputKind
from node.web.schemas import (
    FindingOut,
    JobOut,
    LabelOut,
    ModelOut,
    ModelsOut,
    OutputOut,
    RetryOut,
    SeriesOut,
    StatsOut,
    StudyOut,
    Totals,
    WorklistItemOut,
    WorklistOut,
)

if TYPE_CHECKING:
    from node.web.deps import WebNode


def study_out(study: Study, priority: str) -> StudyOut:
    """A study row as the API shows it, with its display priority."""
    return StudyOut(
        study_uid=study.study_uid,
        modalities=list(study.modalities),
        state=study.state,
        series_count=study.series_count,
        instance_count=study.instance_count,
        byte_size=study.byte_size,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        completed_at=study.completed_at,
        priority=priority,
        suspicion=study.suspicion,
    )


def studies_out(db: Session, studies: list[Study]) -> list[StudyOut]:
    """Study rows as the API shows them (their priorities in one pass)."""
    priorities = repo.display_priorities(db, studies)
    return [study_out(s, priorities[s.study_uid]) for s in studies]


def series_out(series: Series) -> SeriesOut:
    """A series row as the API shows it."""
    return SeriesOut.model_validate(series.model_dump())


def job_out(job: Job, outputs: list[OutboxItem], shadow_runs: set[int]) -> JobOut:
    """A job with its recorded result and outputs; ``shadow_runs``: ids of shadow models' jobs
    whose result predates the recorded flag."""
    result = job.recorded_result() or JobResult()
    shadow = result.shadow if result.shadow is not None else job.id in shadow_runs
    return JobOut(
        id=job.id or 0,
        model_id=job.model_id,
        model_version=result.version,
        rule=job.rule,
        level=job.level,
        series_uids=list(job.series_uids),
        state=job.state,
        attempts=job.attempts,
        error=job.error,
        shadow=shadow,
        images=result.images,
        frames=result.frames,
        timings=job.stage_timings(),
        findings=[FindingOut.model_validate(f, from_attributes=True) for f in result.findings],
        outputs=[OutputOut.model_validate(o, from_attributes=True) for o in outputs],
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
    )


def jobs_out(db: Session, jobs: list[Job]) -> list[JobOut]:
    """Jobs as the API shows them, their outputs and shadow flags in two queries."""
    ids = [j.id for j in jobs if j.id is not None]
    outputs = repo.job_outbox(db, ids)
    shadow_runs = shadow_jobs(db, ids)  # results from before JobResult.shadow was recorded
    return [job_out(j, [o for o in outputs if o.job_id == j.id], shadow_runs) for j in jobs]


def study_jobs(db: Session, study_uid: str) -> list[JobOut]:
    """One study's jobs as the API shows them."""
    return jobs_out(db, repo.study_jobs(db, study_uid))


def studies_jobs(db: Session, study_uids: list[str]) -> dict[str, list[JobOut]]:
    """Several studies' jobs as the API shows them, in a fixed number of queries."""
    by_study = repo.studies_jobs(db, study_uids)
    shown = iter(jobs_out(db, [j for uid in study_uids for j in by_study[uid]]))
    return {uid: [next(shown) for _ in by_study[uid]] for uid in study_uids}


def study_rows(
    db: Session, studies: list[Study]
) -> list[tuple[Study, list[Series], list[JobOut], tuple[str, str]]]:
    """Each study with its series, its jobs and the one-line summary of its analysis (the
    overview and studies pages), in a fixed number of queries."""
    uids = [s.study_uid for s in studies]
    series = repo.studies_series(db, uids)
    jobs = studies_jobs(db, uids)
    return [
        (s, series[s.study_uid], jobs[s.study_uid], analysis_summary(series[s.study_uid], jobs[s.study_uid]))
        for s in studies
    ]


def sc_outputs(job: Job) -> list[str]:
    """SOP Instance UIDs of a job's heatmap secondary captures (from its recorded result)."""
    result = job.recorded_result()
    return result.output_uids(OutputKind.SC) if result is not None else []


def analysis_summary(series: list[Series], jobs: list[JobOut]) -> tuple[str, str]:
    """One line for the status page: where the study's analysis stands, and a CSS class."""
    states = {s.state for s in series}
    if SeriesState.RECEIVING in states:
        return "receiving", "state-receiving"
    if SeriesState.COMPLETE in states:
        return "complete, not yet routed", "state-receiving"
    failed = [j for j in jobs if j.state == JobState.FAILED]
    if failed:
        return "failed: " + "; ".join(f"{j.model_id}: {j.error}" for j in failed), "bad"
    busy = [j for j in jobs if j.state not in (JobState.DONE, JobState.FAILED)]
    if busy:
        return ", ".join(f"{j.model_id} {j.state}" for j in busy), "state-receiving"
    if jobs:
        parts = []
        for j in jobs:
            positives = [f"{f.label} {f.probability:.2f}" for f in j.findings if f.positive and not f.normal]
            name = f"{j.model_id} (shadow)" if j.shadow else j.model_id  # not the active model's result
            parts.append(f"{name}: " + (", ".join(positives) if positives else "no finding"))
        return "; ".join(parts), "state-complete"
    if SeriesState.ROUTED in states:
        return "routed, waiting for the study", "state-receiving"
    notes = sorted({s.route_note for s in series if s.route_note})
    return "; ".join(notes) or "not routed", "note"


def totals(db: Session, since: datetime) -> Totals:
    """Arrivals since a time."""
    t = repo.totals_since(db, since)
    return Totals(studies=t.studies, series=t.series, instances=t.instances, bytes=t.bytes)


def models_out(node: WebNode) -> ModelsOut:
    """The loaded models (versions, labels, provider) and the refused ones with why."""
    loaded = []
    for model_id, model in sorted(node.models.registry.models.items()):
        m = model.manifest
        session = node.models.sessions.get(model_id)
        loaded.append(
            ModelOut(
                id=model_id,
                name=m.name,
                version=m.version,
                provider=session.active_provider if session is not None else "not loaded",
                research_use_only=m.research_use_only,
                labels=[
                    LabelOut(name=lb.name, threshold=lb.threshold, triage=lb.triage, normal=lb.normal)
                    for lb in m.labels
                ],
            )
        )
    return ModelsOut(loaded=loaded, refused=dict(node.models.registry.refused))


def worklist(db: Session, limit: int) -> WorklistOut:
    """The most recent studies in reading order, each with its positive triage findings."""
    rows = repo.worklist(db, limit)
    jobs = studies_jobs(db, [s.study_uid for s, _ in rows])
    arrival = {
        s.study_uid: i + 1
        for i, s in enumerate(sorted((s for s, _ in rows), key=lambda s: s.first_received_at))
    }
    items = []
    for position, (study, priority) in enumerate(rows, start=1):
        findings = [f for j in jobs[study.study_uid] for f in j.findings if f.triage and f.positive]
        items.append(
            WorklistItemOut(
                position=position,
                arrival_position=arrival[study.study_uid],
                study=study_out(study, priority),
                findings=sorted(findings, key=lambda f: -f.probability),
            )
        )
    return WorklistOut(items=items)


def stats(node: WebNode, db: Session) -> StatsOut:
    """The counters of GET /api/v1/stats."""
    now = datetime.now(UTC)
    studies = list(db.exec(select(Study)))
    priorities: dict[str, int] = {}
    for p in repo.display_priorities(db, studies).values():
        priorities[p] = priorities.get(p, 0) + 1
    return StatsOut(
        uptime_s=round(time.time() - node.started_at, 1),
        last_hour=totals(db, now - timedelta(hours=1)),
        last_day=totals(db, now - timedelta(days=1)),
        series_states=repo.state_counts(db),
        job_states=repo.job_state_counts(db),
        outbox_states=repo.outbox_state_counts(db),
        priorities=priorities,
    )


def retry(db: Session, job_id: int | None) -> RetryOut:
    """Put failed jobs and parked outputs (of one job, or all) back in the queue."""
    now = utcnow()
    jobs = requeue_failed_jobs(db, now, job_id)
    outputs = requeue_failed_outputs(db, now, job_id)
    db.commit()
    return RetryOut(jobs=jobs, outputs=outputs)
