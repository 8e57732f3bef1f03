"""The durable tail of receiving one instance, shared by the C-STORE SCP and STOW-RS: write the
bytes to the spool (unless a file is already there), commit the row through the group committer,
settle duplicates (``storage.duplicates``), and turn every failure into an IngestError carrying
the DIMSE status to answer with. Success is returned only once the instance is durable.

Stores of one SOP Instance UID are serialised in this process (one :class:`KeyedLocks` shared by
both receivers), so that a copy arriving while the first is being committed finds its file.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import _read_file_meta_info
from pydicom.uid import UID

from node.budget import DEFAULT_BUDGET, Budget
from node.dicom import status
from node.dicom.committer import IngestCommitter
from node.dicom.inspect import Header, inspect_dataset
from node.dicom.sop_classes import storage_sop_classes
from node.dicom.spool import Chunk, Spool, SpoolFullError
from node.errors import IngestError, StoreError
from node.store.received import ReceivedInstance
from node.store.tables import utcnow

log = logging.getLogger(__name__)

_PREAMBLE_AND_PREFIX = 132


@dataclass(frozen=True, slots=True)
class Part10Instance:
    """What filing a Part 10 file found out, also when it failed: the UIDs it could read."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""


class Part10Refused(IngestError):
    """A Part 10 file was not stored; ``instance`` holds the UIDs read before it was refused."""

    def __init__(self, status_code: int, message: str, instance: Part10Instance) -> None:
        super().__init__(status_code, message)
        self.instance = instance


@functools.cache
def _storage_classes() -> frozenset[str]:
    return frozenset(storage_sop_classes())


class KeyedLocks:
    """One lock per key (a SOP Instance UID), alive while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock of ``key`` for the duration of the block."""
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)


