"""The runner's side of the object store (``storage.object_store``, docs/scale.md): received files
a job (or routing) needs that are not in this node's spool are fetched into the local cache with
parallel GETs; the outputs a worker writes are put to the store before they are queued, and a
sender fetches the outputs it lacks into its data folder before sending them."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from node.runner.jobs import StoredFile, job_stored_files
from node.store.objects import ObjectCache, ObjectMissing, ObjectStore, instance_key
from node.store.tables import Job, JobState, OutboxItem

log = logging.getLogger(__name__)


class SharedFiles:
    """Files exchanged through one object store by the nodes of one database."""

    def __init__(self, store: ObjectStore, data_dir: Path, spool_root: Path, cache_bytes: int) -> None:
        self.store = store
        self._data_dir = data_dir
        self._spool_root = spool_root
        self.cache = ObjectCache(store, data_dir / "cache", cache_bytes)

    def localise(self, stored: list[StoredFile]) -> list[StoredFile]:
        """``stored`` with each file that is not in this spool replaced by its cached copy
        (fetched, in parallel, when not cached yet). Raises ObjectStoreError (transient: the job is
        retried) when the store cannot give one."""
        away = {
            f.path: instance_key(f.path.relative_to(self._spool_root).as_posix())
            for f in stored
            if not f.path.is_file()
        }
        if not away:
            return stored
        local = self.cache.ensure(list(away.values()))
        return [dataclasses.replace(f, path=local[away[f.path]]) if f.path in away else f for f in stored]

    def done_with(self, stored: Sequence[StoredFile]) -> None:
        """A job ended: trim the cache to its bound (the job's own copies go first only if needed)."""
        removed = self.cache.trim()
        if removed:
            log.info("object cache: %.1f MB of older copies removed", removed / 1e6)

    def put_outputs(self, paths: Sequence[Path]) -> None:
        """Upload a job's output files (keys: their path in the data folder) before they are queued,
        so that any sender can send them."""
        self.store.put_many([(p.relative_to(self._data_dir).as_posix(), p) for p in paths])

    def fetch_outputs(self, items: Sequence[OutboxItem]) -> None:
        """Fetch into this data folder the outputs of ``items`` that another node wrote. One that
        cannot be fetched is left missing: the send then parks it, naming the file (a store that
        is down raises, and the batch is tried again)."""
        missing = [
            (i.path, self._data_dir / i.path) for i in items if not (self._data_dir / i.path).is_file()
        ]
        if missing:
            self.store.parallel(self._fetch_output, missing)

    def _fetch_output(self, name: str, dest: Path) -> None:
        try:
            self.store.get(name, dest)
        except ObjectMissing as exc:
            log.error("output not in the object store (it will be parked as missing): %s", exc)


class Prefetcher:
    """A worker's thread that fetches the files of the next queued jobs into the cache while they
    wait (the oldest ``depth`` queued jobs, every ``interval_s``), so that a job claimed later finds
    them local. Nothing is claimed: two workers may both fetch a job's files (each its own cache)."""

    def __init__(
        self, engine: Engine, shared: SharedFiles, spool_root: Path, depth: int, interval_s: float = 0.5
    ) -> None:
        self._engine = engine
        self._shared = shared
        self._spool_root = spool_root
        self._depth = depth
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def prefetch_once(self) -> int:
        """Fetch what the next queued jobs lack; returns how many files were not local."""
        with Session(self._engine) as session:
            queued = list(
                session.exec(
                    select(Job).where(Job.state == JobState.QUEUED).order_by(col(Job.id)).limit(self._depth)
                )
            )
            stored = [f for job in queued for f in job_stored_files(session, job, self._spool_root)]
        away = [f for f in stored if not f.path.is_file()]
        if away:
            self._shared.localise(away)
        return len(away)

    def start(self) -> None:
        """Start prefetching."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="prefetch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.prefetch_once()
            except Exception as exc:  # the store is down: the job fetches (and retries) itself
                log.warning("object store: prefetch failed: %s", exc)
            self._stop.wait(self._interval_s)

    def stop(self) -> None:
        """Stop prefetching."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
