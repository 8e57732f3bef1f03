"""The app factory: settings -> store -> spool -> SCP -> runner -> FastAPI. Nothing starts at import."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from fastapi import FastAPI
from sqlalchemy.engine import Engine

from node import __version__
from node.dicom.committer import IngestCommitter
from node.dicom.scp import StorageSCP
from node.dicom.spool import Spool
from node.runner import Runner
from node.settings import Settings
from node.store.db import make_engine, ping

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
    started_at: float = field(default_factory=time.time)
    version: str = __version__

    def start(self) -> None:
        """Prepare the spool, then start committing, listening and assembling."""
        self.spool.prepare()
        self.committer.start()
        self.scp.start()
        self.runner.start()
        self.started_at = time.time()

    def stop(self) -> None:
        """Stop listening first, so that every accepted instance is committed before the end."""
        self.scp.stop()
        self.runner.stop()
        self.committer.stop()
        self.engine.dispose()

    def ready(self) -> dict[str, bool]:
        """Readiness of each dependency."""
        return {"database": ping(self.engine), "dicom": self.scp.is_listening()}

    def web_app(self) -> FastAPI:
        """The FastAPI application bound to this node."""
        from node.web.api import create_web_app

        return create_web_app(self)


def build_node(settings: Settings) -> Node:
    """Wire a node from settings; nothing listens until ``start()``."""
    settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.storage.url)
    spool = Spool(
        settings.storage.spool_dir,
        fsync=settings.storage.fsync,
        min_free_bytes=settings.storage.min_free_mb * 2**20,
    )
    committer = IngestCommitter(engine, spool)
    scp = StorageSCP(settings.dicom, spool, committer)
    runner = Runner(engine, settings.assembly)
    return Node(settings, engine, spool, committer, scp, runner)
