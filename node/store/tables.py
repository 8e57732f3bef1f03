"""SQLModel tables: studies, series and instances as received, and the state used by assembly.

No patient identifiers are stored: the node files instances by UID and keeps what routing and the
status page need (modality, body part, series description, sizes, times, calling AE).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import BigInteger, Column, Index, UniqueConstraint, text
from sqlalchemy.types import DateTime, String, TypeDecorator
from sqlmodel import Field, SQLModel

from node.types import JobResult, JobTimings


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind of time the store holds)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        """Normalise to UTC before storing."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use node.store.tables.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        """Attach UTC to what SQLite returns naive."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(nullable: bool = False, index: bool = False) -> Column:
    return Column(UTCDateTime(), nullable=nullable, index=index)


def dump_list(values: Iterable[str], max_length: int | None = None) -> str:
    """``values`` as the JSON array a list column stores (``["CT","MR"]``, compact). With
    ``max_length`` (the column's), the items from the first that would not fit on are left out:
    an item is never cut."""
    kept: list[str] = []
    for value in values:
        if not isinstance(value, str):
            raise TypeError(f"a list column holds strings, not {type(value).__name__}")
        if max_length is not None and len(json.dumps([*kept, value], separators=(",", ":"))) > max_length:
            break
        kept.append(value)
    return json.dumps(kept, separators=(",", ":"))


def load_list(stored: str | None) -> list[str]:
    """The list a list column holds (an empty column: ``[]``)."""
    if not stored:
        return []
    values = json.loads(stored)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"a list column holds a JSON array of strings, not {stored[:40]!r}")
    return values


class StringList(TypeDecorator[list[str]]):
    """A list of strings (UIDs, model ids, modalities) kept as a JSON array in a VARCHAR column:
    the one place those lists are encoded and decoded (see :func:`dump_list`, :func:`load_list`).
    A plain string is refused rather than taken for a one-item list."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: Iterable[str] | None, dialect: object) -> str | None:
        """Encode a list (whole items within the column's length)."""
        if value is None:
            return None
        if isinstance(value, str):
            raise TypeError(f"a list column takes a list of strings, not the string {value[:40]!r}")
        # impl is the String class here; TypeDecorator makes it a String instance at run time
        return dump_list(value, self.impl.length)  # type: ignore[misc]

    def process_result_value(self, value: str | None, dialect: object) -> list[str]:
        """Decode to a list."""
        return load_list(value)


def _empty_list() -> list[str]:
    return []


def _list_column(length: int | None = None) -> Column:
    return Column(StringList(length), nullable=False, default=_empty_list)


class SeriesState(StrEnum):
    """Where a series is on its way through the node."""

    RECEIVING = "receiving"
    COMPLETE = "complete"  # quiet period over; awaiting routing ("complete, not yet routed")
    ROUTED = "routed"  # jobs created (or waiting for the study, for study-level models)
    NOT_ROUTED = "not routed"  # no rule matched; route_note says why


class StudyState(StrEnum):
    """Where a study is: receiving while any of its series is."""

    RECEIVING = "receiving"
    COMPLETE = "complete"


class Study(SQLModel, table=True):
    """A study as the node has received it so far."""

    study_uid: str = Field(primary_key=True, max_length=64)
    modalities: list[str] = Field(
        default_factory=list, sa_column=_list_column(64), description="distinct modalities"
    )
    state: str = Field(default=StudyState.RECEIVING, max_length=16, index=True)
    series_count: int = 0
    instance_count: int = 0
    byte_size: int = Field(default=0, sa_type=BigInteger)  # > 2 GiB studies (int4 on PostgreSQL)
    first_received_at: datetime = Field(sa_column=_ts(index=True))
    last_received_at: datetime = Field(sa_column=_ts())
    completed_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    # triage, set when a job of the study finishes (see repo.refresh_study_triage)
    priority: str | None = Field(default=None, max_length=16, description="urgent or routine; None: not yet")
    suspicion: float | None = Field(default=None, description="highest probability of a triage finding")
    triaged_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    # webhook notification of an urgent study: pending -> sent | failed (bounded attempts)
    notify_state: str | None = Field(default=None, max_length=8, index=True)
    notify_attempts: int = 0
    notify_next_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    notify_error: str = Field(default="", max_length=512)


class Priority(StrEnum):
    """Triage priority of a study, most urgent first."""

    URGENT = "urgent"
    ROUTINE = "routine"
    PENDING = "pending"  # routed, analysis not finished yet
    NOT_ANALYSED = "not analysed"  # no series was routed to a model
    FAILED = "failed"  # display only: the latest job of a model failed with no result


class Series(SQLModel, table=True):
    """A series, with the assembly state that decides when it is complete."""

    series_uid: str = Field(primary_key=True, max_length=64)
    study_uid: str = Field(foreign_key="study.study_uid", index=True, max_length=64)
    modality: str = Field(default="", max_length=16)
    body_part: str = Field(default="", max_length=64)
    series_number: int | None = None
    series_description: str = Field(default="", max_length=64)
    calling_aet: str = Field(default="", max_length=16)
    state: str = Field(default=SeriesState.RECEIVING, max_length=16)
    route_rule: str = Field(default="", max_length=64)
    route_models: list[str] = Field(
        default_factory=list, sa_column=_list_column(256), description="model ids routed to"
    )
    route_grouping: str = Field(default="", max_length=8)
    route_note: str = Field(default="", max_length=512)
    instance_count: int = 0
    byte_size: int = Field(default=0, sa_type=BigInteger)  # > 2 GiB studies (int4 on PostgreSQL)
    first_received_at: datetime = Field(sa_column=_ts())
    last_received_at: datetime = Field(sa_column=_ts())
    completed_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))

    __table_args__ = (Index("ix_series_state_last", "state", "last_received_at"),)


