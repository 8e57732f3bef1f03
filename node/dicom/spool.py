"""The durable spool: received bytes go to a temporary file, are fsync'd, renamed into place, and
the directory is fsync'd, before anything is acknowledged.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from node.errors import StoreError
from node.files import fsync_dir

log = logging.getLogger(__name__)

_SAFE_UID = re.compile(r"^[0-9.]{1,64}$")
Chunk = bytes | bytearray | memoryview


class SpoolFullError(StoreError):
    """Free space is below the configured watermark; nothing was written."""


def safe_name(uid: str) -> str:
    """A file-system-safe name for a UID: the UID itself when it is well formed, else a digest."""
    if _SAFE_UID.match(uid) and uid.strip("."):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "replace")).hexdigest()[:40]


class Spool:
    """Files instances under ``root/<study>/<series>/<sop>.dcm``; temporary files under ``root/.tmp``."""

    def __init__(self, root: Path, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = root
        self.tmp_dir = root / ".tmp"
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes

    def prepare(self, grace_s: float = 3600.0) -> None:
        """Create the folders and remove temporary files a crash left behind (never acknowledged):
        those of a process that is gone, and any older than ``grace_s``. A temporary file is
        named after the process writing it, so that one a live process (another node on this
        spool) is writing right now is left alone."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        removed = 0
        oldest = time.time() - grace_s
        for leftover in self.tmp_dir.iterdir():
            try:
                old = leftover.stat().st_mtime < oldest
            except FileNotFoundError:
                continue
            if old or not _writer_alive(leftover.name):
                leftover.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d partial files left by an interrupted run", removed)

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives, relative to the spool root."""
        return Path(safe_name(study_uid), safe_name(series_uid), safe_name(sop_instance_uid) + ".dcm")

    @staticmethod
    def beside(relative: Path, sha256: str) -> Path:
        """The name for another copy of an instance (different bytes under one SOP Instance UID),
        next to where the first one lives: ``<sop>.<first 16 hex of its SHA-256>.dcm``."""
        return relative.with_name(f"{relative.name.removesuffix('.dcm')}.{sha256[:16]}.dcm")

    def exists(self, relative: Path) -> bool:
        """True when an instance file is already in place."""
        return (self.root / relative).is_file()

    def has_room(self) -> bool:
        """True while the spool's disk is above its free-space watermark (instances can be stored)."""
        try:
            return shutil.disk_usage(self.root).free >= self.min_free_bytes
        except OSError:
            return False

    def check_space(self, size: int) -> None:
        """Raise SpoolFullError when writing ``size`` bytes would cross the free-space watermark."""
        free = shutil.disk_usage(self.root).free
        if free - size < self.min_free_bytes:
            raise SpoolFullError(
                f"free space {free // 2**20} MiB minus {size} bytes is below the "
                f"{self.min_free_bytes // 2**20} MiB watermark"
            )

    def write(self, relative: Path, chunks: Sequence[Chunk]) -> set[Path] | None:
        """Write ``chunks`` durably at ``relative`` as a new file and return the directories still
        to fsync; None, writing nothing, when a file is already in place there (another store
        wrote it: it is never replaced, so that an acknowledged file is never touched).

        The file is complete and fsync'd under its final name when this returns; the caller fsyncs
        the returned directories (grouped across concurrent stores) before acknowledging.
        """
        final = self.root / relative
        dirs = self._make_parents(final.parent)
        tmp = self.tmp_dir / f"{os.getpid()}-{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            if not self._place(tmp, final):
                return None
        finally:
            tmp.unlink(missing_ok=True)
        dirs.add(final.parent)
        return dirs if self.fsync else set()

    @staticmethod
    def _place(tmp: Path, final: Path) -> bool:
        """Give ``tmp`` the name ``final`` unless that name exists (False then): a hard link
        fails atomically on an existing name, where a rename would replace it."""
        try:
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError as exc:  # a file system without hard links: check, then rename
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            if final.exists():
                return False
            os.replace(tmp, final)
        return True

    def _make_parents(self, parent: Path) -> set[Path]:
        """Create missing parent folders; return the folders whose entries changed."""
        if parent.is_dir():
            return set()
        changed: set[Path] = set()
        missing = [parent, *[p for p in parent.parents if p.is_relative_to(self.root) and p != self.root]]
        for folder in reversed(missing):
            if not folder.is_dir():
                with contextlib.suppress(FileExistsError):
                    folder.mkdir()
                changed.add(folder.parent)
        return changed

    def sync_dirs(self, dirs: Iterable[Path]) -> None:
        """fsync each directory once, parents after children."""
        for folder in sorted(set(dirs), key=lambda p: len(p.parts), reverse=True):
            fsync_dir(folder)

    def remove(self, relative: Path | str) -> None:
        """Delete an instance file (used when its row could not be committed, by the store that
        created it, once it knows that no committed row points to it)."""
        (self.root / relative).unlink(missing_ok=True)


def _writer_alive(name: str) -> bool:
    """True when a temporary file's name says which process writes it and that process runs
    (a file named the old way, without the process, is an interrupted run's)."""
    pid, sep, _ = name.partition("-")
    if not sep or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    return True
