"""The "Analyse a file" page: upload a DICOM file, or a JPEG/PNG photograph with its kind chosen
(wrapped as DICOM by ``node.web.photo``), watch the analysis run (server-sent events), then read
the result: findings with probabilities and thresholds, the heatmaps, how it was routed, and a
printable classification report. The analysis is the inference API's (``node.web.infer.infer``,
the pipeline's own routing, preprocessing, model and heatmaps); it runs in a background thread
and its result is kept in memory for ``web.heatmap_ttl_s`` (bounded in count and bytes).

Refusals found before the analysis is under way (no file, too large, neither DICOM nor a JPEG/PNG
picture, unsupported transfer syntax or photometric, no route) answer the form again with the
message and a 4xx status; later ones (the model cannot take the image, it fails, too slow) end the
progress stream with ``failed`` and the result page answers with the refusal's status.

The study page's progress block reads ``/studies/{uid}/events``: the study's job states from the
database, one event per change, until no job is queued or running.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from sqlmodel import Session

from node.store import repo
from node.store.tables import JobState, SeriesState, Study
from node.web import auth, deps
from node.web.infer import InferRefused, ModelOutcome, PngStore, infer, png_bytes
from node.web.photo import KINDS, PhotoRefused, decode_photo, sniff, wrap_photo

if TYPE_CHECKING:
    from node.web.deps import WebNode

log = logging.getLogger(__name__)

UPLOAD_PATH = "/analyse"
#: What multipart adds around the uploaded file (boundaries, part headers, the other fields).
MULTIPART_SLACK = 64 * 1024
#: Analyses running at once; another upload is refused (503) until one ends.
MAX_RUNNING = 4
#: Results kept (the oldest finished ones are forgotten first) and their images' bytes in all.
MAX_KEPT = 64
MAX_KEPT_BYTES = 256 * 2**20
#: How long the upload's answer waits for the analysis to pass routing (refusals before it are
#: answered on the form); past it the browser goes to the progress page anyway.
ROUTE_WAIT_S = 15.0
#: Seconds between two looks at the analysis (or the study's jobs) while a stream is open.
POLL_S = 0.1
STUDY_POLL_S = 1.0
#: A study's progress stream closes after this; the browser's EventSource then reconnects.
STUDY_STREAM_S = 600.0
#: Steps of an analysis, in order; ``done`` or ``failed`` ends it.
STAGES = ("received", "decoded", "routed", "preprocessing", "inference", "heatmap", "done", "failed")
ACTIVE_JOB = frozenset({JobState.QUEUED, JobState.PREPROCESSING, JobState.INFERRING, JobState.WRITING})


@dataclass(frozen=True)
class Step:
    """One step of an analysis: its stage, one line for people, and seconds since the upload."""

    stage: str
    message: str
    at: float


@dataclass
class Analysis:
    """One upload's analysis: its steps so far, and its outcome once done or failed."""

    id: str
    upload: str  # what was uploaded, in words (never the file name: it may name the patient)
    kind: str
    images: PngStore
    started: float = field(default_factory=time.monotonic)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    steps: list[Step] = field(default_factory=list)
    state: str = "running"  # running | done | failed
    status: int = 200  # the HTTP status of a failed analysis
    error: str = ""
    rule: str = ""
    route: str = ""  # the routed step's message: rule, models and why
    outcomes: list[ModelOutcome] = field(default_factory=list)
    preview: str | None = None  # PNG id of the uploaded picture
    finished_at: datetime | None = None
    nbytes: int = 0
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def tell(self, stage: str, message: str) -> None:
        """Record a step (the analysis's progress callback)."""
        with self._changed:
            self.steps.append(Step(stage, message, round(time.monotonic() - self.started, 3)))
            if stage == "routed":
                self.route = message
            self._changed.notify_all()

    def finish(self, outcomes: list[ModelOutcome], rule: str) -> None:
        """The analysis is done: keep its outcome, tell ``done``."""
        self.outcomes, self.rule = outcomes, rule
        self.finished_at = datetime.now(UTC)
        positives = [
            f"{f.label} {f.probability:.2f}"
            for o in outcomes
            for f in o.result.findings
            if f.positive and not f.normal
        ]
        self.state = "done"
        summary = "positive: " + ", ".join(positives) if positives else "no finding above its threshold"
        self.tell("done", f"{len(outcomes)} model{'s' if len(outcomes) != 1 else ''}, {summary}")

    def fail(self, status: int, message: str) -> None:
        """The analysis was refused or failed: keep why, tell ``failed``."""
        self.status, self.error, self.state = status, message, "failed"
        self.finished_at = datetime.now(UTC)
        self.tell("failed", message)

    def wait_past_routing(self, timeout: float) -> None:
        """Block until the analysis is routed (or further), ended, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.state == "running" and not any(s.stage == "routed" for s in self.steps):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._changed.wait(left)


@dataclass
class AnalysisStore:
    """Analyses by random id, forgotten ``ttl_s`` after they started; beyond ``max_items`` or
    ``max_bytes`` (their images) the oldest finished ones go first. At most ``max_running`` run."""

    ttl_s: float
    max_items: int = MAX_KEPT
    max_bytes: int = MAX_KEPT_BYTES
    max_running: int = MAX_RUNNING
    _items: dict[str, Analysis] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def new(self, upload: str, kind: str) -> Analysis | None:
        """A new running analysis, or None when ``max_running`` already run."""
        with self._lock:
            self._forget()
            if sum(a.state == "running" for a in self._items.values()) >= self.max_running:
                return None
            key = secrets.token_urlsafe(16)
            analysis = Analysis(key, upload, kind, PngStore(ttl_s=self.ttl_s))
            self._items[key] = analysis
            self._forget()
            return analysis

    def get(self, key: str) -> Analysis | None:
        """The analysis, or None when unknown or forgotten."""
        with self._lock:
            self._forget()
            return self._items.get(key)

    def sized(self, analysis: Analysis, nbytes: int) -> None:
        """Count an analysis's image bytes against ``max_bytes``."""
        with self._lock:
            analysis.nbytes = nbytes
            self._forget()

    def _forget(self) -> None:
        now = time.monotonic()
        for key in [k for k, a in self._items.items() if a.started + self.ttl_s < now]:
            del self._items[key]
        finished = [k for k, a in self._items.items() if a.state != "running"]  # oldest first
        while finished and (
            len(self._items) > self.max_items or sum(a.nbytes for a in self._items.values()) > self.max_bytes
        ):
            del self._items[finished.pop(0)]