class Instance(SQLModel, table=True):
    """One received SOP instance, stored as received at ``path`` (relative to the data folder)."""

    sop_instance_uid: str = Field(primary_key=True, max_length=64)
    series_uid: str = Field(foreign_key="series.series_uid", index=True, max_length=64)
    study_uid: str = Field(index=True, max_length=64)
    sop_class_uid: str = Field(max_length=64)
    transfer_syntax_uid: str = Field(max_length=64)
    instance_number: int | None = None
    byte_size: int = Field(sa_type=BigInteger)
    path: str = Field(max_length=512)
    calling_aet: str = Field(default="", max_length=16)
    received_at: datetime = Field(sa_column=_ts(index=True))
    # hex SHA-256 of the file as written at ingest; None: received before hashes were recorded
    sha256: str | None = Field(default=None, max_length=64)
    # set when a later copy with different content replaced this one (storage.duplicates: keep_last)
    replaced_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    # when the file was put to storage.object_store; None: not yet (or no object store)
    uploaded_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class JobState(StrEnum):
    """Stages of a job; each change is a committed row."""

    QUEUED = "queued"
    PREPROCESSING = "preprocessing"
    INFERRING = "inferring"
    WRITING = "writing"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


ACTIVE_JOB_STATES = (JobState.PREPROCESSING, JobState.INFERRING, JobState.WRITING)


class Job(SQLModel, table=True):
    """One model run over one series (or study): a serialisable record any worker can pick up."""

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(unique=True, max_length=256, description="model|level|uid: created once")
    model_id: str = Field(max_length=64)
    rule: str = Field(default="", max_length=64)
    level: str = Field(max_length=8)
    study_uid: str = Field(index=True, max_length=64)
    series_uids: list[str] = Field(sa_column=_list_column(), description="Series Instance UIDs")
    state: str = Field(default=JobState.QUEUED, max_length=16, index=True)
    attempts: int = 0
    error: str = Field(default="", max_length=1024)
    timings: str = Field(default="{}", description="JSON: seconds per stage")
    result: str = Field(default="", description="JSON: model version and findings")
    created_at: datetime = Field(sa_column=_ts())
    updated_at: datetime = Field(sa_column=_ts())
    not_before: datetime = Field(sa_column=_ts(), description="earliest time to (re)try")
    started_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    finished_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))
    # the node running it (cluster.node_id) and until when its claim holds; the runner's heartbeat
    # renews the lease, and any node requeues a running job whose lease expired (the node died)
    owner: str = Field(default="", max_length=64)
    lease_until: datetime | None = Field(default=None, sa_column=_ts(nullable=True))

    def recorded_result(self) -> JobResult | None:
        """What its analysis recorded (:class:`node.types.JobResult`); None before it finished one."""
        return JobResult.model_validate_json(self.result) if self.result else None

    def stage_timings(self) -> dict[str, float]:
        """Seconds it spent in each stage (:class:`node.types.JobTimings`)."""
        return JobTimings.model_validate_json(self.timings or "{}").root


