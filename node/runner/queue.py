"""``cluster.queue: procrastinate``: every node job is also a procrastinate job (PostgreSQL).

The node's ``job`` table stays the record of state, timings, attempts and results (the pages read
it); procrastinate carries the hand-over between processes:

- a job is deferred in the transaction that creates (or requeues) its row, through the same
  connection, with procrastinate's own SQL function (``procrastinate_defer_jobs_v1``): its
  ``queueing_lock`` is the job key (one waiting procrastinate job per node job), its ``lock`` the
  study UID (two jobs of one study never run at once), its queue the model's device class and its
  priority from triage;
- workers run a procrastinate worker (LISTEN/NOTIFY: a job starts milliseconds after the routing
  transaction commits) whose one task claims the node job by id and runs it;
- a worker that stops sending heartbeats (killed, cut off) has its running jobs requeued by any
  node (procrastinate's stalled-job query; the attempt is counted on the node's row).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError as RowConflict
from sqlmodel import Session, col, select

from node.errors import ConfigError
from node.store.tables import Job, JobState, Study

log = logging.getLogger(__name__)

#: The one procrastinate task: run the node job ``job_id``.
TASK = "pacsnode.run_job"
CPU_QUEUE = "pacsnode-cpu"
GPU_QUEUE = "pacsnode-gpu"
#: Priorities (higher runs first): a job of a study already flagged urgent, then a model that can
#: raise triage (it may make a study urgent), then the others.
URGENT_STUDY_PRIORITY = 20
TRIAGE_MODEL_PRIORITY = 10
#: Serialises the schema's creation between nodes starting at once.
_SCHEMA_LOCK = 0x70616373  # "pacs"
_QUEUEING_LOCK = "procrastinate_jobs_queueing_lock_idx_v1"

_DEFER = text(
    "SELECT unnest(procrastinate_defer_jobs_v1(ARRAY[ROW("
    "CAST(:queue AS varchar), CAST(:task AS varchar), CAST(:priority AS integer), CAST(:lock AS text), "
    "CAST(:qlock AS text), CAST(:args AS jsonb), CAST(:at AS timestamptz)"
    ")::procrastinate_job_to_defer_v1])) AS id"
)
_LOCK_DOING = text(
    "SELECT id FROM procrastinate_jobs WHERE id = :id AND status = 'doing' FOR UPDATE SKIP LOCKED"
)
_RETRY = text("SELECT procrastinate_retry_job_v1(:id, now(), NULL, NULL, NULL)")
_FINISH = text("SELECT procrastinate_finish_job_v1(:id, CAST(:status AS procrastinate_job_status), false)")
_ORPHANS = text(
    "SELECT j.id FROM job j WHERE j.state = :queued AND NOT EXISTS ("
    "SELECT 1 FROM procrastinate_jobs p WHERE p.queueing_lock = j.key AND p.status IN ('todo', 'doing')"
    ") ORDER BY j.id LIMIT 200"
)


def check_database(url: str) -> None:
    """Raise ConfigError when ``url`` is not PostgreSQL: procrastinate lives there."""
    if not url.startswith("postgresql"):
        raise ConfigError(
            "cluster.queue: procrastinate keeps its jobs in PostgreSQL: set storage.database_url to a "
            "PostgreSQL database (postgresql+psycopg://...), or leave cluster.queue at database "
            "(the node's own job table, as on SQLite)"
        )


def ensure_schema(engine: Engine) -> bool:
    """Create procrastinate's schema (its own ``schema.sql``, version pinned in pyproject) when the
    database has none; one node at a time. True when it was created."""
    from procrastinate.schema import SchemaManager

    with engine.begin() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
        if conn.exec_driver_sql("SELECT to_regclass('procrastinate_jobs')").scalar() is not None:
            return False
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute(SchemaManager.get_schema())  # no parameters: its '%' are literal
    log.info("procrastinate's schema created in the database")
    return True


class ProcrastinateQueue:
    """Defers, recovers and runs node jobs through procrastinate (see the module's docstring)."""

    def __init__(
        self,
        engine: Engine,
        node_id: str,
        queue_of: Callable[[str], str],
        triage_models: Iterable[str],
        stalled_s: float,
    ) -> None:
        check_database(str(engine.url))
        self._engine = engine
        self._node_id = node_id
        self._queue_of = queue_of
        self._triage_models = frozenset(triage_models)
        self._stalled_s = stalled_s
        self._worker: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- deferring (in the caller's transaction) --------------------------------------------
    def priority(self, session: Session, job: Job) -> int:
        """Urgent first: a job of a study already flagged urgent (a revision, another model),
        then models that can raise triage, then the rest."""
        study = session.get(Study, job.study_uid)
        urgent = study is not None and study.priority == "urgent"
        return (URGENT_STUDY_PRIORITY if urgent else 0) + (
            TRIAGE_MODEL_PRIORITY if job.model_id in self._triage_models else 0
        )

    def defer(self, session: Session, job: Job, at: datetime | None = None) -> bool:
        """Defer the procrastinate job of ``job`` (flushed: it has an id) on ``session``'s
        connection, so it commits or rolls back with the row; ``at``: not before then. False when
        one is already waiting for this job (its queueing lock, the job key)."""
        session.flush()
        assert job.id is not None
        params = {
            "queue": self._queue_of(job.model_id),
            "task": TASK,
            "priority": self.priority(session, job),
            "lock": job.study_uid,
            "qlock": job.key,
            "args": f'{{"job_id": {int(job.id)}}}',
            "at": at,
        }
        try:
            with session.begin_nested():
                session.execute(_DEFER, params)
        except RowConflict as exc:
            if getattr(getattr(exc.orig, "diag", None), "constraint_name", None) != _QUEUEING_LOCK:
                raise
            log.info("job %d is already waiting in procrastinate's queue", job.id)
            return False
        return True

    def adopt_queued(self, session: Session) -> int:
        """Queued node jobs with no procrastinate job waiting or running (created before the
        queue was switched, or set back to queued from the page) are deferred. The caller
        commits."""
        ids = [int(r[0]) for r in session.execute(_ORPHANS, {"queued": JobState.QUEUED})]
        adopted = 0
        for job in session.exec(select(Job).where(col(Job.id).in_(ids))):
            adopted += self.defer(session, job, at=job.not_before)
        if adopted:
            log.info("%d queued jobs deferred to procrastinate", adopted)
        return adopted

    # -- stalled workers ----------------------------------------------------------------------
    def recover_stalled(self, session: Session, now: datetime, requeue: Callable[[int], str]) -> int:
        """Running procrastinate jobs whose worker sent no heartbeat for ``stalled_s`` (or was
        removed): ``requeue`` (job id -> the node job's state after it) sets the node job back to
        queued, counting the attempt, or fails it; the procrastinate job is retried, or finished.
        The caller commits. Returns how many were recovered."""
        from procrastinate.sql import queries

        stalled = session.connection().exec_driver_sql(
            queries["select_stalled_jobs_by_heartbeat"],
            {"queue": None, "task_name": TASK, "seconds_since_heartbeat": self._stalled_s},
        )
        recovered = 0
        for row in list(stalled.mappings()):
            if session.execute(_LOCK_DOING, {"id": row["id"]}).first() is None:
                continue  # another node is recovering it
            job_id = int((row["args"] or {}).get("job_id", 0))
            state = requeue(job_id) if job_id else JobState.FAILED
            status = "failed" if state == JobState.FAILED else "succeeded"
            if state == JobState.QUEUED:
                try:  # the same procrastinate job waits again (its attempts are the node row's)
                    with session.begin_nested():
                        session.execute(_RETRY, {"id": row["id"]})
                    status = ""
                except RowConflict:  # the worker had deferred its retry before it stopped
                    status = "failed"
            if status:  # failed (every attempt used), finished, or another entry waits for it
                session.execute(_FINISH, {"id": row["id"], "status": status})
            recovered += 1
        if recovered:
            log.warning(
                "%d jobs of stalled workers (no heartbeat for %.0f s) recovered", recovered, self._stalled_s
            )
        return recovered

    # -- the worker ---------------------------------------------------------------------------
    def start_worker(self, run: Callable[[int], None], concurrency: int, queues: list[str]) -> None:
        """Run a procrastinate worker in a thread: ``run(job_id)`` for each job it fetches."""
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._worker_thread, args=(run, concurrency, queues), name="procrastinate", daemon=True
        )
        self._thread.start()

    def _worker_thread(self, run: Callable[[int], None], concurrency: int, queues: list[str]) -> None:
        while not self._stopping.is_set():
            try:
                asyncio.run(self._run_worker(run, concurrency, queues))
            except Exception:  # the database went away: start again
                log.exception("procrastinate worker stopped; starting again")
            self._stopping.wait(1.0)

    async def _run_worker(self, run: Callable[[int], None], concurrency: int, queues: list[str]) -> None:
        import procrastinate
        from procrastinate.worker import Worker

        conninfo = self._engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=conninfo, min_size=1, max_size=concurrency + 2)
        )
        app.task(name=TASK)(run)
        async with app.open_async():
            worker = Worker(
                app,
                queues=queues or None,
                name=self._node_id,
                concurrency=concurrency,
                install_signal_handlers=False,
                listen_notify=True,
                fetch_job_polling_interval=5.0,  # LISTEN/NOTIFY wakes it; polling is the fallback
                update_heartbeat_interval=max(0.5, self._stalled_s / 3),
                stalled_worker_timeout=self._stalled_s,
                delete_jobs="successful",
            )
            self._worker = worker  # its stop() is safe from another thread (it wakes its own loop)
            if self._stopping.is_set():
                return
            await worker.run()

    def stop_worker(self, timeout: float = 30.0) -> None:
        """Ask the worker to stop (it lets running jobs finish) and wait for it."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._worker = None


def queue_chooser(model_queues: Mapping[str, str], providers: Mapping[str, str]) -> Callable[[str], str]:
    """model id -> queue: ``cluster.model_queues`` when it names the model, else by the provider
    the routing node runs it on (``providers``: model id -> active ONNX Runtime provider; a GPU
    provider: pacsnode-gpu; CPU, or none such as a Triton client: pacsnode-cpu)."""

    def queue_of(model_id: str) -> str:
        if model_id in model_queues:
            return model_queues[model_id]
        provider = providers.get(model_id) or "CPUExecutionProvider"  # Triton clients: no provider
        return CPU_QUEUE if provider == "CPUExecutionProvider" else GPU_QUEUE

    return queue_of