class InstanceFiler:
    """Files instances durably: spool write + committed row, under the instance's lock."""

    def __init__(self, spool: Spool, committer: IngestCommitter) -> None:
        self.spool = spool
        self.committer = committer
        self.locks = KeyedLocks()

    def file(
        self,
        header: Header,
        transfer_syntax: UID | str,
        chunks: Sequence[Chunk],
        size: int,
        calling_aet: str,
    ) -> bool:
        """File one instance (the Part 10 bytes ``chunks``, ``size`` bytes in all) under the
        instance's lock; True when it was new, False when it was already stored. Raises
        IngestError with the status to answer (0xA700 disk/database, 0x0111 refused duplicate)."""
        relative = self.spool.relative_path(header.study_uid, header.series_uid, header.sop_instance_uid)
        with self.locks.hold(header.sop_instance_uid):
            return self.file_at(header, transfer_syntax, relative, chunks, size, calling_aet)

    def file_part10(
        self,
        data: bytes,
        calling_aet: str,
        transfer_syntaxes: Sequence[str],
        budget: Budget = DEFAULT_BUDGET,
        study_uid: str | None = None,
    ) -> tuple[Part10Instance, bool]:
        """File one PS3.10 file (preamble, "DICM", File Meta group, data set), written as
        received, through the same checks and durable path as a C-STORE: its transfer syntax one
        of ``transfer_syntaxes``, the data set walked within ``budget``, its SOP class a storage
        class the SCP accepts, the File Meta UIDs those of the data set, and (``study_uid``) the
        study the sender named. Returns the instance's UIDs and whether it was new; raises
        Part10Refused with the status and what could be read."""
        if len(data) < _PREAMBLE_AND_PREFIX or data[128:132] != b"DICM":
            raise Part10Refused(
                status.CANNOT_UNDERSTAND,
                "not a DICOM Part 10 file (no 128-byte preamble and 'DICM' prefix)",
                Part10Instance(),
            )
        stream = io.BytesIO(data)
        stream.seek(_PREAMBLE_AND_PREFIX)
        try:
            meta = _read_file_meta_info(stream)
        except Exception as exc:  # pydicom raises several types on a malformed group
            raise Part10Refused(
                status.CANNOT_UNDERSTAND, f"File Meta group cannot be read: {exc}", Part10Instance()
            ) from exc
        offset = stream.tell()
        meta_class = str(meta.get("MediaStorageSOPClassUID", "") or "").strip()
        meta_instance = str(meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
        known = Part10Instance(meta_class, meta_instance)
        syntax = str(meta.get("TransferSyntaxUID", "") or "").strip().rstrip("\0")
        if not syntax:
            raise Part10Refused(status.CANNOT_UNDERSTAND, "File Meta group has no Transfer Syntax UID", known)
        if syntax not in transfer_syntaxes:
            raise Part10Refused(
                status.TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {syntax[:64]} is not supported", known
            )
        try:
            header = inspect_dataset(io.BytesIO(data[offset:]), UID(syntax), budget.max_inflated_bytes)
        except IngestError as exc:
            raise Part10Refused(exc.status, str(exc), known) from exc
        found = Part10Instance(header.sop_class_uid, header.sop_instance_uid, header.study_uid)
        if header.sop_class_uid not in _storage_classes():
            raise Part10Refused(
                status.SOP_CLASS_NOT_SUPPORTED,
                f"SOP class {header.sop_class_uid[:64]} is not a storage class the node accepts",
                found,
            )
        if meta_class and meta_class != header.sop_class_uid:
            raise Part10Refused(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "data set SOP Class UID differs from the File Meta group's",
                found,
            )
        if meta_instance and meta_instance != header.sop_instance_uid:
            raise Part10Refused(
                status.CANNOT_UNDERSTAND,
                "data set SOP Instance UID differs from the File Meta group's",
                found,
            )
        if study_uid is not None and header.study_uid != study_uid:
            raise Part10Refused(
                status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "Study Instance UID differs from the study the request names",
                found,
            )
        try:
            new = self.file(header, syntax, (data,), len(data), calling_aet)
        except IngestError as exc:
            raise Part10Refused(exc.status, str(exc), found) from exc
        return found, new

    def file_at(
        self,
        header: Header,
        transfer_syntax: UID | str,
        relative: Path,
        chunks: Sequence[Chunk],
        size: int,
        calling_aet: str,
    ) -> bool:
        """Write (unless already there) and commit one instance; True when it was new. The caller
        holds the instance's lock. A file this store did not create is never removed; one it
        created is removed after a failed commit only when no committed row points to it
        (another process may have recorded it)."""
        dirs: set[Path] = set()
        created = False
        try:
            if not self.spool.exists(relative):
                self.spool.check_space(size)
                written = self.spool.write(relative, chunks)
                created = written is not None
                dirs = written or set()
            record = ReceivedInstance(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                series_uid=header.series_uid,
                study_uid=header.study_uid,
                transfer_syntax_uid=str(transfer_syntax),
                modality=header.modality,
                body_part=header.body_part,
                series_number=header.series_number,
                series_description=header.series_description,
                instance_number=header.instance_number,
                byte_size=size,
                path=str(relative),
                calling_aet=calling_aet,
                received_at=utcnow(),
            )
            return self.committer.commit(record, dirs, chunks, created)
        except SpoolFullError as exc:
            raise IngestError(status.OUT_OF_RESOURCES, f"disk full: {exc}") from exc
        except OSError as exc:
            raise IngestError(status.OUT_OF_RESOURCES, f"cannot write to the spool: {exc.strerror}") from exc
        except StoreError as exc:
            if created:
                self.remove_unrecorded(relative, header.sop_instance_uid)
            raise IngestError(status.OUT_OF_RESOURCES, f"cannot record the instance: {exc}") from exc

    def remove_unrecorded(self, relative: Path, sop_instance_uid: str) -> None:
        """Remove a file whose row could not be committed, unless a committed row points to it
        or the database cannot tell (then it stays: a stray file is better than a lost one)."""
        try:
            recorded = self.committer.recorded_path(sop_instance_uid)
        except StoreError as exc:
            log.warning("kept a spool file whose row could not be committed: %s", exc)
            return
        if recorded == str(relative):
            return
        try:
            self.spool.remove(relative)
        except OSError as exc:
            log.warning("could not remove an unrecorded spool file: %s", exc.strerror)
