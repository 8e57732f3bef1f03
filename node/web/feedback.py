"""Radiologist feedback per finding (issue 18): the JSON API, the study page's form, the export.

A radiologist (the read role is enough) marks each finding of a finished job *agree*, *disagree*
(with the correct label: ``positive``/``negative`` for that finding, or, for a multi-class model,
the label of the class it really is) or *unsure*, with an optional comment:

- ``POST /api/v1/jobs/{id}/feedback`` (JSON ``{"label", "verdict", "correct_label", "comment"}``);
- ``POST /jobs/{id}/feedback``: the study page's form (sign-in cookie and CSRF token, like retry);
- ``GET /api/v1/feedback``: the verdicts, filtered (model, version, label, verdict, user, study,
  job, since/until) and paged, as JSON or CSV (``format=csv``, or ``/api/v1/feedback.csv``: every
  matching row unless ``limit`` is given); ``GET /api/v1/feedback/summary``: the agreement figures
  per model, version and finding (:func:`node.evaluate.feedback.agreement_figures`).

Each verdict is stored with what the model said (version, threshold in force, score, decision) and
who said it (the token's name). Re-marking a finding replaces the user's verdict on it; the
replaced row is kept (``superseded_at``) and listed with ``history=true``. Every stored verdict is
audited (ATNA Procedure Record, :meth:`node.audit.events.AuditTrail.feedback_given`).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session

from node.evaluate.feedback import ABSENT, PRESENT, agreement_figures, reference
from node.store import feedback as store
from node.store.feedback import FeedbackFilter
from node.store.tables import Feedback, Job, JobState, utcnow
from node.types import JobResult
from node.web import auth

if TYPE_CHECKING:
    from node.web.deps import WebNode

log = logging.getLogger(__name__)

MAX_ID = 2**31 - 1  # the id columns are SQL INTEGER (32 bits on PostgreSQL)
MAX_INT = 2**63 - 1
FORM_BODY_LIMIT = 64 * 1024
MAX_COMMENT = 2000
MAX_PAGE = 1000
JobId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="a job's id")]
Limit = Annotated[
    int | None, Query(ge=1, le=MAX_INT, description=f"JSON: default 100, at most {MAX_PAGE}; CSV: all")
]
Offset = Annotated[int, Query(ge=0, le=MAX_INT)]


def _session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.node.engine) as db:
        yield db


SessionDep = Annotated[Session, Depends(_session)]
VerdictName = Literal["agree", "disagree", "unsure"]
CSV_COLUMNS = (
    "id",
    "created_at",
    "superseded_at",
    "job_id",
    "study_uid",
    "model_id",
    "model_version",
    "label",
    "threshold",
    "score",
    "positive",
    "verdict",
    "correct_label",
    "reference",
    "comment",
    "user_name",
)


# --------------------------------------------------------------------------------------- schemas
class FeedbackIn(BaseModel):
    """A verdict on one finding of a finished job."""

    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=64, description="the finding (a label of the job's model)")
    verdict: VerdictName
    correct_label: str | None = Field(
        None,
        max_length=64,
        description="disagree only: positive or negative (default: the opposite of the model's "
        "decision), or for a multi-class model the label of the class the image shows",
    )
    comment: str = Field("", max_length=MAX_COMMENT)


class FeedbackOut(BaseModel):
    """A stored verdict, with what the model said and the reference label it gives."""

    id: int
    job_id: int
    study_uid: str
    label: str
    model_id: str
    model_version: str
    threshold: float | None = Field(description="the threshold in force; None: not known")
    score: float
    positive: bool = Field(description="the model's decision")
    verdict: VerdictName
    correct_label: str | None
    reference: bool | None = Field(description="the reference label: present, absent, None (unsure)")
    comment: str
    user_name: str
    created_at: datetime
    superseded_at: datetime | None = Field(description="set when the user re-marked the finding")


class FeedbackStored(FeedbackOut):
    """The answer to a POST."""

    replaced: bool = Field(description="true when it replaced the user's previous verdict on the finding")


class FeedbackPage(BaseModel):
    """A page of verdicts, oldest first."""

    total: int
    limit: int | None
    offset: int
    items: list[FeedbackOut]


class AgreementOut(BaseModel):
    """The agreement figures of one model version's finding."""

    model_config = ConfigDict(extra="allow")

    model_id: str
    model_version: str
    label: str
    ratings: int
    agree: int
    disagree: int
    unsure: int
    agreement_rate: float | None
    model_positive: int
    reference_positive: int
    ppv: float | None
    npv: float | None
    sensitivity: float | None
    specificity: float | None


