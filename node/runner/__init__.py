"""The runner: the only place that chains stages. A scheduler thread completes and routes series
and creates jobs; worker threads run jobs (decode/preprocess/infer/write); a sender thread drains
the outbox. All state is in the database, so a restart resumes where the last run stopped."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from sqlalchemy.engine import Engine
from sqlmodel import Session

from node.backoff import backoff_s
from node.errors import ConfigError, DecodeError, ManifestError, NodeError, PreprocessError
from node.inference.batcher import RunsBatches, SessionBatcher
from node.inference.gpu_prepare import GpuPreparer, make_gpu_preparer
from node.inference.prepared import Preparer
from node.inference.registry import LoadedModel, Registry
from node.inference.runtime import CUDA, ModelSession
from node.monitoring.record import record_run
from node.outputs import OutputError
from node.pipeline.assemble import assemble
from node.pipeline.route import RuleSet
from node.prometheus import NodeMetrics
from node.redact import redact
from node.runner import jobs, outbox
from node.runner.analyse import Stopwatch, analyse
from node.runner.queue import ProcrastinateQueue, ensure_schema, queue_chooser
from node.runner.shared_files import SharedFiles
from node.send import Destination
from node.settings import DestinationSettings, Settings
from node.store import cluster, repo
from node.store.integrity import IntegrityError
from node.store.tables import Job, JobState, Series, utcnow
from node.types import AnalysisResult, Finding, JobOutput, JobResult, OutputIdentity, OutputKind, Segment

log = logging.getLogger(__name__)
# Errors caused by the data (or the model files), which a retry would only repeat: the job fails at
# once. Output building is pure and deterministic, so an OutputError is one of them. Everything
# else a stage raises (I/O, the database, ONNX Runtime) is transient: retried with back-off.
PERMANENT = (DecodeError, PreprocessError, ManifestError, OutputError, ConfigError, IntegrityError)
_NO_ATTRIBUTE = re.compile(r"object has no attribute '(\w+)'")
_STAGE_STATE = {
    "preprocessing": JobState.PREPROCESSING,
    "inferring": JobState.INFERRING,
    "writing": JobState.WRITING,
}
#: The runner's parts: routing (receiver role), running jobs (worker), the outbox (sender).
PARTS = ("scheduler", "workers", "sender")


@dataclass
class Models:
    """Loaded models and their sessions, by model id."""

    registry: Registry
    sessions: Mapping[str, ModelSession]

    def available(self, model_id: str) -> bool:
        """True when the model loaded and has a session."""
        return model_id in self.sessions


def build_outputs(
    result: AnalysisResult, sources: list[Dataset], identity: OutputIdentity, settings: Settings
) -> list[tuple[OutputKind, Dataset]]:
    """Every output object the configuration asks for: SR, heatmap SCs, parametric maps,
    presentation states and a Key Object Selection (positive findings only); for a segmentation
    model also its DICOM Segmentation (always, when any segment has pixels), which the SR
    references. A SEG the sources cannot carry is left out, and the SR says why; a presentation
    state or KOS that cannot be built is left out (logged), the other outputs still go."""
    from node.outputs.gsps import build_presentation_states
    from node.outputs.kos import build_key_object_selection
    from node.outputs.pm import build_parametric_maps
    from node.outputs.sc import build_heatmap_scs
    from node.outputs.seg import build_seg
    from node.outputs.sr import build_sr

    out: list[tuple[OutputKind, Dataset]] = []
    seg: Dataset | None = None
    sr: Dataset | None = None
    note = ""
    if result.segmentation is not None:
        try:
            seg = build_seg(result, sources, identity)
        except OutputError as exc:
            log.warning("model %s: no SEG: %s", result.algorithm.model_id, exc)
            note = f"No segmentation object was written: {exc}"
        else:
            if seg is None:
                note = "No segmentation object was written: no segment has pixels after post-processing."
            else:
                out.append((OutputKind.SEG, seg))
    if settings.outputs.sr:
        sr = build_sr(result, sources, identity, segmentation=seg, segmentation_note=note)
        out.append((OutputKind.SR, sr))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    if settings.outputs.secondary_capture:
        out.extend((OutputKind.SC, ds) for ds in build_heatmap_scs(result, by_uid, identity))
    object_dests = [d for d in settings.destinations if d.takes_objects]  # dicom, dicomweb
    if any(d.parametric_map for d in object_dests):
        out.extend((OutputKind.PM, ds) for ds in build_parametric_maps(result, sources, identity))
    states: list[Dataset] = []
    if settings.outputs.presentation_state and any(d.presentation_state for d in object_dests):
        try:
            states = build_presentation_states(result, sources, identity)
        except OutputError as exc:
            log.warning("model %s: no presentation states: %s", result.algorithm.model_id, exc)
        out.extend((OutputKind.GSPS, ds) for ds in states)
    kos_to = [d for d in object_dests if d.key_objects]
    if settings.outputs.key_objects and kos_to:
        # a KOS names the presentation states only where every destination of it gets them
        linked = states if all(d.presentation_state for d in kos_to) else []
        try:
            kos = build_key_object_selection(result, sources, identity, sr=sr, presentation_states=linked)
        except OutputError as exc:
            log.warning("model %s: no key object selection: %s", result.algorithm.model_id, exc)
        else:
            if kos is not None:
                out.append((OutputKind.KOS, kos))
    return out


def _missing_keyword(exc: BaseException) -> tuple[str, str] | None:
    """(DICOM keyword, the text naming it) when ``exc`` or its cause is an AttributeError for a
    DICOM attribute a data set lacks (pydicom: "'Dataset' object has no attribute 'X'")."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, AttributeError):
            match = _NO_ATTRIBUTE.search(str(current))
            keyword = getattr(current, "name", None) or (match.group(1) if match else None)
            if keyword and tag_for_keyword(keyword) is not None:
                return keyword, str(current)
        current = current.__cause__ or current.__context__
    return None


