"""Response models of the JSON API (no patient identifiers anywhere)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class SeriesOut(BaseModel):
    """One series of a study."""

    series_uid: str
    modality: str
    body_part: str
    series_number: int | None
    series_description: str
    state: str
    instance_count: int
    byte_size: int
    calling_aet: str
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


class StudyOut(BaseModel):
    """A study as received so far."""

    study_uid: str
    modalities: list[str]
    state: str
    series_count: int
    instance_count: int
    byte_size: int
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None


class StudyDetailOut(StudyOut):
    """A study with its series."""

    series: list[SeriesOut]


class StudyPage(BaseModel):
    """A page of studies, most recent first."""

    total: int
    limit: int
    offset: int
    items: list[StudyOut]


class Health(BaseModel):
    """Liveness or readiness with the state of each check."""

    status: str
    checks: dict[str, bool] = {}