class FeedbackSummary(BaseModel):
    """Agreement figures per model, version and finding of the matching current verdicts."""

    ratings: int
    figures: list[AgreementOut]


# --------------------------------------------------------------------------------- job findings
@dataclass(frozen=True)
class FindingView:
    """What a verdict needs of one finding of a job's recorded result."""

    label: str
    probability: float
    positive: bool
    normal: bool
    threshold: float | None


@dataclass(frozen=True)
class JobFindings:
    """A finished job's model, version and findings, read from its recorded result."""

    job_id: int
    study_uid: str
    model_id: str
    model_version: str
    multi_class: bool
    findings: list[FindingView]

    def finding(self, label: str) -> FindingView | None:
        """The finding named ``label``, or None."""
        return next((f for f in self.findings if f.label == label), None)


def job_findings(node: WebNode, job: Job) -> JobFindings:
    """The findings of ``job``'s recorded result (the one place feedback reads a job's result).
    The threshold: the one the result recorded, else the loaded model's when it is the same
    version, else None (not known)."""
    result = JobResult.model_validate_json(job.result) if job.result else JobResult()
    loaded = node.models.registry.models.get(job.model_id)
    manifest = loaded.manifest if loaded is not None else None
    same_version = manifest is not None and manifest.version == result.version
    thresholds = (
        {lb.name: lb.threshold for lb in manifest.labels} if manifest is not None and same_version else {}
    )
    views = []
    for f in result.findings:
        threshold = f.threshold if f.threshold is not None else thresholds.get(f.label)
        views.append(FindingView(f.label, f.probability, f.positive, f.normal, threshold))
    multi_class = manifest.kind == "multi_class" if manifest is not None else any(v.normal for v in views)
    return JobFindings(job.id or 0, job.study_uid, job.model_id, result.version, multi_class, views)


def _out(row: Feedback) -> FeedbackOut:
    return FeedbackOut(
        **row.model_dump(exclude={"verdict"}),
        verdict=row.verdict,
        reference=reference(row.verdict, row.positive, row.correct_label, row.label),
    )


def _correct_label(given: FeedbackIn, job: JobFindings, finding: FindingView) -> str | None:
    """The correct label to store (``positive``, ``negative`` or a class's label); 422 naming
    what is wrong."""
    raw = (given.correct_label or "").strip()
    if given.verdict != "disagree":
        if raw:
            raise HTTPException(
                422, f"correct_label is only for a disagree verdict (this one is {given.verdict})"
            )
        return None
    if not raw:
        return ABSENT if finding.positive else PRESENT
    others = [f.label for f in job.findings if f.label != finding.label]
    if raw == finding.label:
        raw = PRESENT
    if raw not in (PRESENT, ABSENT) and raw not in others:
        choices = [PRESENT, ABSENT, *(others if job.multi_class else [])]
        raise HTTPException(
            422,
            f"correct_label {raw!r} is not a label of job {job.job_id} (model {job.model_id}): "
            f"one of {', '.join(choices)}",
        )
    if raw in others and not job.multi_class:
        raise HTTPException(
            422,
            f"model {job.model_id} is multi-label: each finding is judged on its own; correct_label "
            f"is {PRESENT} or {ABSENT}",
        )
    if reference("disagree", finding.positive, raw, finding.label) == finding.positive:
        called = "called" if finding.positive else "did not call"
        wanted = (
            f"{ABSENT} (or another class)"
            if finding.positive and job.multi_class
            else (ABSENT if finding.positive else PRESENT)
        )
        raise HTTPException(
            422,
            f"disagreeing: the model {called} {finding.label}, so correct_label {raw!r} agrees with it; "
            f"the correct label is {wanted}",
        )
    return raw


