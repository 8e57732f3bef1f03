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
    route_rule: str
    route_models: list[str]
    route_grouping: str
    route_note: str
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


class FindingOut(BaseModel):
    """One label's aggregated result."""

    label: str
    probability: float
    positive: bool
    triage: bool


class OutputOut(BaseModel):
    """One output object of a job and its delivery to one destination."""

    kind: str
    sop_instance_uid: str
    destination: str
    state: str
    attempts: int
    last_error: str
    sent_at: datetime | None


class JobOut(BaseModel):
    """One model run over a series or study."""

    id: int
    model_id: str
    model_version: str
    rule: str
    level: str
    series_uids: list[str]
    state: str
    attempts: int
    error: str
    timings: dict[str, float]
    findings: list[FindingOut]
    outputs: list[OutputOut]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class StudyDetailOut(StudyOut):
    """A study with its series and jobs."""

    series: list[SeriesOut]
    jobs: list[JobOut]


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
