"""GET /api/v1/studies, /studies/{uid}, /studies/{uid}/series and /series/{uid}."""

from __future__ import annotations

from typing import Annotated

from fastapi import HTTPException, Query
from sqlalchemy import func
from sqlmodel import select

from node.store import repo
from node.store.tables import Series, Study
from node.web.deps import Offset, SessionDep, api_router
from node.web.schemas import DuplicateOut, SeriesOut, StudyDetailOut, StudyPage
from node.web.views import series_out, studies_out, study_jobs

router = api_router()


def _no_study(study_uid: str) -> HTTPException:
    return HTTPException(status_code=404, detail=f"no study with Study Instance UID {study_uid!r}")


@router.get("/studies", response_model=StudyPage, tags=["studies"])
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
    items = studies_out(db, repo.list_studies(db, limit, offset, state))
    return StudyPage(total=total, limit=limit, offset=offset, items=items)


@router.get("/studies/{study_uid}", response_model=StudyDetailOut, tags=["studies"])
def get_study(study_uid: str, db: SessionDep) -> StudyDetailOut:
    """One study with its series and jobs."""
    study = db.get(Study, study_uid)
    if study is None:
        raise _no_study(study_uid)
    series = [series_out(s) for s in repo.study_series(db, study_uid)]
    jobs = study_jobs(db, study_uid)
    duplicates = [
        DuplicateOut.model_validate(d, from_attributes=True) for d in repo.study_duplicates(db, study_uid)
    ]
    return StudyDetailOut(
        **studies_out(db, [study])[0].model_dump(), series=series, jobs=jobs, duplicates=duplicates
    )


@router.get("/studies/{study_uid}/series", response_model=list[SeriesOut], tags=["studies"])
def study_series(study_uid: str, db: SessionDep) -> list[SeriesOut]:
    """The series of one study."""
    if db.get(Study, study_uid) is None:
        raise _no_study(study_uid)
    return [series_out(s) for s in repo.study_series(db, study_uid)]


@router.get("/series/{series_uid}", response_model=SeriesOut, tags=["studies"])
def get_series(series_uid: str, db: SessionDep) -> SeriesOut:
    """One series."""
    series = db.get(Series, series_uid)
    if series is None:
        raise HTTPException(status_code=404, detail=f"no series with Series Instance UID {series_uid!r}")
    return series_out(series)
