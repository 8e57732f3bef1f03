"""FastAPI app: health probes, the JSON API under /api/v1, the inference API and the HTML pages.

The web layer reads the store; the retry buttons only update rows (the runner's requeue
functions put failed work back in the queue, and the runner's threads pick it up). The inference
API runs the pipeline's own analysis path (``node.web.infer``) on an uploaded file.

Authentication: see ``node.web.auth`` (bearer tokens by hash, read and admin roles; pages accept
the sign-in cookie set by /login; every form carries a CSRF token). /healthz and /readyz are always
open. Host and Origin checks, the body limits and the security headers: ``node.web.guard``.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from fastapi_offline import FastAPIOffline
from sqlalchemy import func
from sqlmodel import Session, select

from node.monitoring.record import shadow_jobs
from node.store import repo
from node.store.repo import requeue_failed_jobs, requeue_failed_outputs
from node.store.tables import Job, JobState, OutboxItem, Series, SeriesState, Study, utcnow
from node.types import JobResult, OutputKind
from node.web import analyse, auth, dicomweb, monitoring
from node.web.feedback import router as feedback_router
from node.web.feedback import study_feedback
from node.web.guard import WebGuard
from node.web.health import database_writable
from node.web.infer import InferRefused, PngStore, dicom_to_png, infer
from node.web.schemas import (
    DuplicateOut,
    ErrorOut,
    FindingOut,
    Health,
    HeatmapLink,
    InferModelOut,
    InferOut,
    JobListItemOut,
    JobOut,
    JobPage,
    LabelOut,
    ModelOut,
    ModelsOut,
    OutboxItemOut,
    OutboxPage,
    OutputOut,
    RetryOut,
    SeriesOut,
    StatsOut,
    StudyDetailOut,
    StudyOut,
    StudyPage,
    Totals,
    WorklistItemOut,
    WorklistOut,
)

if TYPE_CHECKING:
    from node.app import Node


def _session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.node.engine) as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
STATIC = Path(__file__).parent / "static"
#: The largest row id and offset the database takes (SQLite and PostgreSQL integers are 64-bit).
MAX_INT = 2**63 - 1
#: the id columns are SQL INTEGER: 32 bits on PostgreSQL (a larger id is a 422, not a database error)
MAX_ID = 2**31 - 1
JobId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="a job's id")]
Offset = Annotated[int, Query(ge=0, le=MAX_INT)]
#: Largest body of a request other than the upload (the forms: sign-in, retry). Set on the routers,
#: not the app: an app-wide limit would replace the guard's own 413 answers with a plain-text one.
FORM_BODY_LIMIT = 64 * 1024
#: What multipart adds around the uploaded file (boundaries, part headers).
MULTIPART_SLACK = 64 * 1024
INFER_PATH = "/api/v1/infer"
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no token, or a token that is not valid"},
    403: {"model": ErrorOut, "description": "the token's role is not enough"},
}


def _study_out(study: Study, priority: str) -> StudyOut:
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


def _studies_out(db: Session, studies: list[Study]) -> list[StudyOut]:
    priorities = repo.display_priorities(db, studies)
    return [_study_out(s, priorities[s.study_uid]) for s in studies]


def _series_out(series: Series) -> SeriesOut:
    return SeriesOut.model_validate(series.model_dump())


def _job_out(job: Job, outputs: list[OutboxItem], shadow_runs: set[int]) -> JobOut:
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


def _jobs_out(db: Session, jobs: list[Job]) -> list[JobOut]:
    ids = [j.id for j in jobs if j.id is not None]
    outputs = repo.job_outbox(db, ids)
    shadow_runs = shadow_jobs(db, ids)  # results from before JobResult.shadow was recorded
    return [_job_out(j, [o for o in outputs if o.job_id == j.id], shadow_runs) for j in jobs]


def _study_jobs(db: Session, study_uid: str) -> list[JobOut]:
    return _jobs_out(db, repo.study_jobs(db, study_uid))


def _sc_outputs(job: Job) -> list[str]:
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


def _human_bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


@functools.lru_cache(maxsize=1)
def gpu_description() -> str:
    """GPU name and memory from nvidia-smi (once per process); empty when there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    query = ["--query-gpu=name,memory.total", "--format=csv,noheader"]
    try:
        out = subprocess.run([smi, *query], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return "; ".join(line.strip() for line in out.stdout.splitlines() if line.strip())


def _totals(db: Session, since: datetime) -> Totals:
    t = repo.totals_since(db, since)
    return Totals(studies=t.studies, series=t.series, instances=t.instances, bytes=t.bytes)


def _models_out(node: Node) -> ModelsOut:
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


def _worklist(db: Session, limit: int) -> WorklistOut:
    rows = repo.worklist(db, limit)
    arrival = {
        s.study_uid: i + 1
        for i, s in enumerate(sorted((s for s, _ in rows), key=lambda s: s.first_received_at))
    }
    items = []
    for position, (study, priority) in enumerate(rows, start=1):
        findings = [
            f for j in _study_jobs(db, study.study_uid) for f in j.findings if f.triage and f.positive
        ]
        items.append(
            WorklistItemOut(
                position=position,
                arrival_position=arrival[study.study_uid],
                study=_study_out(study, priority),
                findings=sorted(findings, key=lambda f: -f.probability),
            )
        )
    return WorklistOut(items=items)


def _stats(node: Node, db: Session) -> StatsOut:
    now = datetime.now(UTC)
    studies = list(db.exec(select(Study)))
    priorities: dict[str, int] = {}
    for p in repo.display_priorities(db, studies).values():
        priorities[p] = priorities.get(p, 0) + 1
    return StatsOut(
        uptime_s=round(time.time() - node.started_at, 1),
        last_hour=_totals(db, now - timedelta(hours=1)),
        last_day=_totals(db, now - timedelta(days=1)),
        series_states=repo.state_counts(db),
        job_states=repo.job_state_counts(db),
        outbox_states=repo.outbox_state_counts(db),
        priorities=priorities,
    )


def _retry(db: Session, job_id: int | None) -> RetryOut:
    now = utcnow()
    jobs = requeue_failed_jobs(db, now, job_id)
    outputs = requeue_failed_outputs(db, now, job_id)
    db.commit()
    return RetryOut(jobs=jobs, outputs=outputs)


def _api(node: Node, heatmaps: PngStore) -> APIRouter:  # noqa: C901 (one function per endpoint)
    api = APIRouter(
        prefix="/api/v1",
        dependencies=[Depends(auth.require_read)],
        responses=ERRORS,
        max_body_size=FORM_BODY_LIMIT,
    )

    @api.get("/studies", response_model=StudyPage, tags=["studies"])
    def list_studies(
        db: SessionDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Offset = 0,
        state: Annotated[str | None, Query(pattern="^(receiving|complete)$")] = None,
    ) -> StudyPage:
        """Studies, most recently received first."""
        count = select(func.count()).select_from(Study)
        if state:
            count = count.where(Study.state == state)
        total = db.exec(count).one()
        items = _studies_out(db, repo.list_studies(db, limit, offset, state))
        return StudyPage(total=total, limit=limit, offset=offset, items=items)

    @api.get("/studies/{study_uid}", response_model=StudyDetailOut, tags=["studies"])
    def get_study(study_uid: str, db: SessionDep) -> StudyDetailOut:
        """One study with its series and jobs."""
        study = db.get(Study, study_uid)
        if study is None:
            raise HTTPException(status_code=404, detail=f"no study with Study Instance UID {study_uid!r}")
        series = [_series_out(s) for s in repo.study_series(db, study_uid)]
        jobs = _study_jobs(db, study_uid)
        duplicates = [
            DuplicateOut.model_validate(d, from_attributes=True) for d in repo.study_duplicates(db, study_uid)
        ]
        return StudyDetailOut(
            **_studies_out(db, [study])[0].model_dump(), series=series, jobs=jobs, duplicates=duplicates
        )

    @api.get("/studies/{study_uid}/series", response_model=list[SeriesOut], tags=["studies"])
    def study_series(study_uid: str, db: SessionDep) -> list[SeriesOut]:
        """The series of one study."""
        if db.get(Study, study_uid) is None:
            raise HTTPException(status_code=404, detail=f"no study with Study Instance UID {study_uid!r}")
        return [_series_out(s) for s in repo.study_series(db, study_uid)]

    @api.get("/series/{series_uid}", response_model=SeriesOut, tags=["studies"])
    def get_series(series_uid: str, db: SessionDep) -> SeriesOut:
        """One series."""
        series = db.get(Series, series_uid)
        if series is None:
            raise HTTPException(status_code=404, detail=f"no series with Series Instance UID {series_uid!r}")
        return _series_out(series)

    @api.get("/jobs", response_model=JobPage, tags=["jobs"])
    def list_jobs(
        db: SessionDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Offset = 0,
        state: Annotated[str | None, Query(pattern="^[a-z]+$")] = None,
    ) -> JobPage:
        """Jobs, most recent first."""
        jobs = repo.list_jobs(db, limit, offset, state)
        items = [
            JobListItemOut(**out.model_dump(), study_uid=job.study_uid)
            for job, out in zip(jobs, _jobs_out(db, jobs), strict=True)
        ]
        return JobPage(limit=limit, offset=offset, items=items)

    @api.get("/jobs/{job_id}", response_model=JobListItemOut, tags=["jobs"])
    def get_job(job_id: JobId, db: SessionDep) -> JobListItemOut:
        """One job."""
        job = db.get(Job, job_id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")
        return JobListItemOut(**_jobs_out(db, [job])[0].model_dump(), study_uid=job.study_uid)

    @api.post(
        "/jobs/{job_id}/retry",
        response_model=RetryOut,
        tags=["jobs"],
        dependencies=[Depends(auth.require_admin)],
    )
    def retry_job(job_id: JobId, db: SessionDep) -> RetryOut:
        """Put a failed job (analysis) or its parked outputs (delivery) back in the queue (admin)."""
        if db.get(Job, job_id) is None:
            raise HTTPException(status_code=404, detail=f"no job {job_id}")
        return _retry(db, job_id)

    @api.post("/retry", response_model=RetryOut, tags=["jobs"], dependencies=[Depends(auth.require_admin)])
    def retry_all(db: SessionDep) -> RetryOut:
        """Put every failed job and parked output back in the queue (admin)."""
        return _retry(db, None)

    @api.get("/worklist", response_model=WorklistOut, tags=["worklist"])
    def worklist(db: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> WorklistOut:
        """The most recent studies in reading order: urgent first by suspicion, never any study
        below the position arrival order gives it."""
        return _worklist(db, limit)

    @api.get("/models", response_model=ModelsOut, tags=["models"])
    def models() -> ModelsOut:
        """Loaded models with versions, labels and triage flags; refused ones with why."""
        return _models_out(node)

    @api.get("/outbox", response_model=OutboxPage, tags=["outbox"])
    def outbox(
        db: SessionDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Offset = 0,
        state: Annotated[str | None, Query(pattern="^(pending|sent|failed)$")] = None,
    ) -> OutboxPage:
        """Outputs and their delivery, most recent first."""
        items = [
            OutboxItemOut.model_validate(i, from_attributes=True)
            for i in repo.list_outbox(db, limit, offset, state)
        ]
        return OutboxPage(counts=repo.outbox_state_counts(db), limit=limit, offset=offset, items=items)

    @api.get("/stats", response_model=StatsOut, tags=["stats"])
    def stats(db: SessionDep) -> StatsOut:
        """Counts: arrivals last hour/day, series/job/outbox states, priorities."""
        return _stats(node, db)

    @api.post(
        "/infer",
        response_model=InferOut,
        tags=["inference"],
        max_body_size=upload_body_limit(node),  # counted while reading: chunked bodies too
        responses={
            400: {"model": ErrorOut, "description": "not a DICOM file, or no file"},
            403: {"model": ErrorOut, "description": "the token's role is not enough, or another site's page"},
            413: {"model": ErrorOut, "description": "the file is larger than web.max_upload_mb"},
            415: {"model": ErrorOut, "description": "unsupported transfer syntax"},
            422: {"model": ErrorOut, "description": "no pixel data, or no route for the image"},
            504: {"model": ErrorOut, "description": "over web.infer_timeout_s"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            }
        },
    )
    async def infer_upload(request: Request) -> InferOut:
        """Run the pipeline's routing, preprocessing and model on one DICOM file (multipart field
        ``file``); findings with probabilities and links to heatmap PNGs (kept for a while)."""
        web = node.settings.web
        limit = int(web.max_upload_mb * 2**20)
        # A body over the limit never gets here whole: the guard refuses a declared Content-Length
        # above it, and FastAPI's max_body_size stops reading (413) once more arrived.
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "send the DICOM file as the multipart form field 'file'")
        data = await upload.read(limit + 1)
        await form.close()
        if len(data) > limit:
            raise HTTPException(413, f"the file is larger than the limit of {limit} bytes")
        deadline = time.monotonic() + web.infer_timeout_s
        loop = asyncio.get_running_loop()
        try:
            rule, outcomes = await asyncio.wait_for(
                loop.run_in_executor(None, infer, node, data, heatmaps, deadline), timeout=web.infer_timeout_s
            )
        except TimeoutError as exc:
            raise HTTPException(504, f"inference did not finish within {web.infer_timeout_s:g} s") from exc
        except InferRefused as exc:
            raise HTTPException(exc.status, exc.message) from exc
        results = [
            InferModelOut(
                model_id=o.result.algorithm.model_id,
                model_version=o.result.algorithm.version,
                findings=[
                    FindingOut(
                        label=f.label,
                        probability=round(f.probability, 4),
                        positive=f.positive,
                        triage=f.triage,
                        normal=f.normal,
                    )
                    for f in o.result.findings
                ],
                heatmaps=[
                    HeatmapLink(label=label, url=f"/api/v1/heatmaps/{key}.png") for label, key in o.heatmaps
                ],
            )
            for o in outcomes
        ]
        return InferOut(rule=rule, results=results)

    @api.get("/heatmaps/{key}.png", tags=["inference"], response_class=Response)
    def heatmap(key: str) -> Response:
        """A heatmap PNG made by POST /api/v1/infer (gone after web.heatmap_ttl_s)."""
        png = heatmaps.get(key)
        if png is None:
            raise HTTPException(404, "no such heatmap (they are kept for a short while only)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    return api


def _pages(node: Node) -> APIRouter:  # noqa: C901 (one function per page)
    pages = APIRouter(include_in_schema=False, max_body_size=FORM_BODY_LIMIT)
    read = [Depends(auth.page_read)]

    def render(request: Request, name: str, **context: Any) -> HTMLResponse:
        principal = getattr(request.state, "principal", None)
        context.update(
            node=node,
            principal=principal,
            auth_enabled=bool(node.settings.web.tokens),
            is_admin=principal is not None and principal.can("admin"),
            human_bytes=_human_bytes,
            csrf_token=auth.csrf_token(request),
        )
        response = TEMPLATES.TemplateResponse(request, name, context)
        auth.remember_csrf(request, response)
        return response

    @pages.get("/", response_class=HTMLResponse, dependencies=read)
    def overview(request: Request, db: SessionDep) -> HTMLResponse:
        """Overview: identity, health, models, queues, arrivals, recent errors and studies."""
        now = datetime.now(UTC)
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        studies = repo.list_studies(db, limit=20)
        priorities = repo.display_priorities(db, studies)
        providers = sorted({s.active_provider for s in node.models.sessions.values()})
        return render(
            request,
            "status.html",
            hostname=socket.gethostname(),
            dicom_port=node.scp.port,
            web_port=request.url.port or node.settings.web.port,
            uptime=str(timedelta(seconds=int(time.time() - node.started_at))),
            ready=node.ready(),
            providers=providers,
            gpu=gpu_description() if "CUDAExecutionProvider" in providers else "",
            models=_models_out(node),
            today=repo.totals_since(db, midnight),
            last_hour=repo.totals_since(db, now - timedelta(hours=1)),
            last_day=repo.totals_since(db, now - timedelta(days=1)),
            states=repo.state_counts(db),
            jobs=repo.job_state_counts(db),
            outbox=repo.outbox_state_counts(db),
            failed_jobs=repo.failed_jobs(db, 10),
            failed_outputs=repo.failed_outputs(db, 10),
            studies=studies,
            priorities=priorities,
            analysis_of=lambda uid: analysis_summary(repo.study_series(db, uid), _study_jobs(db, uid)),
        )

    @pages.get("/worklist", response_class=HTMLResponse, dependencies=read)
    def worklist_page(request: Request, db: SessionDep) -> HTMLResponse:
        """The triage worklist."""
        return render(request, "worklist.html", worklist=_worklist(db, 200))

    @pages.get("/studies", response_class=HTMLResponse, dependencies=read)
    def studies_page(request: Request, db: SessionDep, offset: Offset = 0) -> HTMLResponse:
        """Studies with state, modality, routed model, findings and priority."""
        studies = repo.list_studies(db, limit=50, offset=offset)
        rows = []
        for study in studies:
            series = repo.study_series(db, study.study_uid)
            jobs = _study_jobs(db, study.study_uid)
            rows.append((study, series, jobs, analysis_summary(series, jobs)))
        return render(
            request,
            "studies.html",
            rows=rows,
            priorities=repo.display_priorities(db, studies),
            offset=offset,
            total=db.exec(select(func.count()).select_from(Study)).one(),
        )

    @pages.get("/studies/{study_uid}", response_class=HTMLResponse, dependencies=read)
    def study_page(request: Request, study_uid: str, db: SessionDep) -> HTMLResponse:
        """One study: series, jobs with stage timings, outputs and where sent, heatmaps."""
        study = db.get(Study, study_uid)
        if study is None:
            raise HTTPException(status_code=404, detail=f"no study with Study Instance UID {study_uid!r}")
        series = repo.study_series(db, study_uid)
        raw_jobs = repo.study_jobs(db, study_uid)
        jobs = _jobs_out(db, raw_jobs)
        return render(
            request,
            "study.html",
            study=study,
            priority=repo.display_priorities(db, [study])[study_uid],
            series=series,
            jobs=jobs,
            heatmaps={j.id: _sc_outputs(j) for j in raw_jobs},
            analysis=analysis_summary(series, jobs),
            duplicates=repo.study_duplicates(db, study_uid),
            feedback=study_feedback(node, db, raw_jobs, request),
        )

    @pages.get("/jobs/{job_id}/heatmaps/{sop_uid}.png", dependencies=read)
    def output_png(job_id: JobId, sop_uid: str, db: SessionDep) -> Response:
        """A heatmap secondary capture the job wrote, rendered as PNG."""
        job = db.get(Job, job_id)
        if job is None or sop_uid not in _sc_outputs(job):
            raise HTTPException(404, "no such heatmap output")
        path = node.settings.storage.data_dir / "outbox" / str(job_id) / f"sc-{sop_uid}.dcm"
        if not path.is_file():
            raise HTTPException(404, "the heatmap output file is gone")
        return Response(
            dicom_to_png(path), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
        )

    @pages.post("/retry", dependencies=[Depends(auth.page_admin)])
    def retry_form(
        request: Request,
        db: SessionDep,
        job_id: Annotated[int | None, Form(ge=0, le=MAX_ID)] = None,
        back: Annotated[str, Form()] = "/",
        csrf: Annotated[str, Form()] = "",
    ) -> RedirectResponse:
        """The retry button (admin): failed jobs/outputs go back to the queue; the runner acts."""
        auth.check_csrf(request, csrf)
        _retry(db, job_id)
        return RedirectResponse(
            back if back.startswith("/") and not back.startswith("//") else "/", status_code=303
        )

    @pages.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/", error: str = "") -> HTMLResponse:
        """The sign-in form: paste a token; it is kept in an HttpOnly cookie."""
        return render(request, "login.html", next=next, error=error)

    @pages.post("/login")
    def login(
        request: Request,
        token: Annotated[str, Form()],
        next: Annotated[str, Form()] = "/",
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        """Check the form's CSRF token and the access token, set the cookie, go back to the page
        asked for. A form without a matching CSRF token (another site's, or from before the
        browser's cookies were cleared) goes back to the form (no login CSRF)."""
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        if not auth.csrf_ok(request, csrf):
            return RedirectResponse(f"/login?error=expired&next={quote(target)}", status_code=303)
        principal = auth.identify(node.settings.web, token) if node.settings.web.tokens else None
        address = request.client.host if request.client else ""
        node.audit.user_login(principal and principal.name, address, principal is not None, "token not valid")
        if principal is None:
            return RedirectResponse("/login?error=1", status_code=303)
        response = RedirectResponse(target, status_code=303)
        auth.set_login_cookie(request, response, token)
        return response

    @pages.post("/logout")
    def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
        """Forget the sign-in cookie."""
        auth.check_csrf(request, csrf)
        principal = auth.identify(node.settings.web, auth.presented_token(request))
        node.audit.user_logout(principal and principal.name, request.client.host if request.client else "")
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(auth.COOKIE)
        return response

    return pages


def upload_body_limit(node: Node) -> int:
    """The most bytes POST /api/v1/infer reads: web.max_upload_mb plus the multipart framing."""
    return int(node.settings.web.max_upload_mb * 2**20) + MULTIPART_SLACK


def create_web_app(node: Node) -> FastAPI:
    """Build the FastAPI application for a node: API docs (Swagger UI at /api/docs, ReDoc at
    /api/redoc) from a local package, never a CDN; bodies limited while they are read."""
    upload_limit = upload_body_limit(node)
    stow_limit = dicomweb.stow_body_limit(node)

    def body_limit(path: str) -> int:
        if path == INFER_PATH:
            return upload_limit
        if path == analyse.UPLOAD_PATH:
            return analyse.upload_body_limit(node)
        return stow_limit if dicomweb.is_stow_path(path) else FORM_BODY_LIMIT

    app = FastAPIOffline(
        title="pacs-node",
        version=node.version,
        docs_url="/api/docs",
        redoc_url="/api/redoc",
        static_url="/api/docs-static",
        openapi_url="/api/openapi.json",
    )
    app.state.node = node
    heatmaps = PngStore(ttl_s=node.settings.web.heatmap_ttl_s)
    app.add_middleware(
        WebGuard,
        web=node.settings.web,
        body_limit=body_limit,
        docs_paths=["/api/docs", "/api/redoc"],
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(auth.LoginRequired)
    async def _to_login(request: Request, exc: auth.LoginRequired) -> RedirectResponse:
        return RedirectResponse(f"/login?next={quote(exc.next_url)}", status_code=303)

    @app.exception_handler(OverflowError)
    async def _out_of_range(request: Request, exc: OverflowError) -> JSONResponse:
        # a number the database cannot hold that no parameter's bounds caught: the client's fault
        return JSONResponse({"detail": "a number in the request is out of range"}, status_code=422)

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        """The process is alive."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Health, tags=["health"], responses={503: {"model": Health}})
    def readyz() -> JSONResponse:
        """The database answers and takes a write, the DICOM port is listening and the spool has room."""
        checks = node.ready()
        checks["database_writable"] = database_writable(node.engine)
        ok = all(checks.values())
        body = Health(status="ready" if ok else "not ready", checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    app.include_router(_api(node, heatmaps))
    app.include_router(_pages(node))
    app.include_router(dicomweb.router(node))
    app.include_router(feedback_router(node))
    app.include_router(monitoring.router(node))
    app.include_router(analyse.router(node))
    from node.web.metrics import router as metrics_router

    app.include_router(metrics_router)
    return app
