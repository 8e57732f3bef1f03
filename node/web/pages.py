"""The HTML pages: overview, worklist, studies, one study (with its heatmaps), the retry button,
sign-in and sign-out. They read the store through ``node.web.views``; forms carry a CSRF token."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func
from sqlmodel import select

from node.store import repo
from node.store.tables import Job, Study
from node.web import auth
from node.web.deps import FORM_BODY_LIMIT, MAX_ID, JobId, NodeDep, Offset, SessionDep, render
from node.web.feedback import study_feedback
from node.web.infer import dicom_to_png
from node.web.views import analysis_summary, jobs_out, models_out, retry, sc_outputs, study_rows, worklist

router = APIRouter(include_in_schema=False, max_body_size=FORM_BODY_LIMIT)
read = [Depends(auth.page_read)]


@router.get("/", response_class=HTMLResponse, dependencies=read)
def overview(request: Request, node: NodeDep, db: SessionDep) -> HTMLResponse:
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
        gpu=node.gpu_description() if "CUDAExecutionProvider" in providers else "",
        models=models_out(node),
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
        analyses={s.study_uid: summary for s, _, _, summary in study_rows(db, studies)},
    )


@router.get("/worklist", response_class=HTMLResponse, dependencies=read)
def worklist_page(request: Request, db: SessionDep) -> HTMLResponse:
    """The triage worklist."""
    return render(request, "worklist.html", worklist=worklist(db, 200))


@router.get("/studies", response_class=HTMLResponse, dependencies=read)
def studies_page(request: Request, db: SessionDep, offset: Offset = 0) -> HTMLResponse:
    """Studies with state, modality, routed model, findings and priority."""
    studies = repo.list_studies(db, limit=50, offset=offset)
    rows = study_rows(db, studies)
    return render(
        request,
        "studies.html",
        rows=rows,
        priorities=repo.display_priorities(db, studies),
        offset=offset,
        total=db.exec(select(func.count()).select_from(Study)).one(),
    )


@router.get("/studies/{study_uid}", response_class=HTMLResponse, dependencies=read)
def study_page(request: Request, study_uid: str, node: NodeDep, db: SessionDep) -> HTMLResponse:
    """One study: series, jobs with stage timings, outputs and where sent, heatmaps."""
    study = db.get(Study, study_uid)
    if study is None:
        raise HTTPException(status_code=404, detail=f"no study with Study Instance UID {study_uid!r}")
    series = repo.study_series(db, study_uid)
    raw_jobs = repo.study_jobs(db, study_uid)
    jobs = jobs_out(db, raw_jobs)
    return render(
        request,
        "study.html",
        study=study,
        priority=repo.display_priorities(db, [study])[study_uid],
        series=series,
        jobs=jobs,
        heatmaps={j.id: sc_outputs(j) for j in raw_jobs},
        analysis=analysis_summary(series, jobs),
        duplicates=repo.study_duplicates(db, study_uid),
        feedback=study_feedback(node, db, raw_jobs, request),
    )


@router.get("/jobs/{job_id}/heatmaps/{sop_uid}.png", dependencies=read)
def output_png(job_id: JobId, sop_uid: str, node: NodeDep, db: SessionDep) -> Response:
    """A heatmap secondary capture the job wrote, rendered as PNG."""
    job = db.get(Job, job_id)
    if job is None or sop_uid not in sc_outputs(job):
        raise HTTPException(404, "no such heatmap output")
    path = node.settings.storage.data_dir / "outbox" / str(job_id) / f"sc-{sop_uid}.dcm"
    if not path.is_file():
        raise HTTPException(404, "the heatmap output file is gone")
    return Response(
        dicom_to_png(path), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


@router.post("/retry", dependencies=[Depends(auth.page_admin)])
def retry_form(
    request: Request,
    db: SessionDep,
    job_id: Annotated[int | None, Form(ge=0, le=MAX_ID)] = None,
    back: Annotated[str, Form()] = "/",
    csrf: Annotated[str, Form()] = "",
) -> RedirectResponse:
    """The retry button (admin): failed jobs/outputs go back to the queue; the runner acts."""
    auth.check_csrf(request, csrf)
    retry(db, job_id)
    return RedirectResponse(
        back if back.startswith("/") and not back.startswith("//") else "/", status_code=303
    )


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/", error: str = "") -> HTMLResponse:
    """The sign-in form: paste a token; it is kept in an HttpOnly cookie."""
    return render(request, "login.html", next=next, error=error)


@router.post("/login")
def login(
    request: Request,
    node: NodeDep,
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
    name = principal.name if principal is not None else None
    node.audit.user_login(name, address, principal is not None, "token not valid")
    if principal is None:
        return RedirectResponse("/login?error=1", status_code=303)
    response = RedirectResponse(target, status_code=303)
    auth.set_login_cookie(request, response, token)
    return response


@router.post("/logout")
def logout(request: Request, node: NodeDep, csrf: Annotated[str, Form()] = "") -> Response:
    """Forget the sign-in cookie."""
    auth.check_csrf(request, csrf)
    principal = auth.identify(node.settings.web, auth.presented_token(request))
    name = principal.name if principal is not None else None
    node.audit.user_logout(name, request.client.host if request.client else "")
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(auth.COOKIE)
    return response