def _found(keyword: str, sources: Sequence[Dataset]) -> str:
    """What the source images hold for ``keyword``: how many lack it, and their modality and SOP
    class (nothing that identifies the patient)."""
    tag = Tag(tag_for_keyword(keyword))  # type: ignore[arg-type]
    named = f"{keyword} ({tag.group:04X},{tag.element:04X})"
    if not sources:
        return f"{named} is absent"
    lacking = sum(1 for ds in sources if keyword not in ds)
    kinds = sorted(
        {
            f"{ds.get('Modality', '') or '?'} {UID(str(ds.get('SOPClassUID', ''))).name or '?'}"
            for ds in sources
        }
    )
    return f"{named} is absent in {lacking} of {len(sources)} source images ({'; '.join(kinds)[:120]})"


def describe_error(exc: BaseException, sources: Sequence[Dataset] = ()) -> str:
    """The error text recorded on a failed job: ``Type: message``. When the cause is a DICOM
    attribute missing from the data, the attribute is named with its tag and what the source
    images hold, e.g. ``OutputError: measurement report content could not be built:
    ImagerPixelSpacing (0018,1164) is absent in 1 of 1 source images (DX Digital X-Ray Image
    Storage - For Presentation)``."""
    text = f"{type(exc).__name__}: {exc}"
    missing = _missing_keyword(exc)
    if missing is not None:
        keyword, raw = missing
        found = _found(keyword, sources)
        text = text.replace(raw, found) if raw and raw in text else f"{text}: {found}"
    # pydicom's conversion errors quote the value (a birth date, a name): never on a job or a page
    return redact(text)


