"""Group commit for ingest: one thread fsyncs the touched spool folders and commits the rows of
all instances received concurrently in one transaction, then releases their C-STORE responses.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session

from node.dicom.spool import Spool
from node.errors import StoreError
from node.store.received import ReceivedInstance, record_instances, recorded_path

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    record: ReceivedInstance
    dirs: set[Path]
    done: threading.Event = field(default_factory=threading.Event)
    new: bool = False
    error: BaseException | None = None


class IngestCommitter:
    """Batches the durable tail of concurrent C-STOREs: directory fsyncs and row commits."""

    def __init__(self, engine: Engine, spool: Spool, max_batch: int = 512) -> None:
        self._engine = engine
        self._spool = spool
        self._max_batch = max_batch
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.committed = 0

    def start(self) -> None:
        """Start the commit thread."""
        self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def commit(self, record: ReceivedInstance, dirs: set[Path], timeout: float = 60.0) -> bool:
        """Make ``record`` durable with its folders; True when the instance was new.

        Raises StoreError when the batch could not be committed or the committer did not answer.
        """
        if self._thread is None:
            raise StoreError("ingest committer is not running")
        pending = _Pending(record, dirs)
        self._queue.put(pending)
        if not pending.done.wait(timeout):
            raise StoreError(f"ingest commit did not finish within {timeout:.0f} s")
        if pending.error is not None:
            raise StoreError(f"could not commit the instance: {pending.error}") from pending.error
        return pending.new

    def recorded_path(self, sop_instance_uid: str) -> str | None:
        """The spool path a committed row of the instance points to, None when no row exists.
        Raises StoreError when the database cannot tell."""
        try:
            with Session(self._engine) as session:
                return recorded_path(session, sop_instance_uid)
        except Exception as exc:  # the database is what just failed, most likely
            raise StoreError(f"cannot look the instance up: {str(exc).splitlines()[0]}") from exc

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit_batch(batch)

    def _commit_batch(self, batch: list[_Pending]) -> None:
        try:
            self._spool.sync_dirs(d for p in batch for d in p.dirs)
            with Session(self._engine) as session:
                new = record_instances(session, [p.record for p in batch])
                session.commit()
        except Exception as exc:  # every waiting C-STORE must get an answer, whatever failed
            log.error("ingest commit of %d instances failed: %s", len(batch), str(exc).splitlines()[0])
            for pending in batch:
                pending.error = exc
                pending.done.set()
            return
        self.batches += 1
        self.committed += len(new)
        for pending in batch:
            pending.new = pending.record.sop_instance_uid in new
            pending.done.set()
