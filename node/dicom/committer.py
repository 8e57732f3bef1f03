"""Group commit for ingest: one thread fsyncs the touched spool folders and commits the rows of
all instances received concurrently in one transaction, then releases their C-STORE responses.

It also settles what a second copy of a known SOP Instance UID means (issue 21, item 9). A copy
with the same bytes (or the same data set from another sender) is a plain resend: acknowledged,
nothing recorded. Any other copy is a duplicate, recorded as a DuplicateEvent row and handled by
``storage.duplicates``:

- ``keep_first`` (default): answered success, the stored copy stays;
- ``keep_last``: the new copy is written beside the stored one, the row points to it once
  committed, the old file is removed and the series is reopened (it completes and is routed
  again, and its jobs run again over the new copy);
- ``refuse``: answered 0x0111 Duplicate SOP Instance (PS3.7 Annex C: the instance was not
  stored because one with that SOP Instance UID exists), the stored copy stays.

A copy filed under another study or series UID than the stored instance is never moved across
(whatever the setting): it is recorded with the conflict named, refused under ``refuse`` and kept
first otherwise; its file and any study or series row made for it are removed, so that nothing
is left that no row points to. A file no committed row points to is removed by the store that
made it, after the commit (under the SCP's per-instance lock: nobody else files that UID then).
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from node.dicom import status
from node.dicom.spool import Chunk, Spool
from node.errors import IngestError, StoreError
from node.store.integrity import chunks_dataset_sha256, chunks_sha256, dataset_sha256, file_sha256
from node.store.received import (
    ReceivedInstance,
    StoredInstance,
    record_instances,
    recorded_path,
    replace_instance,
    stored_instances,
)
from node.store.tables import DuplicateAction, DuplicateEvent

log = logging.getLogger(__name__)

# the commit thread keeps its connection while batches follow each other within this many seconds
KEEP_CONNECTION_S = 1.0

DuplicatePolicy = Literal["keep_first", "keep_last", "refuse"]


@dataclass(slots=True)
class _Pending:
    record: ReceivedInstance
    dirs: set[Path]
    chunks: Sequence[Chunk] | None = None
    created: bool = True  # the file at record.path was written by this store
    repair: bool = False  # the stored file changed on disk; this copy has its recorded bytes
    done: threading.Event = field(default_factory=threading.Event)
    new: bool = False
    refused: str | None = None  # the error comment of a refused duplicate
    error: BaseException | None = None


class IngestCommitter:
    """Batches the durable tail of concurrent C-STOREs: directory fsyncs and row commits."""

    def __init__(
        self, engine: Engine, spool: Spool, max_batch: int = 512, duplicates: DuplicatePolicy = "keep_first"
    ) -> None:
        self._engine = engine
        self._spool = spool
        self._max_batch = max_batch
        self.duplicates: DuplicatePolicy = duplicates
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._db: Connection | None = None  # the commit thread's own (see _connection)
        self._db_used = 0.0
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

    def commit(
        self,
        record: ReceivedInstance,
        dirs: set[Path],
        chunks: Sequence[Chunk] | None = None,
        created: bool = True,
        timeout: float = 60.0,
    ) -> bool:
        """Make ``record`` durable with its folders; True when the instance was new.

        ``chunks``: the bytes of the file as received (its SHA-256 is recorded, and a copy of a
        known instance is compared with the stored one); ``created``: whether this store wrote the
        file at ``record.path`` (False: a file was there already). The caller holds the SCP's
        lock of the SOP Instance UID. Raises IngestError (0x0111) for a duplicate refused by
        ``storage.duplicates: refuse``, StoreError when the batch could not be committed or the
        committer did not answer.
        """
        if self._thread is None:
            raise StoreError("ingest committer is not running")
        if chunks is not None and record.sha256 is None:
            record = dataclasses.replace(record, sha256=chunks_sha256(chunks))
        beside: Path | None = None
        repair = False
        if chunks is not None and not created:
            record, dirs, beside, repair = self._place_beside(record, dirs, chunks)
        pending = _Pending(record, dirs, chunks, created or beside is not None, repair)
        self._queue.put(pending)
        if not pending.done.wait(timeout):
            raise StoreError(f"ingest commit did not finish within {timeout:.0f} s")
        if pending.error is not None:
            if beside is not None:
                self._remove_unrecorded(beside, record.sop_instance_uid)
            raise StoreError(f"could not commit the instance: {pending.error}") from pending.error
        if pending.refused is not None:
            raise IngestError(status.DUPLICATE_SOP_INSTANCE, pending.refused)
        return pending.new

    def recorded_path(self, sop_instance_uid: str) -> str | None:
        """The spool path a committed row of the instance points to, None when no row exists.
        Raises StoreError when the database cannot tell."""
        try:
            with Session(self._engine) as session:
                return recorded_path(session, sop_instance_uid)
        except Exception as exc:  # the database is what just failed, most likely
            raise StoreError(f"cannot look the instance up: {str(exc).splitlines()[0]}") from exc

    def _place_beside(
        self, record: ReceivedInstance, dirs: set[Path], chunks: Sequence[Chunk]
    ) -> tuple[ReceivedInstance, set[Path], Path | None, bool]:
        """A file was at ``record.path`` before this store. Write this copy beside it, and point
        the record there, when that file holds other bytes and this copy must be kept: no row
        points to the file (an interrupted store left it), the row's file changed on disk since
        it was received and this copy has the recorded bytes (a resend repairs it), or keep_last.
        Returns the record, the folders to fsync, the file written (None: none) and whether this
        copy repairs a damaged stored file."""
        uid = record.sop_instance_uid
        try:
            with Session(self._engine) as session:
                row = stored_instances(session, [uid]).get(uid)
        except Exception as exc:  # the database is what just failed, most likely
            raise StoreError(f"cannot look the instance up: {str(exc).splitlines()[0]}") from exc
        if record.sha256 is None or (row is not None and row.path != record.path):
            return record, dirs, None, False  # settled in the batch (a conflict, a kept copy)
        on_disk = file_sha256(self._spool.root / record.path)
        if on_disk == record.sha256:
            return record, dirs, None, False  # the same bytes: a plain resend
        repair = row is not None and row.sha256 == record.sha256  # the stored file changed on disk
        if row is not None and not repair and self.duplicates != "keep_last":
            return record, dirs, None, False  # other content: kept first or refused in the batch
        relative = self._spool.beside(Path(record.path), record.sha256)
        if not self._spool.exists(relative):
            self._spool.check_space(record.byte_size)
        written = self._spool.write(relative, chunks)
        placed = dataclasses.replace(record, path=str(relative))
        return placed, dirs | (written or set()), relative if written is not None else None, repair

    def _remove_unrecorded(self, relative: Path, sop_instance_uid: str) -> None:
        """Remove a file this store wrote whose row could not be committed, unless a committed row
        points to it or the database cannot tell."""
        try:
            if self.recorded_path(sop_instance_uid) == str(relative):
                return
            self._spool.remove(relative)
        except (StoreError, OSError) as exc:
            log.warning("kept a spool file whose row could not be committed: %s", exc)

    def _run(self) -> None:
        try:
            self._run_batches()
        finally:
            self._drop_connection()

    def _connection(self) -> Connection:
        """The commit thread's connection, kept from one batch to the next while they follow
        within KEEP_CONNECTION_S (checking one out of the pool and back cost ~0.2 ms of CPU per
        batch); after a pause, or a failed batch, one checked out of the pool again (which pings
        it first on PostgreSQL)."""
        now = time.monotonic()
        if self._db is not None and now - self._db_used > KEEP_CONNECTION_S:
            self._drop_connection()
        if self._db is None:
            self._db = self._engine.connect()
        self._db_used = now
        return self._db

    def _drop_connection(self) -> None:
        """Close the kept connection (after a failure, or when stopping)."""
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except Exception as exc:  # a broken connection: the pool discards it
                log.debug("closing the ingest connection: %s", exc)

    def _run_batches(self) -> None:
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
            # a connection in a transaction, no ORM session (the session cost ~0.4 ms of CPU per
            # batch: with one association every batch is one instance); committed on leaving
            db = self._connection()
            with db.begin():
                new = record_instances(db, [p.record for p in batch])
                inserted: set[int] = set()
                seen: set[str] = set()
                for p in batch:  # the first copy of each new UID in the batch is the one inserted
                    uid = p.record.sop_instance_uid
                    if uid in new and uid not in seen:
                        inserted.add(id(p))
                    seen.add(uid)
                duplicates = [p for p in batch if id(p) not in inserted]
                stale = self._settle_duplicates(db, duplicates) if duplicates else []
        except Exception as exc:  # every waiting C-STORE must get an answer, whatever failed
            self._drop_connection()  # the next batch starts on a fresh connection
            log.error("ingest commit of %d instances failed: %s", len(batch), str(exc).splitlines()[0])
            for pending in batch:
                pending.error = exc
                pending.done.set()
            return
        for relative in stale:  # files no committed row points to any more
            try:
                self._spool.remove(relative)
            except OSError as exc:
                log.warning("could not remove a spool file no row points to: %s", exc.strerror)
        self.batches += 1
        self.committed += len(new)
        for pending in batch:
            pending.new = id(pending) in inserted
            pending.done.set()

    def _settle_duplicates(self, db: Connection, duplicates: list[_Pending]) -> list[str]:
        """Decide each copy of a known instance (see the module docstring), record the duplicate
        events (in the transaction of ``db``, committed by the caller); return the spool files to
        remove once committed."""
        # a session on the batch's connection for the DuplicateEvent rows: it joins the
        # connection's transaction and neither commits nor rolls it back (flushed below)
        with Session(bind=db) as session:
            stale = self._settle_all(session, duplicates)
            session.flush()
        return stale

    def _settle_all(self, session: Session, duplicates: list[_Pending]) -> list[str]:
        rows = stored_instances(session, [p.record.sop_instance_uid for p in duplicates])
        stale: list[str] = []
        for p in duplicates:
            r = p.record
            stored = rows.get(r.sop_instance_uid)
            if stored is None:  # cannot be: the insert of this UID conflicted with a row
                log.error("a duplicate instance has no row to compare with; its file is kept")
                continue
            final = self._settle(session, p, stored)
            if r.path != final:
                stale.append(r.path)
            if stored.path != final:
                stale.append(stored.path)
        return stale

    def _settle(self, session: Session, p: _Pending, stored: StoredInstance) -> str:
        """Settle one copy of a known instance; return the path the instance's row points to."""
        r = p.record
        conflict = ""
        if stored.study_uid != r.study_uid:
            conflict = "study UID differs"
        elif stored.series_uid != r.series_uid:
            conflict = "series UID differs"
        if not conflict and p.created and r.path == stored.path:
            # the stored file was gone (spool.exists said so): this copy took its place
            if r.sha256 is not None and r.sha256 == stored.sha256:
                log.warning("a resent instance restored its stored file, which was missing")
                return stored.path
            replace_instance(session, r, stored)
            self._event(session, p, stored, DuplicateAction.REPLACED, "stored file was missing", True)
            return r.path
        if p.repair and r.path != stored.path and r.sha256 == stored.sha256:
            replace_instance(session, r, stored)
            log.warning("a resent instance replaced its stored file, which had changed on disk")
            return r.path
        differs = self._differs(p, stored)
        if conflict:
            action = DuplicateAction.REFUSED if self.duplicates == "refuse" else DuplicateAction.KEPT_FIRST
            self._event(session, p, stored, action, conflict, differs)
            if action == DuplicateAction.REFUSED:
                p.refused = f"SOP Instance UID already stored under another {conflict.split()[0]}"
            return stored.path
        if not differs:
            return stored.path  # a plain resend
        if self.duplicates == "keep_last" and r.path != stored.path:
            replace_instance(session, r, stored)
            self._event(session, p, stored, DuplicateAction.REPLACED, "", True)
            return r.path
        if self.duplicates == "refuse":
            self._event(session, p, stored, DuplicateAction.REFUSED, "", True)
            p.refused = "SOP Instance UID already stored with different content"
            return stored.path
        self._event(session, p, stored, DuplicateAction.KEPT_FIRST, "", True)
        return stored.path

    def _differs(self, p: _Pending, stored: StoredInstance) -> bool:
        """True when the copy's content differs from the stored instance's: its file's SHA-256
        differs, and so does its data set's (the File Meta group names the sender, so the same
        data set resent by another AE is the same content). Unknown bytes do not differ."""
        r = p.record
        if r.sha256 is None or p.chunks is None:
            return False
        path = self._spool.root / stored.path
        recorded = stored.sha256 or file_sha256(path)  # before hashes were recorded: the file's
        if recorded == r.sha256:
            return False
        return dataset_sha256(path) != chunks_dataset_sha256(p.chunks)

    def _event(
        self,
        session: Session,
        p: _Pending,
        stored: StoredInstance,
        action: DuplicateAction,
        conflict: str,
        differs: bool,
    ) -> None:
        r = p.record
        session.add(
            DuplicateEvent(
                received_at=r.received_at,
                sop_instance_uid=r.sop_instance_uid,
                study_uid=stored.study_uid,
                series_uid=stored.series_uid,
                received_study_uid=r.study_uid,
                received_series_uid=r.series_uid,
                calling_aet=r.calling_aet[:16],
                content_differs=differs,
                conflict=conflict,
                action=action.value,
                sha256=r.sha256,
                byte_size=r.byte_size,
            )
        )
        log.warning(
            "duplicate SOP instance from %s: %s%s; %s",
            r.calling_aet,
            "different content" if differs else "same content",
            f", {conflict}" if conflict else "",
            action.value,
        )
