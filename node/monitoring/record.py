"""The runner's one call into monitoring: a modelrun row for each analysed job."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from node.budget import DEFAULT_BUDGET, Budget
from node.errors import NodeError
from node.inference.manifest import Manifest
from node.monitoring.inputs import InputStats, input_stats
from node.store.tables import Job, ModelRun, utcnow
from node.types import AnalysisResult

log = logging.getLogger(__name__)


def subject(job: Job) -> str:
    """What a job analysed, without the model: ``level|uid`` of its key (revisions dropped), so
    that a shadow model's run pairs with the active model's on the same series or study."""
    base = job.key.split("#", 1)[0]
    parts = base.split("|", 1)
    return (parts[1] if len(parts) == 2 else ",".join(job.series_uids))[:256]


def scores(result: AnalysisResult) -> dict[str, list[float | bool]]:
    """``{label: [probability, positive]}`` of a result's aggregated findings."""
    return {f.label: [round(float(f.probability), 6), bool(f.positive)] for f in result.findings}


def build_run(job: Job, manifest: Manifest, result: AnalysisResult, stats: InputStats) -> ModelRun:
    """The modelrun row of one analysed job."""
    return ModelRun(
        job_id=job.id or 0,
        model_id=manifest.id,
        model_version=manifest.version[:64],
        shadow=manifest.mode == "shadow",
        recorded_at=utcnow(),
        subject=subject(job),
        scores=json.dumps(scores(result)),
        images=stats.images,
        rows=stats.rows,
        columns=stats.columns,
        pixel_spacing_mm=stats.pixel_spacing_mm,
        p1=stats.p1,
        p50=stats.p50,
        p99=stats.p99,
        manufacturer=stats.manufacturer,
        manufacturer_model=stats.manufacturer_model,
    )


def record_run(
    engine: Engine,
    job: Job,
    manifest: Manifest,
    result: AnalysisResult,
    files: Sequence[Path],
    budget: Budget = DEFAULT_BUDGET,
) -> ModelRun | None:
    """Record one analysed job for monitoring (after its outputs are queued: it never delays
    them). An image that cannot be read again leaves the input statistics empty; a database
    error is logged and the run is not recorded (monitoring never fails a job)."""
    try:
        stats = input_stats(files, budget)
    except (NodeError, OSError, ValueError) as exc:
        log.warning("job %s: no input statistics for monitoring: %s", job.id, type(exc).__name__)
        stats = InputStats(images=len(files))
    row = build_run(job, manifest, result, stats)
    try:
        with Session(engine, expire_on_commit=False) as session:
            session.add(row)
            session.commit()
    except SQLAlchemyError as exc:
        log.warning("job %s: monitoring row not recorded: %s", job.id, type(exc).__name__)
        return None
    return row


def shadow_jobs(session: Session, job_ids: Sequence[int]) -> set[int]:
    """Which of ``job_ids`` were recorded as shadow runs (for results written before the job
    result recorded ``shadow`` itself)."""
    if not job_ids:
        return set()
    query = select(ModelRun.job_id).where(col(ModelRun.job_id).in_(job_ids), col(ModelRun.shadow).is_(True))
    return set(session.exec(query))
