"""The receiver's uploader (``storage.object_store``): every committed instance whose file is in
this node's spool is put to the object store, then marked ``uploaded_at``. Routing waits until
every instance of a series is marked (node/runner/jobs.py), so a worker on another machine always
finds the files. The spool stays the point where a C-STORE succeeds; an upload that fails is
tried again on the next pass (nothing is marked), so a store that is down delays routing, never
loses an instance."""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from node.store.objects import ObjectStore, instance_key
from node.store.tables import Instance, utcnow

log = logging.getLogger(__name__)


def upload_pending(
    engine: Engine, store: ObjectStore, spool_root: Path, now: datetime, batch: int = 500
) -> int:
    """Upload (parallel PUTs) the not yet uploaded instances whose files this node holds, and mark
    them; returns how many. Rows are claimed with FOR UPDATE SKIP LOCKED while they are uploaded,
    so two receivers sharing a spool do not both put them (a second put would be harmless)."""
    with Session(engine) as session:
        local: list[str] = []
        after = ""
        while len(local) < batch:  # pages of the rows not uploaded; other receivers' files are skipped
            page = list(
                session.exec(
                    select(Instance.sop_instance_uid, Instance.path)
                    .where(col(Instance.uploaded_at).is_(None), col(Instance.sop_instance_uid) > after)
                    .order_by(col(Instance.sop_instance_uid))
                    .limit(batch * 4)
                )
            )
            if not page:
                break
            local += [uid for uid, path in page if (spool_root / path).is_file()]
            after = page[-1][0]
        local = local[:batch]
        if not local:
            return 0
        claimed = list(
            session.exec(
                select(Instance.sop_instance_uid, Instance.path)
                .where(col(Instance.sop_instance_uid).in_(local), col(Instance.uploaded_at).is_(None))
                .with_for_update(skip_locked=True)
            )
        )
        store.put_many([(instance_key(path), spool_root / path) for _, path in claimed])
        session.exec(
            update(Instance)
            .where(col(Instance.sop_instance_uid).in_([uid for uid, _ in claimed]))
            .values(uploaded_at=now)
        )
        session.commit()
    log.info("object store: %d instances uploaded", len(claimed))
    return len(claimed)


class Uploader:
    """A thread that runs :func:`upload_pending` every ``interval_s`` (and at once after a pass
    that found work)."""

    def __init__(self, engine: Engine, store: ObjectStore, spool_root: Path, interval_s: float = 0.5) -> None:
        self._engine = engine
        self._store = store
        self._spool_root = spool_root
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start uploading."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="uploader", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                done = upload_pending(self._engine, self._store, self._spool_root, utcnow())
            except Exception as exc:  # the store or the database is down: tried again
                log.warning("object store: upload pass failed, retrying: %s", exc)
                done = 0
            if not done:
                self._stop.wait(self._interval_s)

    def stop(self) -> None:
        """Finish the current pass and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
