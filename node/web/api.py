"""FastAPI app: health probes, the JSON API under /api/v1, and the HTML status page.

The web layer reads the store only; it never calls the pipeline.
"""

import json
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import func
from sqlmodel import Session, select

from node.store import repo
from node.store.tables import Job, JobState, OutboxItem, Series, SeriesState, Study
from node.web.schemas import (
    FindingOut,
    Health,
    JobOut,
    OutputOut,
    SeriesOut,
    StudyDetailOut,
    StudyOut,
    StudyPage,
)

if TYPE_CHECKING:
    from node.app import Node


def _session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.node.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _study_out(study: Study) -> StudyOut:
    return StudyOut(
        study_uid=study.study_uid,
        modalities=[m for m in study.modalities.split("\\") if m],
        state=study.state,
        series_count=study.series_count,
        instance_count=study.instance_count,
        byte_size=study.byte_size,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        completed_at=study.completed_at,
    )


def _series_out(series: Series) -> SeriesOut:
    data = series.model_dump()
    data["route_models"] = [m for m in series.route_models.split("\\") if m]
    return SeriesOut.model_validate(data)


def _job_out(job: Job, outputs: list[OutboxItem]) -> JobOut:
    result = json.loads(job.result) if job.result else {}
    return JobOut(
        id=job.id or 0,
        model_id=job.model_id,
        model_version=str(result.get("version", "")),
        rule=job.rule,
        level=job.level,
        series_uids=[u for u in job.series_uids.split("\\") if u],
        state=job.state,
        attempts=job.attempts,
        error=job.error,
        timings=json.loads(job.timings or "{}"),
        findings=[FindingOut.model_validate(f) for f in result.get("findings", [])],
        outputs=[OutputOut.model_validate(o, from_attributes=True) for o in outputs],
        created_at=job.created_at,
        updated_at=job.updated_at,
        finished_at=job.finished_at,
    )


def _study_jobs(db: Session, study_uid: str) -> list[JobOut]:
    jobs = repo.study_jobs(db, study_uid)
    outputs = repo.job_outbox(db, [j.id for j in jobs if j.id is not None])
    return [_job_out(j, [o for o in outputs if o.job_id == j.id]) for j in jobs]


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
            positives = [f"{f.label} {f.probability:.2f}" for f in j.findings if f.positive]
            parts.append(f"{j.model_id}: " + (", ".join(positives) if positives else "no finding"))
        return "; ".join(parts), "state-complete"
    if SeriesState.ROUTED in states:
        return "routed, waiting for the study", "state-receiving"
    notes = sorted({s.route_note for s in series if s.route_note})
    return "; ".join(notes) or "not routed", "note"


def _human_bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def create_web_app(node: "Node") -> FastAPI:
    """Build the FastAPI application for a node."""
    app = FastAPI(
        title="pacs-node", version=node.version, docs_url="/api/docs", openapi_url="/api/openapi.json"
    )
    app.state.node = node

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        """The process is alive."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    def readyz() -> JSONResponse:
        """The database answers and the DICOM port is listening."""
        checks = node.ready()
        ok = all(checks.values())
        body = Health(status="ready" if ok else "not ready", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/api/v1/studies", response_model=StudyPage, tags=["studies"])
    def list_studies(
        db: SessionDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
        state: Annotated[str | None, Query(pattern="^(receiving|complete)$")] = None,
    ) -> StudyPage:
        """Studies, most recently received first."""
        count = select(func.count()).select_from(Study)
        if state:
            count = count.where(Study.state == state)
        total = db.exec(count).one()
        items = [_study_out(s) for s in repo.list_studies(db, limit, offset, state)]
        return StudyPage(total=total, limit=limit, offset=offset, items=items)

    @app.get("/api/v1/studies/{study_uid}", response_model=StudyDetailOut, tags=["studies"])
    def get_study(study_uid: str, db: SessionDep) -> StudyDetailOut:
        """One study with its series."""
        study = db.get(Study, study_uid)
        if study is None:
            raise HTTPException(status_code=404, detail=f"no study with Study Instance UID {study_uid!r}")
        series = [_series_out(s) for s in repo.study_series(db, study_uid)]
        jobs = _study_jobs(db, study_uid)
        return StudyDetailOut(**_study_out(study).model_dump(), series=series, jobs=jobs)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def status_page(request: Request, db: SessionDep) -> HTMLResponse:
        """The status page: identity, today's totals, recent studies."""
        now = datetime.now(UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        settings = node.settings
        context = {
            "node": node,
            "hostname": socket.gethostname(),
            "dicom_port": node.scp.port,
            "web_port": request.url.port or settings.web.port,
            "uptime": str(timedelta(seconds=int(time.time() - node.started_at))),
            "ready": node.ready(),
            "today": repo.totals_since(db, midnight),
            "last_hour": repo.totals_since(db, now - timedelta(hours=1)),
            "states": repo.state_counts(db),
            "studies": repo.list_studies(db, limit=50),
            "human_bytes": _human_bytes,
            "analysis_of": lambda uid: analysis_summary(repo.study_series(db, uid), _study_jobs(db, uid)),
            "jobs": repo.job_state_counts(db),
            "outbox": repo.outbox_state_counts(db),
        }
        return TEMPLATES.TemplateResponse(request, "status.html", context)

    return app
