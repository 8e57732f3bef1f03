"""Response models of the JSON API (no patient identifiers anywhere)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


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
    priority: str = Field(
        description="urgent, routine, pending (being analysed), failed (the analysis failed: see the "
        "study's jobs for the error) or not analysed"
    )
    suspicion: float | None = Field(description="highest probability of a triage finding")


class FindingOut(BaseModel):
    """One label's aggregated result."""

    label: str
    probability: float
    positive: bool
    triage: bool
    normal: bool = Field(False, description="the model's no-finding class (never listed as a finding)")
    threshold: float | None = Field(
        None, description="the label's threshold in force when the job ran (None: not recorded)"
    )


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
    shadow: bool = Field(
        False, description="the job ran a shadow model (manifest mode: shadow): recorded, nothing sent"
    )
    images: int | None = Field(None, description="images the model analysed (None until it has run)")
    frames: int | None = Field(
        None,
        description="frames the model scored (every frame of a multi-frame image; None until it has run)",
    )
    timings: dict[str, float]
    findings: list[FindingOut]
    outputs: list[OutputOut]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class DuplicateOut(BaseModel):
    """A copy of a known SOP instance that was not a plain resend (storage.duplicates)."""

    received_at: datetime
    sop_instance_uid: str
    study_uid: str = Field(description="where the instance is stored")
    received_study_uid: str = Field(description="what the copy said")
    received_series_uid: str
    calling_aet: str
    content_differs: bool
    conflict: str = Field(description="e.g. 'study UID differs'; empty when none")
    action: str = Field(description="kept first, replaced or refused")


class StudyDetailOut(StudyOut):
    """A study with its series and jobs, and the duplicates received for it."""

    series: list[SeriesOut]
    jobs: list[JobOut]
    duplicates: list[DuplicateOut] = []


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


class WorklistItemOut(BaseModel):
    """One study on the triage worklist."""

    position: int = Field(description="1-based reading position")
    arrival_position: int = Field(description="1-based position in plain arrival order (never exceeded)")
    study: StudyOut
    findings: list[FindingOut] = Field(description="positive triage findings, most probable first")


class WorklistOut(BaseModel):
    """Studies in reading order: priority, then suspicion, then arrival, never below arrival order."""

    items: list[WorklistItemOut]


class JobListItemOut(JobOut):
    """A job with its study."""

    study_uid: str


class JobPage(BaseModel):
    """Jobs, most recent first."""

    limit: int
    offset: int
    items: list[JobListItemOut]


class OutboxItemOut(OutputOut):
    """One outbox row."""

    id: int
    job_id: int
    next_attempt_at: datetime
    created_at: datetime


class OutboxPage(BaseModel):
    """Outbox rows, most recent first, and the counts per state."""

    counts: dict[str, int]
    limit: int
    offset: int
    items: list[OutboxItemOut]


class LabelOut(BaseModel):
    """One label of a model."""

    name: str
    threshold: float
    triage: bool
    normal: bool


class ModelOut(BaseModel):
    """A loaded model."""

    id: str
    name: str
    version: str
    provider: str
    research_use_only: bool
    labels: list[LabelOut]


class ModelsOut(BaseModel):
    """Loaded models, and those refused at start-up with why."""

    loaded: list[ModelOut]
    refused: dict[str, str]


class Totals(BaseModel):
    """What arrived in a period."""

    studies: int
    series: int
    instances: int
    bytes: int


class StatsOut(BaseModel):
    """Counts for dashboards."""

    uptime_s: float
    last_hour: Totals
    last_day: Totals
    series_states: dict[str, int]
    job_states: dict[str, int]
    outbox_states: dict[str, int]
    priorities: dict[str, int]


class HeatmapLink(BaseModel):
    """A heatmap PNG of one label (kept for a short while)."""

    label: str
    url: str


class InferModelOut(BaseModel):
    """One model's result for the uploaded image."""

    model_id: str
    model_version: str
    findings: list[FindingOut]
    heatmaps: list[HeatmapLink]


class InferOut(BaseModel):
    """The result of POST /api/v1/infer."""

    rule: str
    results: list[InferModelOut]


class RetryOut(BaseModel):
    """What a retry request put back in the queue."""

    jobs: int
    outputs: int


class ErrorOut(BaseModel):
    """An error answer."""

    detail: str
