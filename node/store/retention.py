"""Retention of the spool and the outputs: remove studies that are finished (every job done, every
output sent, or nothing routed) once they are older than a maximum age, and, below a free-space
watermark, the oldest finished studies until there is room again. Nothing still pending is touched.

Rows go first (one transaction per study), then the files: a crash in between leaves files without
rows, which are harmless, never rows that point at deleted files.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, exists
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from node.store.objects import ObjectStore, instance_key
from node.store.tables import (
    DuplicateEvent,
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
    SeriesState,
    Study,
)

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What a retention pass removed (or would remove, in a dry run)."""

    studies: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


def finished_studies(session: Session, received_before: datetime | None = None) -> list[Study]:
    """Studies with nothing left to do, oldest last reception first: complete, every series decided,
    every job done and every output of those jobs sent."""
    unfinished_job = exists().where(
        col(Job.study_uid) == col(Study.study_uid), col(Job.state) != JobState.DONE
    )
    unsent = exists().where(
        col(OutboxItem.job_id) == col(Job.id),
        col(Job.study_uid) == col(Study.study_uid),
        col(OutboxItem.state) != OutboxState.SENT,
    )
    undecided = exists().where(
        col(Series.study_uid) == col(Study.study_uid),
        col(Series.state).in_((SeriesState.RECEIVING, SeriesState.COMPLETE)),
    )
    query = (
        select(Study)
        .where(Study.state == "complete", ~unfinished_job, ~unsent, ~undecided)
        .order_by(col(Study.last_received_at))
    )
    if received_before is not None:
        query = query.where(col(Study.last_received_at) < received_before)
    return list(session.exec(query))


def _remove_study(
    engine: Engine,
    data_dir: Path,
    spool_dir: Path,
    study_uid: str,
    dry_run: bool,
    objects: ObjectStore | None = None,
) -> tuple[int, int]:
    with Session(engine) as session:
        job_ids = list(session.exec(select(Job.id).where(Job.study_uid == study_uid)))
        instances = list(session.exec(select(Instance.path).where(Instance.study_uid == study_uid)))
        outputs = list(session.exec(select(OutboxItem.path).where(col(OutboxItem.job_id).in_(job_ids))))
        files = [spool_dir / p for p in instances] + [data_dir / p for p in outputs]
        files = sorted(set(files))
        size = sum(f.stat().st_size for f in files if f.is_file())
        if dry_run:
            return len(files), size
        session.exec(delete(OutboxItem).where(col(OutboxItem.job_id).in_(job_ids)))
        session.exec(delete(Job).where(col(Job.study_uid) == study_uid))
        session.exec(delete(Instance).where(col(Instance.study_uid) == study_uid))
        session.exec(delete(Series).where(col(Series.study_uid) == study_uid))
        session.exec(delete(Study).where(col(Study.study_uid) == study_uid))
        session.exec(delete(DuplicateEvent).where(col(DuplicateEvent.study_uid) == study_uid))
        session.commit()
    if objects is not None:  # the shared copies (rows first: a crash leaves objects no row names)
        objects.delete_many([instance_key(p) for p in instances] + list(outputs))
    for path in files:
        path.unlink(missing_ok=True)
    for path in {
        f.parent for f in files
    }:  # the study's now-empty folders (spool/<study>/<series>, outbox/<job>)
        for folder in (path, path.parent):
            if folder not in (spool_dir, data_dir, data_dir / "outbox"):
                with contextlib.suppress(OSError):  # not empty, or already gone
                    folder.rmdir()
    return len(files), size


def prune(
    engine: Engine,
    data_dir: Path,
    spool_dir: Path,
    now: datetime,
    max_age: timedelta | None = None,
    min_free_bytes: int = 0,
    dry_run: bool = False,
    free_bytes: Callable[[], int] | None = None,
    objects: ObjectStore | None = None,
) -> PruneReport:
    """Remove finished studies older than ``max_age``; then, while free space on the data folder's
    disk is under ``min_free_bytes``, the oldest finished studies whatever their age. With
    ``objects`` (storage.object_store) their instances and outputs are deleted from it too."""
    free = free_bytes or (lambda: shutil.disk_usage(data_dir).free)
    report = PruneReport()

    def remove(study_uid: str) -> None:
        files, size = _remove_study(engine, data_dir, spool_dir, study_uid, dry_run, objects)
        report.studies.append(study_uid)
        report.files += files
        report.bytes += size

    if max_age is not None:
        with Session(engine) as session:
            old = [s.study_uid for s in finished_studies(session, received_before=now - max_age)]
        for uid in old:
            remove(uid)
    if min_free_bytes:
        with Session(engine) as session:
            candidates = [s.study_uid for s in finished_studies(session) if s.study_uid not in report.studies]
        freed = report.bytes if dry_run else 0
        for uid in candidates:
            if free() + freed >= min_free_bytes:
                break
            before = report.bytes
            remove(uid)
            if dry_run:
                freed += report.bytes - before
    if report.studies:
        log.info(
            "retention: %s %d studies (%d files, %.1f MB)",
            "would remove" if dry_run else "removed",
            len(report.studies),
            report.files,
            report.bytes / 1e6,
        )
    return report
