"""The app factory: settings -> store -> spool -> models -> rules -> SCP -> runner -> FastAPI.
Nothing starts at import."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from fastapi import FastAPI
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
from node.outputs.identity import node_device_uid
from node.pipeline.route import RuleSet, check_models, load_rules
from node.prometheus import NodeMetrics
from node.redact import redact_library_logs
from node.runner import Models, Runner
from node.runner.one_file import Outcome, Progress, analyse_upload
from node.runner.shared_files import Prefetcher, SharedFiles
from node.send import make_destination
from node.send.webhook import WebhookNotifier
from node.settings import Settings
from node.store import cluster
from node.store.db import make_engine, ping
from node.store.objects import ObjectStore, ObjectStoreUnreachable
from node.store.orphans import sweep_orphans
from node.store.tables import utcnow
from node.store.uploads import Uploader
from node.types import OutputIdentity

log = logging.getLogger(__name__)
#: What each role of ``pacs-node serve --role`` runs (the heartbeat and the web pages run in all).
ROLE_PARTS: dict[str, tuple[str, ...]] = {
    "all": ("receiver", "scheduler", "workers", "sender"),
    "receiver": ("receiver", "scheduler"),  # the DICOM listener, the committer, assembly and routing
    "worker": ("workers",),
    "sender": ("sender",),  # the outbox and the webhook notifications
}


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
    role: str = "all"
    audit: AuditTrail = field(default_factory=AuditTrail.disabled)
    objects: ObjectStore | None = None  # storage.object_store: the bytes nodes share
    uploader: Uploader | None = None  # a receiver's uploads to it
    prefetcher: Prefetcher | None = None  # a worker's fetches of the queued jobs' files

    @property
    def parts(self) -> tuple[str, ...]:
        """What this node's role runs (see ROLE_PARTS)."""
        return ROLE_PARTS[self.role]

    def start(self) -> None:
        """Register in the cluster (refused when the running nodes see another data folder); a
        receiver prepares the spool (sets aside files no row points to) and starts committing
        and listening; then the runner's parts of the role."""
        storage = self.settings.storage
        if self.objects is not None:
            try:  # refused credentials or a missing bucket: a clear error at start
                self.objects.check()
            except ObjectStoreUnreachable as exc:  # down for now: receive anyway, upload once it is back
                log.warning("%s; starting anyway: series are routed once their instances are uploaded", exc)
        cluster.register(
            self.engine,
            self.runner.node_id,
            self.objects.identity  # with an object store, separate data folders are fine
            if self.objects is not None
            else cluster.storage_id(storage.data_dir, self.settings.cluster.storage_id),
            self.role,
            self.version,
            utcnow(),
            self.settings.cluster.lease_s,
        )
        if "receiver" in self.parts:
            self.spool.prepare(storage.orphan_grace_s)
            sweep_orphans(
                self.engine, self.spool.root, storage.data_dir / "quarantine", storage.orphan_grace_s
            )
            self.committer.start()
            if self.uploader is not None:
                self.uploader.start()
            self.scp.start()
        self.runner.start([p for p in self.parts if p != "receiver"])
        if self.prefetcher is not None:
            self.prefetcher.start()
        if self.notifier is not None and "sender" in self.parts:
            self.notifier.start()
        self.started_at = time.time()
        self.audit.open()  # Application Start

    def analyse_upload(
        self, data: bytes, deadline: float, progress: Progress | None = None
    ) -> tuple[str, list[Outcome]]:
        """One uploaded file through routing, the models and heatmap rendering (the inference API
        and the "Analyse a file" page); ``progress`` is told each step as it starts."""
        return analyse_upload(
            self.rules,
            self.models,
            data,
            deadline,
            budget=self.settings.limits.budget(),
            preparer=self.preparer,
            progress=progress,
        )

    def stop(self) -> None:
        """Stop listening first, so that every accepted instance is committed before the end."""
        self.scp.stop()
        if self.prefetcher is not None:
            self.prefetcher.stop()
        self.runner.stop()
        if self.notifier is not None:
            self.notifier.stop()
        self.committer.stop()
        if self.uploader is not None:  # after the committer: what it committed is uploaded next start
            self.uploader.stop()
        if self.objects is not None:
            self.objects.close()
        if self.preparer is not None:
            self.preparer.close()
        try:
            cluster.stopped(self.engine, self.runner.node_id, utcnow())
        except Exception:  # the database is gone: the heartbeat going stale says the same
            log.warning("could not record the stop in the database", exc_info=True)
        self.audit.shutdown()  # Application Stop
        self.engine.dispose()

    def ready(self) -> dict[str, bool]:
        """Readiness of each dependency: the database answers, the DICOM port listens and has a
        free association slot, and the spool's disk is above its watermark (below it every
        C-STORE is refused)."""
        checks = {"database": ping(self.engine)}
        if "receiver" in self.parts:  # the other roles do not listen
            checks.update(
                dicom=self.scp.is_listening(),
                dicom_slots=self.scp.has_free_slot(),
                disk=self.spool.has_room(),
            )
        return checks

    def gpu_description(self) -> str:
        """The GPU's name and memory (nvidia-smi), for the status page; empty without one."""
        from node.inference.runtime import gpu_description

        return gpu_description()

    def web_app(self) -> FastAPI:
        """The FastAPI application bound to this node."""
        from node.web.factory import create_web_app

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
        device_uid=node_device_uid(root, settings.dicom.ae_title),
        software_version=__version__,
        institution_name=settings.outputs.institution_name,
    )