def upload_body_limit(node: WebNode) -> int:
    """The most bytes POST /analyse reads: web.max_upload_mb plus the multipart framing."""
    return int(node.settings.web.max_upload_mb * 2**20) + MULTIPART_SLACK


def _outcome_bytes(analysis: Analysis) -> int:
    keys = [key for o in analysis.outcomes for _, key in o.heatmaps]
    if analysis.preview:
        keys.append(analysis.preview)
    return sum(len(analysis.images.get(k) or b"") for k in keys)


def _run(node: WebNode, store: AnalysisStore, analysis: Analysis, data: bytes) -> None:
    """The analysis, in its own thread: the inference API's path with progress told."""
    deadline = time.monotonic() + node.settings.web.infer_timeout_s
    try:
        rule, outcomes = infer(node, data, analysis.images, deadline, progress=analysis.tell)
    except InferRefused as exc:
        analysis.fail(exc.status, exc.message)
    except Exception as exc:  # a fault of the node, not of the file: the page says so, the log has it
        log.exception("analysis %s failed", analysis.id)
        analysis.fail(500, f"the analysis failed inside the node ({type(exc).__name__}); see the node's log")
    else:
        analysis.finish(outcomes, rule)
    store.sized(analysis, _outcome_bytes(analysis))


def _kilobytes(n: int) -> str:
    return f"{n / 1000:.0f} kB" if n < 10**6 else f"{n / 10**6:.1f} MB"


