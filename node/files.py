"""Durable file writing and file hashing shared by the spool, the outbox, the model registry and the
model tools: a write that leaves either the whole new file under its name or nothing (no ``.part``
file), a directory fsync, and the SHA-256 of a file (``hashlib.file_digest``)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import yaml


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(final: Path, write: Callable[[BinaryIO], object], *, fsync: bool = True) -> Path:
    """Write a file through ``write(fh)`` under a temporary ``.part`` name beside ``final``, fsync
    it when ``fsync`` is set, and rename it to ``final`` (replacing one already there); return
    ``final``. When ``write`` (or the fsync, or the rename) fails, the temporary file is removed
    and the exception goes on: nothing is left under either name. The caller fsyncs the
    directory (:func:`fsync_dir`) once its files are written."""
    tmp = final.parent / f".{uuid.uuid4().hex}.part"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (read in blocks by ``hashlib.file_digest``)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_yaml(path: Path, what: str, error: type[Exception]) -> Any:
    """The YAML document in ``path`` (None for an empty file); ``error`` raised naming ``what``
    (e.g. "configuration file") and the path when the file does not exist, cannot be read or is
    not valid YAML. The one reader of the configuration, the routing rules and the manifests."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