def give_feedback(
    node: WebNode, db: Session, job_id: int, given: FeedbackIn, user: str, address: str
) -> FeedbackStored:
    """Check and store one verdict (4xx naming what is wrong), audit it; the stored row."""
    job = db.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"no job with id {job_id}")
    if job.state != JobState.DONE:
        raise HTTPException(
            409, f"job {job_id} is {job.state}, not done: feedback is for a finished job's findings"
        )
    findings = job_findings(node, job)
    if not findings.findings:
        raise HTTPException(409, f"job {job_id} (model {job.model_id}) recorded no findings")
    finding = findings.finding(given.label)
    if finding is None:
        raise HTTPException(
            422,
            f"job {job_id} (model {job.model_id}) has no finding {given.label!r}; its findings: "
            + ", ".join(f.label for f in findings.findings),
        )
    correct = _correct_label(given, findings, finding)
    row = Feedback(
        job_id=job_id,
        study_uid=job.study_uid,
        label=finding.label,
        model_id=job.model_id,
        model_version=findings.model_version,
        threshold=finding.threshold,
        score=finding.probability,
        positive=finding.positive,
        verdict=given.verdict,
        correct_label=correct,
        comment=given.comment.strip(),
        user_name=user[:128],
        created_at=utcnow(),
    )
    stored, replaced = store.record(db, row)
    log.info(
        "feedback on job %d (%s %s) %s: %s%s", job_id, job.model_id, findings.model_version, finding.label,
        given.verdict, " (replaces the user's previous verdict)" if replaced else "",
    )  # fmt: skip
    sample = store.study_sample_path(db, job.study_uid)
    node.audit.feedback_given(
        user,
        address,
        job.study_uid,
        node.settings.storage.spool_dir / sample if sample else None,
        replaced,
    )
    return FeedbackStored(**_out(stored).model_dump(), replaced=replaced)


# ---------------------------------------------------------------------------------- study page
@dataclass
class FindingPanel:
    """One finding's row of the study page's feedback form."""

    finding: FindingView
    mine: Feedback | None
    others: dict[str, int] = field(default_factory=dict)  # verdict -> count (other users)


@dataclass
class JobPanel:
    """A finished job's findings with the signed-in user's verdicts."""

    job_id: int
    model_id: str
    model_version: str
    multi_class: bool
    labels: list[str]
    rows: list[FindingPanel]


def study_feedback(node: WebNode, db: Session, jobs: list[Job], request: Request) -> list[JobPanel]:
    """The study page's feedback panels: each done job's findings, the user's current verdict and
    the other users' counts."""
    principal = getattr(request.state, "principal", None)
    user = principal.name if principal is not None else ""
    done = [j for j in jobs if j.state == JobState.DONE and j.id is not None]
    given = store.current_for_jobs(db, [j.id for j in done if j.id is not None])
    panels = []
    for job in done:
        findings = job_findings(node, job)
        if not findings.findings:
            continue
        rows = []
        for f in findings.findings:
            mine = next(
                (g for g in given if g.job_id == job.id and g.label == f.label and g.user_name == user), None
            )
            others: dict[str, int] = {}
            for g in given:
                if g.job_id == job.id and g.label == f.label and g.user_name != user:
                    others[g.verdict] = others.get(g.verdict, 0) + 1
            rows.append(FindingPanel(f, mine, others))
        panels.append(
            JobPanel(
                findings.job_id,
                findings.model_id,
                findings.model_version,
                findings.multi_class,
                [f.label for f in findings.findings],
                rows,
            )
        )
    return panels


# ------------------------------------------------------------------------------------ listing
def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _filter(
    model: str | None = Query(None, max_length=64, description="model id"),
    version: str | None = Query(None, max_length=32, description="model version"),
    label: str | None = Query(None, max_length=64, description="finding label"),
    verdict: VerdictName | None = Query(None),
    user: str | None = Query(None, max_length=128, description="who gave it (token name)"),
    study_uid: str | None = Query(None, max_length=64),
    job_id: int | None = Query(None, ge=0, le=MAX_ID),
    since: datetime | None = Query(None, description="given at or after (ISO 8601; UTC when no zone)"),
    until: datetime | None = Query(None, description="given before (ISO 8601; UTC when no zone)"),
    history: bool = Query(False, description="also the verdicts a re-marking replaced"),
) -> FeedbackFilter:
    return FeedbackFilter(
        model_id=model,
        model_version=version,
        label=label,
        verdict=verdict,
        user_name=user,
        study_uid=study_uid,
        job_id=job_id,
        since=_utc(since),
        until=_utc(until),
        history=history,
    )


FilterDep = Annotated[FeedbackFilter, Depends(_filter)]


def _cell(value: Any) -> Any:
    """A CSV cell; text that a spreadsheet would run as a formula gets a leading apostrophe."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bool) or value is None:
        return "" if value is None else ("true" if value else "false")
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(items: list[FeedbackOut]) -> str:
    """The verdicts as CSV (RFC 4180, header row; booleans true/false, empty for None)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for item in items:
        data = item.model_dump()
        writer.writerow([_cell(data[c]) for c in CSV_COLUMNS])
    return buffer.getvalue()


def _csv_response(items: list[FeedbackOut]) -> Response:
    return Response(
        to_csv(items),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="feedback.csv"'},
    )