def router(node: WebNode) -> APIRouter:  # noqa: C901 (one function per page)
    """The "Analyse a file" pages and the progress streams (analysis and study)."""
    pages = APIRouter(include_in_schema=False)
    store = AnalysisStore(ttl_s=node.settings.web.heatmap_ttl_s)
    read = [Depends(auth.page_read)]

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        max_bytes = int(node.settings.web.max_upload_mb * 2**20)
        return deps.render(request, name, status_code, kinds=KINDS, max_bytes=max_bytes, **context)

    def refuse(request: Request, status: int, message: str, kind: str = "") -> HTMLResponse:
        log.info("analyse upload refused (%d): %s", status, message)
        return render(request, "analyse.html", status_code=status, error=message, chosen=kind)

    @pages.get(UPLOAD_PATH, response_class=HTMLResponse, dependencies=read)
    def form(request: Request) -> HTMLResponse:
        """The upload form."""
        return render(request, "analyse.html", error="", chosen="")

    @pages.post(UPLOAD_PATH, dependencies=read, max_body_size=upload_body_limit(node))
    async def submit(request: Request) -> Response:  # noqa: C901 (one refusal per check)
        """Check the upload, wrap a photograph as DICOM, start the analysis, go to its page."""
        limit = int(node.settings.web.max_upload_mb * 2**20)
        form = await request.form(max_files=1, max_fields=10)
        try:
            csrf, kind, eye = (str(form.get(k) or "") for k in ("csrf", "kind", "eye"))
            if not auth.csrf_ok(request, csrf):
                return refuse(
                    request,
                    403,
                    "the form had expired (its CSRF token does not match): reload it and upload again",
                )
            upload = form.get("file")
            if upload is None or isinstance(upload, str) or not upload.filename:
                return refuse(
                    request, 400, "choose a file to upload (a DICOM file, or a JPEG or PNG picture)", kind
                )
            data = await upload.read(limit + 1)
        finally:
            await form.close()
        if len(data) > limit:
            return refuse(
                request,
                413,
                f"the file is larger than the limit of {node.settings.web.max_upload_mb:g} MB "
                "(web.max_upload_mb)",
                kind,
            )
        if not data:
            return refuse(request, 400, "the file is empty", kind)
        if kind and kind != "dicom" and kind not in KINDS:
            return refuse(request, 400, f"unknown kind of picture {kind[:40]!r}", "")
        what = sniff(data)
        preview: bytes | None = None
        if what == "dicom":
            description = f"DICOM file, {_kilobytes(len(data))}"
        elif what in ("jpeg", "png"):
            if kind in ("", "dicom"):
                return refuse(
                    request,
                    400,
                    f"this is a {what.upper()} picture, not a DICOM file: choose what it shows "
                    "(fundus, dermoscopy, microscopy, ...) so that it can be wrapped as DICOM",
                    kind,
                )
            photo = KINDS[kind]
            budget = node.settings.limits.budget()
            try:
                pixels, fmt = await asyncio.to_thread(
                    decode_photo, data, budget.max_frame_pixels, photo.colour
                )
                data = await asyncio.to_thread(
                    wrap_photo, pixels, photo, node.settings.outputs.uid_root, fmt, len(data), eye or "R"
                )
                preview = await asyncio.to_thread(png_bytes, pixels)
            except PhotoRefused as exc:
                return refuse(request, exc.status, exc.message, kind)
            description = (
                f"{fmt} picture, {pixels.shape[1]}x{pixels.shape[0]}, {_kilobytes(len(data))} as DICOM: "
                f"wrapped as {photo.label}"
            )
        else:
            return refuse(
                request,
                400,
                "not a DICOM file (no DICM preamble at byte 128) and not a JPEG or PNG picture",
                kind,
            )
        analysis = store.new(description, kind if what != "dicom" else "dicom")
        if analysis is None:
            return refuse(
                request, 503, f"{MAX_RUNNING} analyses are running already: try again in a moment", kind
            )
        if preview is not None:
            analysis.preview = analysis.images.put(preview)
        analysis.tell("received", description)
        threading.Thread(
            target=_run, args=(node, store, analysis, data), name=f"analyse-{analysis.id[:6]}", daemon=True
        ).start()
        await asyncio.to_thread(analysis.wait_past_routing, ROUTE_WAIT_S)
        if analysis.state == "failed" and not any(s.stage == "routed" for s in analysis.steps):
            return refuse(request, analysis.status, analysis.error, kind)
        return RedirectResponse(f"{UPLOAD_PATH}/{analysis.id}", status_code=303)

    def _analysis(key: str) -> Analysis:
        """The analysis ``key`` (a dependency: a 404 before any streaming starts)."""
        analysis = store.get(key)
        if analysis is None:
            ttl = node.settings.web.heatmap_ttl_s
            raise HTTPException(404, f"no such analysis (results are kept for {ttl:g} s, in memory only)")
        return analysis

    def _study(study_uid: str) -> str:
        """The Study Instance UID of a study the node holds (a dependency, as ``_analysis``)."""
        with Session(node.engine) as db:
            if db.get(Study, study_uid) is None:
                raise HTTPException(404, f"no study with Study Instance UID {study_uid!r}")
        return study_uid

    @pages.get(UPLOAD_PATH + "/{key}", response_class=HTMLResponse, dependencies=read)
    def analysis_page(request: Request, key: str) -> HTMLResponse:
        """Progress while it runs; then the result and the report, or why it failed."""
        analysis = _analysis(key)
        if analysis.state == "running":
            return render(request, "analyse_progress.html", analysis=analysis)
        return render(
            request,
            "analyse_result.html",
            status_code=200 if analysis.state == "done" else analysis.status,
            analysis=analysis,
            models={mid: m.manifest for mid, m in node.models.registry.models.items()},
        )

    @pages.get(UPLOAD_PATH + "/{key}/images/{image}.png", dependencies=read)
    def analysis_image(key: str, image: str) -> Response:
        """A heatmap overlay (or the uploaded picture) of an analysis."""
        png = _analysis(key).images.get(image)
        if png is None:
            raise HTTPException(404, "no such image")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})

    @pages.get(
        UPLOAD_PATH + "/{key}/events",
        response_class=EventSourceResponse,
        dependencies=[Depends(auth.require_read)],
    )
    async def analysis_events(
        request: Request, analysis: Analysis = Depends(_analysis)
    ) -> AsyncIterator[ServerSentEvent]:
        """The analysis's steps as server-sent events (event = stage, data = {stage, message, at});
        the stream ends after ``done`` or ``failed``. Last-Event-ID resumes after that step."""
        last = request.headers.get("last-event-id", "")
        sent = int(last) + 1 if last.isdigit() else 0
        give_up = time.monotonic() + node.settings.web.infer_timeout_s + 60
        while time.monotonic() < give_up:
            steps = analysis.steps[sent:]
            for step in steps:
                yield ServerSentEvent(
                    event=step.stage,
                    id=str(sent),
                    data={"stage": step.stage, "message": step.message, "at": step.at},
                )
                sent += 1
                if step.stage in ("done", "failed"):
                    return
            if await request.is_disconnected():
                return
            await asyncio.sleep(POLL_S)

    @pages.get(
        "/studies/{study_uid}/events",
        response_class=EventSourceResponse,
        dependencies=[Depends(auth.require_read)],
    )
    async def study_events(
        request: Request, study_uid: str = Depends(_study)
    ) -> AsyncIterator[ServerSentEvent]:
        """The study's job states from the database as server-sent events: ``job`` (data: id,
        model, state, error) for each job at first and at each change, then ``idle`` once no job
        is queued or running and no series still arriving (the stream then ends)."""
        seen: dict[int, tuple[str, str]] = {}
        give_up = time.monotonic() + STUDY_STREAM_S
        while time.monotonic() < give_up:
            jobs, waiting = await asyncio.to_thread(_study_state, node, study_uid)
            for job in jobs:
                state = (job["state"], job["error"])
                if seen.get(job["id"]) != state:
                    seen[job["id"]] = state
                    yield ServerSentEvent(event="job", data=job)
            if not waiting and not any(j["state"] in ACTIVE_JOB for j in jobs):
                yield ServerSentEvent(event="idle", data={"jobs": len(jobs)})
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(STUDY_POLL_S)

    return pages


def _study_state(node: WebNode, study_uid: str) -> tuple[list[dict[str, Any]], bool]:
    """The study's jobs (id, model, state, error, updated) and whether series are still arriving
    or waiting to be routed."""
    with Session(node.engine) as db:
        jobs = [
            {
                "id": j.id,
                "model": j.model_id,
                "state": j.state,
                "error": j.error,
                "updated": j.updated_at.isoformat() if j.updated_at else "",
            }
            for j in repo.study_jobs(db, study_uid)
        ]
        waiting = any(
            s.state in (SeriesState.RECEIVING, SeriesState.COMPLETE) for s in repo.study_series(db, study_uid)
        )
    return jobs, waiting
