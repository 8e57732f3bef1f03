"""Prometheus metrics of one node, in a registry of its own (several nodes may share a process).

Counters and histograms are updated by the SCP, the runner and the senders; gauges that describe
the store (job queue, outbox backlog) and the models are read from the database at scrape time.
Labels never carry patient data: calling AE titles, model ids, stages, destinations and statuses.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from node.inference.registry import Registry

log = logging.getLogger(__name__)
PREFIX = "pacsnode"
OTHER = "(other)"
MAX_AE_LABELS = 64
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class _LabelCap:
    """Keeps a label's distinct values bounded: after ``limit`` values, new ones become (other)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        value = value.strip() or "(blank)"
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER


class _StoreCollector(Collector):
    """Gauges read from the database and the model registry when Prometheus scrapes."""

    def __init__(self, engine: Engine, models: Registry) -> None:
        self._engine = engine
        self._models = models

    def describe(self) -> Iterable[Metric]:
        """Nothing up front (collect queries the database)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Jobs per state, outbox rows per state, and which models loaded."""
        from sqlmodel import Session

        from node.store import repo

        jobs = GaugeMetricFamily(
            f"{PREFIX}_jobs", "Jobs per state (queued is the queue depth)", labels=["state"]
        )
        outbox = GaugeMetricFamily(
            f"{PREFIX}_outbox_items", "Outbox rows per state (pending is the backlog)", labels=["state"]
        )
        try:
            with Session(self._engine) as session:
                job_counts = repo.job_state_counts(session)
                outbox_counts = repo.outbox_state_counts(session)
                duplicate_counts = repo.duplicate_counts(session)
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot read the store: %s", type(exc).__name__)
            job_counts, outbox_counts, duplicate_counts = {}, {}, {}
        for state in ("queued", *sorted(set(job_counts) - {"queued"})):
            jobs.add_metric([str(state)], float(job_counts.get(state, 0)))
        for state in ("pending", *sorted(set(outbox_counts) - {"pending"})):
            outbox.add_metric([str(state)], float(outbox_counts.get(state, 0)))
        yield jobs
        yield outbox
        duplicates = GaugeMetricFamily(
            f"{PREFIX}_duplicate_instances",
            "Copies of known SOP instances that were not plain resends, by action (recorded events)",
            labels=["action"],
        )
        for action in ("kept first", "replaced", "refused"):
            duplicates.add_metric([action], float(duplicate_counts.get(action, 0)))
        yield duplicates
        loaded = GaugeMetricFamily(
            f"{PREFIX}_model_loaded",
            "1 for each model loaded at start-up, 0 for each refused one",
            labels=["model", "version"],
        )
        for model_id, model in sorted(self._models.models.items()):
            loaded.add_metric([model_id, str(model.manifest.version)], 1.0)
        for name in sorted(self._models.refused):
            loaded.add_metric([name, ""], 0.0)
        yield loaded