# ------------------------------------------------------------------------------------- routes
def router(node: WebNode) -> APIRouter:
    """The feedback routes: JSON API under /api/v1 (read role) and the study page's form."""
    routes = APIRouter(max_body_size=FORM_BODY_LIMIT)

    api = APIRouter(
        prefix="/api/v1",
        dependencies=[Depends(auth.require_read)],
        tags=["feedback"],
        responses={
            401: {"description": "no token, or a token that is not valid"},
            403: {"description": "the token's role is not enough"},
        },
    )

    @api.post(
        "/jobs/{job_id}/feedback",
        response_model=FeedbackStored,
        status_code=201,
        responses={
            404: {"description": "no such job"},
            409: {"description": "the job is not done (or recorded no findings)"},
            422: {"description": "unknown finding label, bad verdict or correct label"},
        },
    )
    def post_feedback(job_id: JobId, body: FeedbackIn, request: Request, db: SessionDep) -> FeedbackStored:
        """Mark one finding of a finished job agree / disagree (with the correct label) / unsure;
        replaces the caller's previous verdict on the finding (which is kept as history)."""
        principal: auth.Principal = request.state.principal
        return give_feedback(
            node, db, job_id, body, principal.name, request.client.host if request.client else ""
        )

    def listing(db: Session, f: FeedbackFilter, limit: int | None, offset: int, fmt: str) -> Any:
        rows = store.list_feedback(db, f, limit if limit is not None or fmt == "csv" else 100, offset)
        items = [_out(r) for r in rows]
        if fmt == "csv":
            return _csv_response(items)
        return FeedbackPage(total=store.count_feedback(db, f), limit=limit or 100, offset=offset, items=items)

    @api.get(
        "/feedback",
        response_model=FeedbackPage,
        responses={200: {"content": {"text/csv": {}}, "description": "JSON page, or CSV with format=csv"}},
    )
    def list_feedback(
        db: SessionDep,
        f: FilterDep,
        limit: Limit = None,
        offset: Offset = 0,
        format: Literal["json", "csv"] = "json",  # noqa: A002 (the query parameter's name)
    ) -> Any:
        """The verdicts, oldest first; current ones unless ``history``; CSV with ``format=csv``."""
        if format == "json" and limit is not None and limit > MAX_PAGE:
            raise HTTPException(422, f"limit is at most {MAX_PAGE} for JSON (format=csv exports every row)")
        return listing(db, f, limit, offset, format)

    @api.get("/feedback.csv", response_class=Response, responses={200: {"content": {"text/csv": {}}}})
    def export_csv(db: SessionDep, f: FilterDep, limit: Limit = None, offset: Offset = 0) -> Response:
        """The matching verdicts as CSV (every one unless ``limit``)."""
        return listing(db, f, limit, offset, "csv")

    @api.get("/feedback/summary", response_model=FeedbackSummary)
    def summary(db: SessionDep, f: FilterDep) -> FeedbackSummary:
        """Agreement figures (agreement rate, PPV, NPV, sensitivity, specificity against the
        feedback) per model, version and finding of the matching verdicts."""
        rows = store.list_feedback(db, f)
        return FeedbackSummary(
            ratings=len(rows), figures=[AgreementOut.model_validate(x) for x in agreement_figures(rows)]
        )

    pages = APIRouter(include_in_schema=False)

    @pages.post("/jobs/{job_id}/feedback", dependencies=[Depends(auth.page_read)])
    def feedback_form(
        request: Request,
        job_id: JobId,
        db: SessionDep,
        label: Annotated[str, Form(max_length=64)],
        verdict: Annotated[str, Form(max_length=16)],
        correct_label: Annotated[str, Form(max_length=64)] = "",
        comment: Annotated[str, Form(max_length=MAX_COMMENT)] = "",
        csrf: Annotated[str, Form()] = "",
    ) -> RedirectResponse:
        """The study page's feedback form: store the verdict, go back to the job on the page."""
        auth.check_csrf(request, csrf)
        if verdict not in ("agree", "disagree", "unsure"):
            raise HTTPException(422, f"verdict {verdict!r}: agree, disagree or unsure")
        try:
            given = FeedbackIn(
                label=label,
                verdict=verdict,
                correct_label=correct_label if verdict == "disagree" else None,
                comment=comment,
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise HTTPException(422, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
        principal: auth.Principal = request.state.principal
        stored = give_feedback(
            node, db, job_id, given, principal.name, request.client.host if request.client else ""
        )
        return RedirectResponse(f"/studies/{quote(stored.study_uid)}#feedback-{job_id}", status_code=303)

    routes.include_router(api)
    routes.include_router(pages)
    return routes