class Runner:
    """Background threads that move work from completed series to delivered outputs."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        rules: RuleSet,
        models: Models,
        identity: OutputIdentity,
        destinations: Mapping[str, tuple[DestinationSettings, Destination]],
        metrics: NodeMetrics | None = None,
        preparer: Preparer | None = None,
        node_id: str = "",
        shared: SharedFiles | None = None,
    ) -> None:
        self._engine = engine
        self._shared = shared  # storage.object_store: files fetched from and put to it
        self._node_id = node_id or cluster.node_id(settings.cluster.node_id)  # owner of its job claims
        self._lease_s = settings.cluster.lease_s
        self._preparer = preparer  # decodes in child processes (limits.decode_memory_mib); None: here
        self._gpu_preparer: GpuPreparer | None | bool = None  # made for the first CUDA model; False: none
        self._gpu_lock = threading.Lock()
        self._metrics = metrics or NodeMetrics()
        self._settings = settings
        self._rules = rules
        self._models = models
        # one batcher per model: the workers' jobs of one model share its runs (issue 16)
        self._batchers: dict[str, SessionBatcher] = {}
        self._batchers_lock = threading.Lock()
        self._identity = identity
        self._destinations = destinations
        self._data_dir = settings.storage.data_dir
        self._spool = settings.storage.spool_dir
        self._outbox_dir = settings.storage.data_dir / "outbox"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._claim_lock = threading.Lock()
        self._wake_workers = threading.Event()
        self._wake_sender = threading.Event()
        self._started_at: datetime | None = None
        self._queue: ProcrastinateQueue | None = None
        if settings.cluster.queue == "procrastinate":  # refused on SQLite (ConfigError)
            self._queue = ProcrastinateQueue(
                engine,
                self._node_id,
                queue_chooser(
                    settings.cluster.model_queues,
                    {m: getattr(s, "active_provider", "") for m, s in models.sessions.items()},
                ),
                [m for m, lm in models.registry.models.items() if any(b.triage for b in lm.manifest.labels)],
                stalled_s=self._lease_s,
            )

    @property
    def node_id(self) -> str:
        """The id its job claims carry."""
        return self._node_id

    def start(self, parts: Collection[str] = PARTS) -> None:
        """Resume this node's interrupted jobs, then start the heartbeat and ``parts`` (the
        scheduler, workers and sender by default)."""
        self._stop.clear()
        self._started_at = utcnow()
        # import the output writers now (highdicom takes ~0.3 s), not in the first job's time to result
        import node.outputs.pm
        import node.outputs.sc
        import node.outputs.sr  # noqa: F401

        if self._queue is not None:  # interrupted jobs come back through the stalled-worker check
            ensure_schema(self._engine)
        else:
            with Session(self._engine) as session:
                jobs.requeue_interrupted(session, utcnow(), self._settings.runner.max_attempts, self._node_id)
                session.commit()
        targets = [("heartbeat", self._heartbeat_loop)]
        if "scheduler" in parts:
            targets.append(("scheduler", self._schedule_loop))
        if "sender" in parts:
            targets.append(("sender", self._send_loop))
        if "workers" in parts and self._queue is not None:
            cfg = self._settings
            self._queue.start_worker(self.run_queued, cfg.runner.workers, cfg.cluster.queues)
        elif "workers" in parts:
            targets += [(f"worker-{i}", self._work_loop) for i in range(self._settings.runner.workers)]
        for name, target in targets:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Ask every thread to finish its current step and wait for them."""
        self._stop.set()
        self._wake_workers.set()
        self._wake_sender.set()
        if self._queue is not None:
            self._queue.stop_worker()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        with self._batchers_lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()

    def _batcher(self, model_id: str, session: RunsBatches) -> SessionBatcher:
        """The batcher in front of ``model_id``'s session (made on first use)."""
        with self._batchers_lock:
            batcher = self._batchers.get(model_id)
            if batcher is None or batcher.session is not session:
                batcher = self._batchers[model_id] = SessionBatcher(session, model_id)
            return batcher

    def _preparer_for(self, session: RunsBatches) -> Preparer | None:
        """Who prepares the frames of a model run by ``session``: on CUDA, the GPU preparer
        (made once, for the first such model; ``models.gpu_preparation``), which hands what the
        device cannot do to the preparation processes; otherwise those processes."""
        if getattr(session, "active_provider", None) != CUDA or not self._settings.models.gpu_preparation:
            return self._preparer
        with self._gpu_lock:
            if self._gpu_preparer is None:  # why not, when not, is logged once by the probe
                self._gpu_preparer = make_gpu_preparer(CUDA, cpu=self._preparer) or False
            return self._gpu_preparer if isinstance(self._gpu_preparer, GpuPreparer) else self._preparer

    # -- heartbeat: leases of this node's jobs, jobs of nodes that died ---------------------
    def heartbeat(self) -> None:
        """Renew the lease of every job this node runs, record that it is alive, and requeue
        running jobs whose lease expired (their node died: any node takes them back)."""
        now = utcnow()
        if self._queue is not None:
            self._queue_heartbeat(now)
            return
        with Session(self._engine) as session:
            jobs.renew_leases(session, self._node_id, now, self._lease_s)
            cluster.heartbeat(session, self._node_id, now)
            session.commit()
            if jobs.reclaim_expired(session, now, self._settings.runner.max_attempts):
                self._wake_workers.set()
            session.commit()

    def _queue_heartbeat(self, now: datetime) -> None:
        """With procrastinate: record this node's heartbeat, recover the jobs of workers whose
        heartbeats stopped (procrastinate's own record of them), and defer queued jobs that have
        no procrastinate job (retried from the page, or queued before the switch)."""
        assert self._queue is not None
        max_attempts = self._settings.runner.max_attempts
        with Session(self._engine) as session:
            cluster.heartbeat(session, self._node_id, now)
            session.commit()
            self._queue.recover_stalled(
                session,
                now,
                lambda job_id: jobs.requeue_job(session, job_id, now, max_attempts, "its worker stopped"),
            )
            session.commit()
            # jobs claimed under the database queue before the switch (procrastinate's claims
            # carry no lease), then every queued job without a procrastinate job
            jobs.reclaim_expired(session, now, max_attempts)
            self._queue.adopt_queued(session)
            session.commit()

    def _heartbeat_loop(self) -> None:
        self._loop(self.heartbeat, self._lease_s / 3)

    # -- scheduler: assembly, routing, job creation ------------------------------------------
    def tick(self) -> None:
        """One scheduling pass."""
        now = utcnow()
        with Session(self._engine) as session:
            done = assemble(session, now, self._settings.assembly, self._started_at)
            session.commit()
            routed = jobs.route_complete_series(
                session,
                self._rules,
                self._models.available,
                self._spool,
                now,
                localise=self._shared.localise if self._shared else None,
                uploaded_only=self._shared is not None,
                enqueue=self._enqueue,
            )
            created = jobs.create_study_jobs(session, now, self._enqueue)
            session.commit()
        if done.series or done.studies:
            log.info("assembly: %d series and %d studies complete", len(done.series), len(done.studies))
        if routed or created:
            self._wake_workers.set()

    @property
    def _enqueue(self) -> jobs.Enqueue | None:
        return self._queue.defer if self._queue is not None else None

    def _schedule_loop(self) -> None:
        self._loop(self.tick, self._settings.assembly.poll_interval_s)

    def _loop(self, step: object, interval: float, wake: threading.Event | None = None) -> None:
        while not self._stop.is_set():
            try:
                step()  # type: ignore[operator]
            except Exception:  # a transient database error must not end the loop; it is logged
                log.exception("%s pass failed; retrying", threading.current_thread().name)
            if wake is None:
                self._stop.wait(interval)
            else:
                wake.wait(interval)
                wake.clear()

    # -- workers -----------------------------------------------------------------------------
    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.work_once()
            except Exception:
                log.exception("worker pass failed; retrying")
                worked = False
            if not worked:
                self._wake_workers.wait(0.5)
                self._wake_workers.clear()

    def work_once(self) -> bool:
        """Claim and run one job; False when none is due."""
        with self._claim_lock, Session(self._engine, expire_on_commit=False) as session:
            job = jobs.claim_job(session, utcnow(), self._node_id, self._lease_s)
            session.commit()
            if job is None:
                return False
            session.expunge(job)
        try:
            self._run_job(job)
        except Exception as exc:  # e.g. the database went away mid-job: never leave it claimed
            log.exception("job %d (%s): runner error", job.id, job.model_id)
            self._retry_or_fail(job, Stopwatch(deadline=0.0), f"runner error {type(exc).__name__}: {exc}")
        return True

    def run_queued(self, job_id: int) -> None:
        """The procrastinate task: claim node job ``job_id`` and run it (nothing when it is not
        queued: another claim won or it finished). Never raises: the node's row records the
        outcome, and a transient error defers a new procrastinate job (see _retry_or_fail)."""
        with Session(self._engine, expire_on_commit=False) as session:
            job = jobs.claim_job_by_id(session, job_id, utcnow(), self._node_id)
            session.commit()
            if job is None:
                log.info("job %d is not queued any more; nothing to run", job_id)
                return
            session.expunge(job)
        try:
            self._run_job(job)
        except Exception as exc:  # e.g. the database went away mid-job: never leave it claimed
            log.exception("job %d (%s): runner error", job.id, job.model_id)
            try:
                self._retry_or_fail(job, Stopwatch(deadline=0.0), f"runner error {type(exc).__name__}: {exc}")
            except Exception:  # still no database: its worker's heartbeat recovers it
                log.exception("job %d: could not record the runner error", job.id)

    def _record_stage(self, job_id: int, stage: str) -> None:
        state = _STAGE_STATE.get(stage)
        if state is None:
            return
        with Session(self._engine) as session:
            jobs.set_state(session, job_id, state, utcnow(), self._node_id)
            session.commit()

    def _run_job(self, job: Job) -> None:
        assert job.id is not None
        settings = self._settings
        watch = Stopwatch(
            deadline=time.monotonic() + settings.runner.job_timeout_s,
            on_stage=lambda stage: self._record_stage(job.id or 0, stage),
        )
        with Session(self._engine) as session:
            waited = (job.started_at - job.created_at).total_seconds() if job.started_at else 0.0
            watch.timings["queued"] = max(0.0, waited)
            stored = jobs.job_stored_files(session, job, self._spool)
            files = [f.path for f in stored]
            series_rows = [s for uid in job.series_uids if (s := session.get(Series, uid))]
            calling = {s.calling_aet for s in series_rows}
            last_received = max((s.last_received_at for s in series_rows), default=None)
        assemble_wait = (job.created_at - last_received).total_seconds() if last_received else None
        sources: list[Dataset] = []
        try:
            model: LoadedModel = self._models.registry.get(job.model_id)
            session_ = self._models.sessions.get(job.model_id)
            if session_ is None:
                raise ManifestError(f"model {job.model_id!r} has no runtime session")
            if self._shared is not None:  # files received by another node: from the object store
                with watch.stage("fetching"):
                    stored = self._shared.localise(stored)
                    files = [f.path for f in stored]
            with watch.stage("verifying"):  # the bytes received, or the job fails (IntegrityError)
                jobs.check_stored_files(stored)
            result, sources = analyse(
                model,
                self._batcher(job.model_id, session_),
                files,
                level=job.level,
                uid_seed=job.key,
                watch=watch,
                budget=settings.limits.budget(),
                preparer=self._preparer_for(session_),
            )
            shadow = model.manifest.mode == "shadow"  # analysed and recorded; nothing is sent
            targets = [] if shadow else settings.destinations
            if shadow:  # nor does it raise triage (nor, so, a webhook notification)
                result = dataclasses.replace(
                    result, findings=tuple(dataclasses.replace(f, triage=False) for f in result.findings)
                )
            with watch.stage("writing"):
                outputs = [] if shadow else build_outputs(result, sources, self._identity, settings)
                fsync = self._settings.storage.fsync
                written = outbox.write_output_files(self._outbox_dir, job.id, outputs, fsync=fsync)
                messages = outbox.write_messages(  # HL7 ORU / FHIR Bundle per message destination
                    self._outbox_dir,
                    job,
                    result,
                    sources,
                    self._identity,
                    targets,
                    utcnow(),
                    fsync=fsync,
                )
                if self._shared is not None:  # so that any sender can send them
                    self._shared.put_outputs([p for _, _, p in written] + [m.path for m in messages])
        except PERMANENT as exc:  # caused by the data: a retry would fail the same way
            if isinstance(exc, IntegrityError):
                self._metrics.integrity_failure("analysis")
            self._fail(job, watch, describe_error(exc, sources))
            return
        except (NodeError, OSError) as exc:
            self._retry_or_fail(job, watch, describe_error(exc, sources))
            return
        except Exception as exc:  # an unexpected bug: recorded on the job, visible, not retried
            log.exception("job %d (%s) failed unexpectedly", job.id, job.model_id)
            self._fail(job, watch, "unexpected " + describe_error(exc, sources))
            return
        finally:
            if self._shared is not None:
                self._shared.done_with(stored)
        summary = JobResult(
            model=result.algorithm.model_id,
            version=result.algorithm.version,
            images=len(files),
            frames=result.frames_analysed,
            findings=[
                Finding(
                    label=f.label,
                    probability=round(f.probability, 4),
                    positive=f.positive,
                    normal=f.normal,
                    triage=f.triage,
                    threshold=f.threshold,
                )
                for f in result.findings
            ],
            outputs=[
                JobOutput(kind=kind, sop_instance_uid=str(ds.SOPInstanceUID)) for kind, ds, _ in written
            ],
            segments=None
            if result.segmentation is None
            else [
                Segment(
                    label=s.label,
                    pixels=s.pixels,
                    frames=s.frames_with_pixels,
                    area_mm2=None if s.area_mm2 is None else round(s.area_mm2, 2),
                    volume_mm3=None if s.volume_mm3 is None else round(s.volume_mm3, 2),
                )
                for s in result.segmentation.segments
            ],
            shadow=shadow,
        )
        dests = outbox.choose_destinations(settings.destinations, settings.outputs.send_to, calling)
        now = utcnow()
        with Session(self._engine) as session:
            fresh = session.get(Job, job.id, with_for_update=True)
            if not jobs.still_owned(fresh, self._node_id):  # stalled past its lease: another node has it
                log.warning("job %d: its lease was taken over while it ran; its outputs are dropped", job.id)
                return
            assert fresh is not None
            rows = outbox.queue_outputs(session, fresh, written, dests, self._data_dir, now)
            rows += outbox.queue_messages(session, fresh, messages, self._data_dir, now)
            state = JobState.SENDING if rows else JobState.DONE
            jobs.finish(session, fresh, state, now, watch.timings, summary)
            self._metrics.job_ended(job.model_id, state, watch.timings, watch.batches, assemble_wait)
            flagged = {model.manifest.id: {lb.name for lb in model.manifest.labels if lb.triage}}
            repo.refresh_study_triage(
                session, fresh.study_uid, now, flagged, notify=bool(settings.webhook.url)
            )
            session.commit()
        if rows:
            self._wake_sender.set()
        record_run(self._engine, job, model.manifest, result, files, settings.limits.budget())
        positives = [f.label for f in result.findings if f.positive and not f.normal]
        log.info(
            "job %d: %s %s on %d images, positive: %s; %d outputs queued",
            job.id,
            job.model_id,
            result.algorithm.version,
            len(files),
            ", ".join(positives) or "none",
            rows,
        )

    def _fail(self, job: Job, watch: Stopwatch, error: str) -> None:
        log.error("job %d (%s) failed: %s", job.id, job.model_id, error)
        self._metrics.job_ended(job.model_id, JobState.FAILED, watch.timings, watch.batches)
        with Session(self._engine) as session:
            fresh = session.get(Job, job.id, with_for_update=True)
            if jobs.still_owned(fresh, self._node_id):
                assert fresh is not None
                jobs.finish(session, fresh, JobState.FAILED, utcnow(), watch.timings, error=error)
                session.commit()

    def _retry_or_fail(self, job: Job, watch: Stopwatch, error: str) -> None:
        if job.attempts >= self._settings.runner.max_attempts:
            self._fail(job, watch, f"after {job.attempts} attempts: {error}")
            return
        log.warning(
            "job %d (%s) attempt %d failed, will retry: %s", job.id, job.model_id, job.attempts, error
        )
        self._metrics.job_ended(job.model_id, "retry", watch.timings, watch.batches)
        with Session(self._engine) as session:
            fresh = session.get(Job, job.id, with_for_update=True)
            if jobs.still_owned(fresh, self._node_id):
                assert fresh is not None
                delay = backoff_s(self._settings.runner.retry_backoff_s, job.attempts)
                jobs.retry_later(session, fresh, utcnow(), delay, error)
                if self._queue is not None:  # the retry's queue entry commits with the row
                    self._queue.defer(session, fresh, at=fresh.not_before)
                session.commit()

    # -- sender ------------------------------------------------------------------------------
    def send_once(self) -> int:
        """One outbox pass."""
        with Session(self._engine) as session:
            sent = outbox.deliver_due(
                session,
                self._destinations,
                self._data_dir,
                utcnow(),
                on_damaged=lambda: self._metrics.integrity_failure("send"),
                fetch=self._shared.fetch_outputs if self._shared else None,
            )
            session.commit()
        return sent

    def _send_loop(self) -> None:
        """Deliver what is due; sleep until a job queues outputs, or 1 s for retries coming due."""
        self._loop(self.send_once, 1.0, self._wake_sender)
