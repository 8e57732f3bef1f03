"""Spool files no row points to, set aside when the node starts (issue 21, item 11).

Such files are left by a store killed between writing its file and committing its row (never
acknowledged), or by versions before duplicates were settled (a SOP Instance UID resent under
another study or series UID was acknowledged and its file dropped by the database). They are
moved, not deleted, to ``data/quarantine/<study>/<series>/`` (same layout as the spool): some of
them were acknowledged, and may hold the only copy of what a sender sent. Nothing reads or prunes
the quarantine; remove it by hand once you have looked.

Only files older than ``storage.orphan_grace_s`` are considered, so that a file another process
sharing the spool is writing (or is about to commit a row for) right now is never moved; the
sweep runs before this node's SCP listens, so none of its own stores is in flight.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import Engine

from node.store.tables import Instance

log = logging.getLogger(__name__)
_INSTANCE = Instance.__table__  # type: ignore[attr-defined]
_SAFE_UID = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True, slots=True)
class Sweep:
    """What a sweep found and did."""

    files: int  # files older than the grace period that no row points to
    bytes: int
    moved: int
    folders_removed: int


def _recorded(engine: Engine, study: str, series: str) -> set[str]:
    """The spool paths the rows of one series folder point to."""
    c = _INSTANCE.c
    if _SAFE_UID.match(study) and _SAFE_UID.match(series):  # the folders are the UIDs: indexed
        query = select(c.path).where(c.series_uid == series, c.study_uid == study)
    else:  # a folder named by a digest of a malformed UID
        prefix = f"{study}/{series}/".replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = select(c.path).where(c.path.like(prefix + "%", escape="\\"))
    with engine.connect() as db:
        return {str(p) for p in db.execute(query).scalars()}


def _move(source: Path, target: Path) -> None:
    """Move a file into the quarantine, never over another file there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while target.exists():
        target = target.with_name(f"{target.name}.{n}")
        n += 1
    try:
        os.rename(source, target)
    except OSError:  # another file system
        shutil.move(source, target)


def sweep_orphans(engine: Engine, spool_root: Path, quarantine: Path, grace_s: float) -> Sweep:
    """Move spool files older than ``grace_s`` that no instance row points to into
    ``quarantine``, and remove spool folders left empty (older than ``grace_s`` too). Logs the
    counts (never a UID or a name)."""
    started = time.monotonic()
    oldest = time.time() - grace_s
    files = size = moved = folders = 0
    if not spool_root.is_dir():
        return Sweep(0, 0, 0, 0)
    for study_dir in sorted(p for p in spool_root.iterdir() if p.is_dir() and p.name != ".tmp"):
        emptied_study = False
        for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
            old = [
                (entry.name, st.st_size)
                for entry in os.scandir(series_dir)
                if entry.is_file(follow_symlinks=False) and (st := entry.stat()).st_mtime < oldest
            ]
            emptied = False
            if old:
                recorded = _recorded(engine, study_dir.name, series_dir.name)
                for name, bytes_ in old:
                    relative = f"{study_dir.name}/{series_dir.name}/{name}"
                    if relative in recorded:
                        continue
                    files += 1
                    size += bytes_
                    try:
                        _move(series_dir / name, quarantine / relative)
                        moved += 1
                        emptied = True
                    except OSError as exc:
                        log.warning("could not move a spool file no row points to: %s", exc.strerror)
            removed = _remove_if_empty(series_dir, time.time() if emptied else oldest)
            folders += removed
            emptied_study = emptied_study or bool(removed)
        folders += _remove_if_empty(study_dir, time.time() if emptied_study else oldest)
    if files or folders:
        log.warning(
            "spool: moved %d of %d files no row points to (%.1f MiB, older than %.0f s) to %s and "
            "removed %d empty folders, in %.1f s",
            moved,
            files,
            size / 2**20,
            grace_s,
            quarantine,
            folders,
            time.monotonic() - started,
        )
    return Sweep(files, size, moved, folders)


def _remove_if_empty(folder: Path, oldest: float) -> int:
    """Remove ``folder`` when it is empty and was last changed before ``oldest``; 1 if removed."""
    try:
        if folder.stat().st_mtime > oldest or any(folder.iterdir()):
            return 0
        folder.rmdir()
    except OSError:  # not empty any more, or gone
        return 0
    return 1
