"""Integrity of stored files: the SHA-256 recorded when a file was written, checked before the
file is used (analysed, sent). A file that changed, shrank to nothing or vanished after it was
acknowledged is an error of the store, reported as such, never analysed as if it were the data.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from pathlib import Path

from node.errors import StoreError
from node.files import sha256_file

Chunk = bytes | bytearray | memoryview
_PART10_HEADER = 128 + 4  # preamble and "DICM"
_GROUP_LENGTH = 12  # (0002,0000) UL, explicit VR little endian: tag, VR, length, value


class IntegrityError(StoreError):
    """A stored file is missing, empty, or not the bytes that were recorded when it was written.
    Permanent: the runner fails the job at once (a retry reads the same damaged file)."""


def chunks_sha256(chunks: Iterable[Chunk]) -> str:
    """Hex SHA-256 of bytes held in memory as consecutive chunks (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str | None:
    """Hex SHA-256 of a file; None when it does not exist."""
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None


def _dataset_offset(head: bytes) -> int | None:
    """Where the data set starts in a Part 10 file that begins with ``head`` (at least 144 bytes):
    after the preamble, "DICM" and the File Meta group (its length from (0002,0000)); None when
    the bytes are not laid out so."""
    if len(head) < _PART10_HEADER + _GROUP_LENGTH or head[128:132] != b"DICM":
        return None
    tag, vr, length = struct.unpack_from("<I2sH", head, _PART10_HEADER)
    if tag != 0x00000002 or vr != b"UL" or length != 4:
        return None
    (group_length,) = struct.unpack_from("<I", head, _PART10_HEADER + 8)
    return _PART10_HEADER + _GROUP_LENGTH + group_length


def chunks_dataset_sha256(chunks: Iterable[Chunk]) -> str | None:
    """Hex SHA-256 of the data set of a Part 10 file held as chunks, without its File Meta group
    (which names the sending AE and implementation: the same data set resent from another sender
    is the same content); None when the bytes are not a Part 10 file."""
    views = [memoryview(c).cast("B") for c in chunks]
    head = b"".join(bytes(v[: _PART10_HEADER + _GROUP_LENGTH]) for v in views)
    offset = _dataset_offset(head)
    if offset is None:
        return None
    digest = hashlib.sha256()
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        digest.update(view[offset:])
        offset = 0
    return digest.hexdigest()


def dataset_sha256(path: Path) -> str | None:
    """Hex SHA-256 of the data set of a stored Part 10 file (see chunks_dataset_sha256); None when
    it is missing or not laid out as a Part 10 file."""
    try:
        with open(path, "rb") as fh:
            offset = _dataset_offset(fh.read(_PART10_HEADER + _GROUP_LENGTH))
            if offset is None:
                return None
            fh.seek(offset)
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except FileNotFoundError:
        return None


def check_file(
    path: Path, sha256: str | None, byte_size: int | None, what: str, since: str = "received"
) -> None:
    """Raise IntegrityError unless ``path`` holds the bytes recorded for it. ``what`` names the
    file for people (e.g. "instance 3 of 40 of the series"; never a patient identifier), ``since``
    the moment the hash was taken ("received", "written"). A row without a hash (written before
    hashes were recorded) is checked for presence and size only."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise IntegrityError(f"{what} is missing: its file was removed after it was {since}") from None
    except OSError as exc:
        raise IntegrityError(f"{what} cannot be read ({exc.strerror})") from exc
    if size == 0:
        raise IntegrityError(f"{what} is empty on disk: its file was truncated after it was {since}")
    if sha256 is None:
        if byte_size is not None and size != byte_size:
            raise IntegrityError(
                f"{what} changed on disk after it was {since} (size {size} bytes, recorded {byte_size})"
            )
        return
    actual = file_sha256(path)
    if actual is None:
        raise IntegrityError(f"{what} is missing: its file was removed after it was {since}") from None
    if actual != sha256:
        raise IntegrityError(f"{what} changed on disk after it was {since} (SHA-256 mismatch)")