def check_role(settings: Settings, role: str) -> None:
    """Raise ConfigError for an unknown role, or a role other than ``all`` on SQLite: the roles
    of one deployment share their state through one PostgreSQL database."""
    if role not in ROLE_PARTS:
        raise ConfigError(f"unknown role {role!r}: one of {', '.join(ROLE_PARTS)}")
    if role != "all" and settings.storage.url.startswith("sqlite"):
        raise ConfigError(
            f"role {role!r} needs the other roles' database: set storage.database_url to a shared "
            "PostgreSQL database (postgresql+psycopg://...); on SQLite one process runs every role "
            "(--role all, the default)"
        )
    if settings.dicom.reuse_port and settings.storage.url.startswith("sqlite"):
        raise ConfigError(
            "dicom.reuse_port lets several processes receive on one port, and they share their "
            "state through one PostgreSQL database: set storage.database_url (postgresql+psycopg://...), "
            "or leave dicom.reuse_port off (one process on SQLite)"
        )


def build_node(settings: Settings, role: str = "all") -> Node:
    """Wire a node from settings for ``role`` (all, receiver, worker, sender); nothing listens
    until ``start()``."""
    check_role(settings, role)
    redact_library_logs()  # pydicom quotes invalid values (a birth date) in its warnings
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    rules = load_rules(settings.routing.rules_file)
    if role == "sender":  # sends what workers wrote: no model session needed
        models = Models(load_registry(settings.models.directory, strict=settings.models.strict), {})
    else:
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
    objects = ObjectStore(settings.storage.object_store) if settings.storage.object_store else None
    shared = None
    if objects is not None:
        cache_bytes = settings.storage.object_store.cache_mb * 2**20  # type: ignore[union-attr]
        shared = SharedFiles(objects, settings.storage.data_dir, settings.storage.spool_dir, cache_bytes)
    runner = Runner(
        engine,
        settings,
        rules,
        models,
        output_identity(settings),
        destinations,
        metrics=metrics,
        preparer=preparer,
        shared=shared,
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
        role=role,
        audit=audit,
        objects=objects,
        uploader=Uploader(engine, objects, spool.root)
        if objects is not None and role in ("all", "receiver")
        else None,
        prefetcher=Prefetcher(engine, shared, spool.root, 2 * settings.runner.workers)
        if shared is not None and role in ("all", "worker")
        else None,
    )


def preparation_pool(settings: Settings) -> PreparePool | None:
    """The child processes that decode and prepare images (``limits.prepare_processes``: by
    default one per core, at least one per worker and one for the inference API) at
    ``limits.prepare_niceness``, started on first use; None when ``limits.decode_memory_mib``
    is 0 (in-process)."""
    memory = settings.limits.decode_memory()
    if memory == 0:
        log.warning("limits.decode_memory_mib is 0: images are decoded in the node's own process")
        return None
    size = settings.limits.prepare_processes or max(settings.runner.workers + 1, os.cpu_count() or 1)
    return PreparePool(
        size, memory, settings.limits.decode_timeout_s, niceness=settings.limits.prepare_niceness
    )