class OutboxState(StrEnum):
    """Delivery state of one output to one destination."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # parked after max attempts; a retry request puts it back to pending


class OutboxItem(SQLModel, table=True):
    """One output file waiting for (or done with) one destination."""

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", index=True)
    destination: str = Field(max_length=64)
    kind: str = Field(max_length=8, description="sr, sc or pm")
    sop_class_uid: str = Field(max_length=64)
    sop_instance_uid: str = Field(max_length=64)
    path: str = Field(max_length=512, description="relative to the data folder")
    sha256: str | None = Field(default=None, max_length=64, description="of the file as written")
    state: str = Field(default=OutboxState.PENDING, max_length=8, index=True)
    attempts: int = 0
    last_error: str = Field(default="", max_length=512)
    next_attempt_at: datetime = Field(sa_column=_ts())
    created_at: datetime = Field(sa_column=_ts())
    sent_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))

    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid", name="uq_outbox_destination_sop"),)


class DuplicateAction(StrEnum):
    """What the node did with a second copy of a SOP Instance UID it had stored already."""

    KEPT_FIRST = "kept first"  # answered success, the stored copy stays (storage.duplicates: keep_first)
    REPLACED = "replaced"  # the new copy replaced the stored one (keep_last, or the stored file was gone)
    REFUSED = "refused"  # answered failure 0x0111 Duplicate SOP Instance (refuse)


class DuplicateEvent(SQLModel, table=True):
    """A copy of a known SOP Instance UID that was not a plain resend of the same bytes: different
    content, or filed under another study or series. A resend of identical bytes is not recorded."""

    id: int | None = Field(default=None, primary_key=True)
    received_at: datetime = Field(sa_column=_ts(index=True))
    sop_instance_uid: str = Field(max_length=64, index=True)
    study_uid: str = Field(max_length=64, index=True, description="of the stored instance")
    series_uid: str = Field(max_length=64, description="of the stored instance")
    received_study_uid: str = Field(max_length=64, description="what the new copy said")
    received_series_uid: str = Field(max_length=64, description="what the new copy said")
    calling_aet: str = Field(default="", max_length=16)
    content_differs: bool
    conflict: str = Field(default="", max_length=128, description="e.g. 'study UID differs'; '' if none")
    action: str = Field(max_length=16)
    sha256: str | None = Field(default=None, max_length=64, description="of the new copy")
    byte_size: int = Field(default=0, sa_type=BigInteger)


class ClusterNode(SQLModel, table=True):
    """A node process sharing the database: what it runs, which data folder it sees, when it last
    renewed its leases (its heartbeat). Nodes sharing a database share one data folder (NAS) or
    one object store (storage.object_store); see docs/scale.md."""

    node_id: str = Field(primary_key=True, max_length=64)
    storage_id: str = Field(max_length=64, description="identity of the data folder or object store it uses")
    role: str = Field(default="all", max_length=16)
    hostname: str = Field(default="", max_length=255)
    version: str = Field(default="", max_length=32)
    started_at: datetime = Field(sa_column=_ts())
    heartbeat_at: datetime = Field(sa_column=_ts())
    stopped_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))


class ModelRun(SQLModel, table=True):
    """One analysed job as live monitoring sees it (issue 18): the model and version, whether it
    ran in shadow, its score and positive flag per label (JSON), and statistics of its input
    images (no patient data: sizes, spacing, stored-value percentiles, manufacturer and model)."""

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="job.id", unique=True)
    model_id: str = Field(max_length=64, index=True)
    model_version: str = Field(max_length=64)
    shadow: bool = False
    recorded_at: datetime = Field(sa_column=_ts(index=True))
    subject: str = Field(max_length=256, index=True, description="level|uid: pairs shadow and active runs")
    scores: str = Field(default="{}", description='JSON: {"label": [probability, positive]}')
    images: int = 0
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_mm: float | None = None
    p1: float | None = None
    p50: float | None = None
    p99: float | None = None
    manufacturer: str = Field(default="", max_length=64)
    manufacturer_model: str = Field(default="", max_length=64)


class Verdict(StrEnum):
    """What a radiologist said about one finding of a job."""

    AGREE = "agree"
    DISAGREE = "disagree"
    UNSURE = "unsure"


class Feedback(SQLModel, table=True):
    """One radiologist's verdict on one finding of a finished job (issue 18). The row keeps what
    the model said (score, decision, threshold, version), so it outlives the study's pruning (no
    foreign key to the job). Re-marking the same finding supersedes the user's previous row
    (``superseded_at`` set) instead of deleting it: the history stays, one row is current."""

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    study_uid: str = Field(max_length=64, index=True)
    label: str = Field(max_length=64, description="the finding (the model's label name)")
    model_id: str = Field(max_length=64, index=True)
    model_version: str = Field(default="", max_length=32)
    threshold: float | None = Field(default=None, description="the threshold in force; None: not known")
    score: float = Field(description="the model's probability for the finding")
    positive: bool = Field(description="the model's decision")
    verdict: str = Field(max_length=16, description="agree, disagree or unsure")
    correct_label: str | None = Field(
        default=None, max_length=64, description="disagree: positive, negative or another class's label"
    )
    comment: str = Field(default="", max_length=2000)
    user_name: str = Field(max_length=128, description="the token's name (API or signed-in page)")
    created_at: datetime = Field(sa_column=_ts(index=True))
    superseded_at: datetime | None = Field(default=None, sa_column=_ts(nullable=True))

    __table_args__ = (
        # one current verdict per user and finding (PostgreSQL and SQLite both have partial indexes)
        Index(
            "uq_feedback_current",
            "job_id",
            "label",
            "user_name",
            unique=True,
            sqlite_where=text("superseded_at IS NULL"),
            postgresql_where=text("superseded_at IS NULL"),
        ),
    )
