"""The app factory: settings -> store -> spool -> models -> rules -> SCP -> runner -> FastAPI.
Nothing starts at import."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI
from pydicom.uid import generate_uid
from sqlalchemy.engine import Engine

from node import __version__
from node.audit import AuditTrail, build_audit
from node.dicom.committer import IngestCommitter
from node.dicom.scp import StorageSCP
from node.dicom.spool import Spool
from node.errors import ConfigError
from node.inference.isolate import PreparePool
from node.inference.registry import load_registry
from node.inference.runtime import RuntimeConfig, create_session
from node.metrics import NodeMetrics
from node.pipeline.route import RuleSet, check_models, load_rules
from node.runner import Models, Runner
from node.runner.one_file import Outcome, analyse_upload
from node.send import make_destination
from node.settings import Settings
from node.store.db import make_engine, ping
from node.store.orphans import sweep_orphans
from node.types import OutputIdentity
from node.web.webhook import WebhookNotifier

log = logging.getLogger(__name__)


@dataclass
class Node:
    """A running node's parts, wired once, started and stopped together."""

    settings: Settings
    engine: Engine
    spool: Spool
    committer: IngestCommitter
    scp: StorageSCP
    runner: Runner
    models: Models
    rules: RuleSet | None = None
    notifier: WebhookNotifier | None = None
    metrics: NodeMetrics = field(default_factory=NodeMetrics)
    preparer: PreparePool | None = None  # decoding in child processes; None: in this process
    started_at: float = field(default_factory=time.time)
    version: str = __version__
    audit: AuditTrail = field(default_factory=AuditTrail.disabled)

    def start(self) -> None:
        """Prepare the spool (set aside files no row points to), then start committing, listening
        and the runner."""
        self.spool.prepare(self.settings.storage.orphan_grace_s)
        storage = self.settings.storage
        sweep_orphans(self.engine, self.spool.root, storage.data_dir / "quarantine", storage.orphan_grace_s)
        self.committer.start()
        self.scp.start()
        self.runner.start()
        if self.notifier is not None:
            self.notifier.start()
        self.started_at = time.time()
        self.audit.open()  # Application Start

    def analyse_upload(self, data: bytes, deadline: float) -> tuple[str, list[Outcome]]:
        """One uploaded file through routing, the models and heatmap rendering (the inference API)."""
        return analyse_upload(
            self.rules,
            self.models,
            data,
            deadline,
            budget=self.settings.limits.budget(),
            preparer=self.preparer,
        )

    def stop(self) -> None:
        """Stop listening first, so that every accepted instance is committed before the end."""
        self.scp.stop()
        self.runner.stop()
        if self.notifier is not None:
            self.notifier.stop()
        self.committer.stop()
        if self.preparer is not None:
            self.preparer.close()
        self.audit.shutdown()  # Application Stop
        self.engine.dispose()

    def ready(self) -> dict[str, bool]:
        """Readiness of each dependency: the database answers, the DICOM port listens and has a
        free association slot, and the spool's disk is above its watermark (below it every
        C-STORE is refused)."""
        return {
            "database": ping(self.engine),
            "dicom": self.scp.is_listening(),
            "dicom_slots": self.scp.has_free_slot(),
            "disk": self.spool.has_room(),
        }

    def web_app(self) -> FastAPI:
        """The FastAPI application bound to this node."""
        from node.web.api import create_web_app

        return create_web_app(self)


def load_models(settings: Settings) -> Models:
    """Load every manifest, open and warm one session per model: ONNX Runtime in this process, or
    (``models.backend: triton``) a client of the Triton servers in ``models.triton``."""
    cfg = settings.models
    registry = load_registry(cfg.directory, strict=cfg.strict)
    if cfg.backend == "triton":
        from node.inference.triton import TritonConfig, create_triton_session

        tls = cfg.triton.tls
        triton = TritonConfig(
            urls=tuple(cfg.triton.urls),
            timeout_s=cfg.triton.timeout_s,
            ca_file=tls.ca_file,
            cert_file=tls.cert_file,
            key_file=tls.key_file,
            check_hostname=tls.check_hostname,
            max_batch=cfg.max_batch,
        )
        remote = {mid: create_triton_session(model, triton) for mid, model in registry.models.items()}
        return Models(registry=registry, sessions=remote)  # type: ignore[arg-type]  # ModelSession's interface
    runtime = RuntimeConfig(
        providers=tuple(cfg.providers), intra_op_threads=cfg.intra_op_threads, max_batch=cfg.max_batch
    )
    sessions = {model_id: create_session(model, runtime) for model_id, model in registry.models.items()}
    return Models(registry=registry, sessions=sessions)


def output_identity(settings: Settings) -> OutputIdentity:
    """The node as the device that writes outputs; its UID is stable for a UID root and AE title."""
    root = settings.outputs.uid_root
    return OutputIdentity(
        uid_root=root,
        device_name=settings.dicom.ae_title,
        device_uid=generate_uid(prefix=root, entropy_srcs=["pacs-node device", settings.dicom.ae_title]),
        software_version=__version__,
        institution_name=settings.outputs.institution_name,
    )


def build_node(settings: Settings) -> Node:
    """Wire a node from settings; nothing listens until ``start()``."""
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    rules = load_rules(settings.routing.rules_file)
    models = load_models(settings)
    known = set(models.registry.models) | set(models.registry.refused)
    try:
        check_models(rules, known)
    except ConfigError as exc:
        if settings.models.strict:
            raise
        log.warning("%s; series routed to it will be recorded as not routed", exc)
    engine = make_engine(settings.storage.url)
    spool = Spool(
        settings.storage.spool_dir,
        fsync=settings.storage.fsync,
        min_free_bytes=settings.storage.min_free_mb * 2**20,
    )
    committer = IngestCommitter(engine, spool, duplicates=settings.storage.duplicates)
    metrics = NodeMetrics()
    metrics.watch_store(engine, models.registry)
    audit = build_audit(settings)
    scp = StorageSCP(settings.dicom, spool, committer, metrics, budget=settings.limits.budget(), audit=audit)
    destinations = {
        d.name: (d, make_destination(d, calling_aet=settings.dicom.ae_title, metrics=metrics))
        for d in settings.destinations
    }
    destinations = {n: (d, audit.wrap(d, dest)) for n, (d, dest) in destinations.items()}  # Results exported
    preparer = preparation_pool(settings)
    runner = Runner(
        engine,
        settings,
        rules,
        models,
        output_identity(settings),
        destinations,
        metrics=metrics,
        preparer=preparer,
    )
    notifier = WebhookNotifier(engine, settings)
    return Node(
        settings,
        engine,
        spool,
        committer,
        scp,
        runner,
        models,
        rules,
        notifier,
        metrics,
        preparer=preparer,
        audit=audit,
    )


def preparation_pool(settings: Settings) -> PreparePool | None:
    """The child processes that decode and prepare images (one per worker, one for the inference
    API), started on first use; None when ``limits.decode_memory_mib`` is 0 (in-process)."""
    memory = settings.limits.decode_memory()
    if memory == 0:
        log.warning("limits.decode_memory_mib is 0: images are decoded in the node's own process")
        return None
    return PreparePool(settings.runner.workers + 1, memory, settings.limits.decode_timeout_s)
