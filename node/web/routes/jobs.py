"""GET /api/v1/jobs, /jobs/{id}; POST /jobs/{id}/retry and /retry (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Query

from node.store import repo
from node.store.tables import Job
from node.web import auth
from node.web.deps import JobId, Offset, SessionDep, api_router
from node.web.schemas import JobListItemOut, JobPage, RetryOut
from node.web.views import jobs_out, retry

router = api_router()


@router.get("/jobs", response_model=JobPage, tags=["jobs"])
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
        for job, out in zip(jobs, jobs_out(db, jobs), strict=True)
    ]
    return JobPage(limit=limit, offset=offset, items=items)


@router.get("/jobs/{job_id}", response_model=JobListItemOut, tags=["jobs"])
def get_job(job_id: JobId, db: SessionDep) -> JobListItemOut:
    """One job."""
    job = db.get(Job, job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    return JobListItemOut(**jobs_out(db, [job])[0].model_dump(), study_uid=job.study_uid)


@router.post(
    "/jobs/{job_id}/retry", response_model=RetryOut, tags=["jobs"], dependencies=[Depends(auth.require_admin)]
)
def retry_job(job_id: JobId, db: SessionDep) -> RetryOut:
    """Put a failed job (analysis) or its parked outputs (delivery) back in the queue (admin)."""
    if db.get(Job, job_id) is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    return retry(db, job_id)


@router.post("/retry", response_model=RetryOut, tags=["jobs"], dependencies=[Depends(auth.require_admin)])
def retry_all(db: SessionDep) -> RetryOut:
    """Put every failed job and parked output back in the queue (admin)."""
    return retry(db, None)