class NodeMetrics:
    """Every metric of one node; the web layer serves ``registry`` at /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._ae = _LabelCap(MAX_AE_LABELS)
        r = self.registry
        self.associations = Counter(
            f"{PREFIX}_associations",
            "Associations requested of the SCP, by calling AE title and outcome",
            ["calling_ae", "outcome"],
            registry=r,
        )
        self.instances = Counter(
            f"{PREFIX}_instances_received",
            "C-STORE requests received, by calling AE title and outcome (stored, duplicate, refused)",
            ["calling_ae", "outcome"],
            registry=r,
        )
        self.bytes = Counter(
            f"{PREFIX}_received_bytes",
            "Bytes of instances stored (Part 10 files as written to the spool)",
            ["calling_ae"],
            registry=r,
        )
        self.cstore_status = Counter(
            f"{PREFIX}_cstore_responses", "C-STORE responses sent, by status", ["status"], registry=r
        )
        self.stow_status = Counter(
            f"{PREFIX}_stow_instance_responses",
            "STOW-RS instances answered, by status (0x0000 stored, else the failure reason)",
            ["status"],
            registry=r,
        )
        self.stow_requests = Counter(
            f"{PREFIX}_stow_requests", "STOW-RS requests answered, by HTTP status", ["code"], registry=r
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_job_stage_seconds",
            "Seconds per job stage (assemble_wait, queued, verifying, preprocessing, inferring, writing)",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.jobs = Counter(
            f"{PREFIX}_jobs_finished",
            "Job attempts ended, by model and outcome",
            ["model", "outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_inference_batch_size",
            "Images (or patches) per inference call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.sent = Counter(
            f"{PREFIX}_outputs_sent", "Outputs a destination accepted", ["destination"], registry=r
        )
        self.send_failures = Counter(
            f"{PREFIX}_send_failures",
            "Outputs not delivered on an attempt, by destination and reason (association, status)",
            ["destination", "reason"],
            registry=r,
        )
        self.send_seconds = Histogram(
            f"{PREFIX}_send_seconds",
            "Seconds per delivery batch (one association)",
            ["destination"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.integrity_failures = Counter(
            f"{PREFIX}_integrity_failures",
            "Stored files found missing, empty or changed since they were written, by stage (analysis, send)",
            ["stage"],
            registry=r,
        )
        self._store_collector: _StoreCollector | None = None

    def watch_store(self, engine: Engine, models: Registry) -> None:
        """Export job queue, outbox backlog and model load status, read at scrape time."""
        if self._store_collector is None:
            self._store_collector = _StoreCollector(engine, models)
            self.registry.register(self._store_collector)

    # -- SCP ---------------------------------------------------------------------------------
    def ae_label(self, ae_title: str) -> str:
        """The calling AE title as a bounded label value."""
        return self._ae(ae_title)

    def association(self, calling_ae: str, outcome: str) -> None:
        """An association was accepted or rejected (outcome says which and why)."""
        self.associations.labels(self.ae_label(calling_ae), outcome).inc()

    def stored(self, calling_ae: str, size: int, new: bool, stow: bool = False) -> None:
        """An instance was answered with success (stored now, or already stored); ``stow``: it
        came over STOW-RS (``calling_ae`` then names that source, e.g. STOW-RS)."""
        ae = self.ae_label(calling_ae)
        self.instances.labels(ae, "stored" if new else "duplicate").inc()
        if new:
            self.bytes.labels(ae).inc(size)
        (self.stow_status if stow else self.cstore_status).labels("0x0000").inc()

    def refused(self, calling_ae: str, status: int, stow: bool = False) -> None:
        """An instance was answered with a failure status (``stow``: over STOW-RS)."""
        self.instances.labels(self.ae_label(calling_ae), "refused").inc()
        (self.stow_status if stow else self.cstore_status).labels(f"0x{status:04X}").inc()

    def stow_request(self, code: int) -> None:
        """A STOW-RS request was answered with HTTP status ``code``."""
        self.stow_requests.labels(str(code)).inc()

    # -- runner ------------------------------------------------------------------------------
    def job_ended(
        self,
        model_id: str,
        outcome: str,
        timings: Mapping[str, float],
        batches: Sequence[int] = (),
        assemble_wait_s: float | None = None,
    ) -> None:
        """A job attempt ended (sending, done, retry or failed): observe its stage timings."""
        self.jobs.labels(model_id, outcome).inc()
        if assemble_wait_s is not None and assemble_wait_s >= 0:
            self.stage_seconds.labels(model_id, "assemble_wait").observe(assemble_wait_s)
        for stage, seconds in timings.items():
            self.stage_seconds.labels(model_id, stage).observe(max(0.0, seconds))
        for size in batches:
            self.batch_size.labels(model_id).observe(size)

    def integrity_failure(self, stage: str) -> None:
        """A stored file was not the bytes written (or was gone) when ``stage`` came to use it."""
        self.integrity_failures.labels(stage).inc()

    # -- senders -----------------------------------------------------------------------------
    def delivery(self, destination: str, seconds: float, sent: int, failed: int, reason: str) -> None:
        """One delivery batch: how long it took, how many outputs went and how many did not."""
        self.send_seconds.labels(destination).observe(seconds)
        if sent:
            self.sent.labels(destination).inc(sent)
        if failed:
            self.send_failures.labels(destination, reason).inc(failed)
