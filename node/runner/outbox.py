"""The outbox: output files written durably with one row per destination, then delivered with
retries and exponential backoff; parked as failed after the last attempt."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset
from sqlmodel import Session, col, select

from node.backoff import backoff_s
from node.files import fsync_dir, write_atomically
from node.send import Delivery, Destination, OutgoingFile
from node.settings import DestinationSettings
from node.store.integrity import IntegrityError, check_file, file_sha256
from node.store.tables import Job, JobState, OutboxItem, OutboxState
from node.types import AnalysisResult, OutputIdentity, OutputKind

log = logging.getLogger(__name__)


def write_output_files(
    outbox_dir: Path, job_id: int, outputs: Sequence[tuple[OutputKind, Dataset]], *, fsync: bool = True
) -> list[tuple[OutputKind, Dataset, Path]]:
    """Save each (kind, dataset) as a Part 10 file under ``outbox_dir/<job>/``, written atomically
    and (``fsync``: ``storage.fsync``) fsync'd; return paths."""
    folder = outbox_dir / str(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, ds in outputs:
        final = folder / f"{kind}-{ds.SOPInstanceUID}.dcm"
        write_atomically(final, partial(ds.save_as, enforce_file_format=True), fsync=fsync)
        written.append((kind, ds, final))
    _sync_folders(folder, outbox_dir, fsync)
    return written


def _sync_folders(folder: Path, outbox_dir: Path, fsync: bool) -> None:
    if fsync:
        fsync_dir(folder)
        fsync_dir(outbox_dir)


def choose_destinations(
    destinations: Sequence[DestinationSettings], send_to: str, calling_aets: set[str]
) -> list[DestinationSettings]:
    """origin: the destinations with an AE title that sent the study (all of those when none did);
    a destination without an AE title (HL7, FHIR, DICOMweb without one) is nobody's origin and
    always gets its share."""
    if send_to == "origin":
        titled = [d for d in destinations if d.ae_title is not None]
        origin = [d for d in titled if d.ae_title in calling_aets]
        if origin:
            return [d for d in destinations if d.ae_title is None or d in origin]
    return list(destinations)


@dataclass(frozen=True, slots=True)
class WrittenMessage:
    """A study-level message (HL7 ORU, FHIR Bundle) written for one destination."""

    destination: str
    kind: OutputKind  # HL7 or FHIR
    uid: str  # the message's UID (the outbox row's sop_instance_uid): one per (job, destination)
    path: Path


def write_messages(
    outbox_dir: Path,
    job: Job,
    result: AnalysisResult,
    sources: Sequence[Dataset],
    identity: OutputIdentity,
    destinations: Sequence[DestinationSettings],
    now: datetime,
    *,
    fsync: bool = True,
) -> list[WrittenMessage]:
    """One HL7 ORU^R01 or FHIR transaction Bundle per message destination (hl7, fhir) for a
    finished job, written under ``outbox_dir/<job>/`` like the DICOM outputs (atomically,
    fsync'd when ``fsync``). The
    message UID derives from the job key, the model version and the destination, so a retried
    job writes the same message and the outbox holds it once."""
    from pydicom.uid import generate_uid

    from node.send import StudyContext

    wanted = [d for d in destinations if d.takes_messages]
    if not wanted or not sources:
        return []
    study = StudyContext.from_dataset(sources[0], result.study_uid)
    urgent = any(f.triage and f.positive and not f.normal for f in result.findings)
    folder = outbox_dir / str(job.id)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for dest in wanted:
        seed = [job.key, result.algorithm.version, dest.kind, dest.name]
        uid = generate_uid(prefix=identity.uid_root, entropy_srcs=seed)
        try:
            if dest.kind == "hl7":
                from node.send.hl7 import build_oru

                body = build_oru(result, study, identity, dest.hl7, uid, urgent, now).encode("utf-8")
                final = folder / f"hl7-{uid}.hl7"
            else:
                from node.send.fhir import build_bundle

                bundle = build_bundle(result, study, identity, uid, now)
                body = json.dumps(bundle, ensure_ascii=False).encode("utf-8")
                final = folder / f"fhir-{uid}.json"
        except ValueError as exc:  # pydantic's ValidationError too: left out, the other outputs go
            log.warning("job %d: no %s message for %s: %s", job.id, dest.kind, dest.name, type(exc).__name__)
            continue
        write_atomically(final, _bytes_writer(body), fsync=fsync)
        written.append(WrittenMessage(dest.name, OutputKind(dest.kind), uid, final))
    _sync_folders(folder, outbox_dir, fsync)
    return written


def queue_messages(
    session: Session, job: Job, messages: Sequence[WrittenMessage], data_dir: Path, now: datetime
) -> int:
    """One outbox row per written message (each is for one destination)."""
    for message in messages:
        session.add(
            OutboxItem(
                job_id=job.id or 0,
                destination=message.destination,
                kind=message.kind,
                sop_class_uid="",
                sop_instance_uid=message.uid,
                path=str(message.path.relative_to(data_dir)),
                sha256=file_sha256(message.path),
                next_attempt_at=now,
                created_at=now,
            )
        )
    return len(messages)


def queue_outputs(
    session: Session,
    job: Job,
    files: Sequence[tuple[OutputKind, Dataset, Path]],
    destinations: Sequence[DestinationSettings],
    data_dir: Path,
    now: datetime,
) -> int:
    """One outbox row per (file, destination) for the destinations that take DICOM objects (dicom,
    dicomweb); parametric maps, presentation states and key object selections only where the
    destination wants them."""
    rows = 0
    for kind, ds, path in files:
        digest = file_sha256(path)  # just written (in the page cache): checked before each send
        for dest in destinations:
            if not dest.takes_objects:
                continue
            if kind == OutputKind.PM and not dest.parametric_map:
                continue
            if (kind == OutputKind.GSPS and not dest.presentation_state) or (
                kind == OutputKind.KOS and not dest.key_objects
            ):
                continue
            session.add(
                OutboxItem(
                    job_id=job.id or 0,
                    destination=dest.name,
                    kind=kind,
                    sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    path=str(path.relative_to(data_dir)),
                    sha256=digest,
                    next_attempt_at=now,
                    created_at=now,
                )
            )
            rows += 1
    return rows


def _backoff(dest: DestinationSettings, attempts: int) -> timedelta:
    return timedelta(seconds=backoff_s(dest.backoff_initial_s, attempts, dest.backoff_max_s))


def deliver_due(
    session: Session,
    destinations: Mapping[str, tuple[DestinationSettings, Destination]],
    data_dir: Path,
    now: datetime,
    batch: int = 100,
    on_damaged: Callable[[], None] | None = None,
    fetch: Callable[[list[OutboxItem]], None] | None = None,
) -> int:
    """Send what is due, one batch per destination; update rows and the jobs they finish.
    An output whose file is missing or changed since it was written is not sent: it is parked
    as failed at once, with the reason (``on_damaged`` is called for each). Returns the number
    of outputs delivered. ``fetch`` (an object store) brings the files another node wrote.

    The rows are claimed with a row lock (FOR UPDATE SKIP LOCKED) held until the caller commits
    the outcome: a sender on another node skips them and, once committed, finds them sent. A node
    that dies mid-send releases them with its connection; they are sent again (at least once).
    On SQLite (one node, one sender thread) the lock clause is left out."""
    due = list(
        session.exec(
            select(OutboxItem)
            .where(OutboxItem.state == OutboxState.PENDING, col(OutboxItem.next_attempt_at) <= now)
            .order_by(col(OutboxItem.id))
            .limit(batch)
            .with_for_update(skip_locked=True)
        )
    )
    by_destination: dict[str, list[OutboxItem]] = defaultdict(list)
    for item in due:
        by_destination[item.destination].append(item)
    delivered = 0
    for name, items in by_destination.items():
        if name not in destinations:
            for item in items:
                item.state, item.last_error = (
                    OutboxState.FAILED,
                    f"destination {name!r} is no longer configured",
                )
            continue
        settings, destination = destinations[name]
        if fetch is not None:
            fetch(items)
        items = _intact(items, data_dir, on_damaged)
        if not items:
            continue
        files = [OutgoingFile(data_dir / i.path, i.sop_class_uid, "1.2.840.10008.1.2.1") for i in items]
        outcomes: list[Delivery] = destination.send(files)
        for item, outcome in zip(items, outcomes, strict=True):
            item.attempts += 1
            if outcome.ok:
                item.state, item.sent_at, item.last_error = OutboxState.SENT, now, ""
                delivered += 1
            else:
                item.last_error = outcome.detail[:512]
                if item.attempts >= settings.max_attempts or outcome.permanent:
                    item.state = OutboxState.FAILED
                    log.error(
                        "output %s to %s parked after %d attempts: %s",
                        item.kind,
                        name,
                        item.attempts,
                        outcome.detail,
                    )
                else:
                    item.next_attempt_at = now + _backoff(settings, item.attempts)
        failed = sum(not o.ok for o in outcomes)
        if failed:
            log.warning(
                "destination %s: %d of %d outputs not delivered (%s)",
                name,
                failed,
                len(items),
                outcomes[0].detail,
            )
    session.flush()
    for job_id in sorted({i.job_id for i in due}):  # in id order: senders lock jobs in one order
        settle_job(session, job_id, now)
    return delivered


def _intact(
    items: list[OutboxItem], data_dir: Path, on_damaged: Callable[[], None] | None
) -> list[OutboxItem]:
    """The items whose files hold the bytes written; the others are parked as failed at once (a
    retry would only send the same damaged file again)."""
    intact = []
    for item in items:
        try:
            check_file(data_dir / item.path, item.sha256, None, f"output {item.kind}", "written")
        except IntegrityError as exc:
            item.state, item.last_error = OutboxState.FAILED, f"not sent: {exc}"[:512]
            log.error("output %s to %s not sent: %s", item.kind, item.destination, exc)
            if on_damaged is not None:
                on_damaged()
            continue
        intact.append(item)
    return intact


def settle_job(session: Session, job_id: int, now: datetime) -> None:
    """A sending job is done when all its outputs are sent, failed when some are parked. The job
    row is locked first, so that of two senders that each delivered part of its outputs the later
    one sees the other's outcome once that commits (and settles it)."""
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.state != JobState.SENDING:
        return
    states = list(
        session.exec(
            select(OutboxItem.state, OutboxItem.destination, OutboxItem.last_error).where(
                OutboxItem.job_id == job_id
            )
        )
    )
    if any(s == OutboxState.PENDING for s, _, _ in states):
        return
    parked = [(d, e) for s, d, e in states if s == OutboxState.FAILED]
    job.updated_at = job.finished_at = now
    if parked:
        job.state = JobState.FAILED
        job.error = f"{len(parked)} outputs not delivered to {parked[0][0]}: {parked[0][1]}"[:1024]
    else:
        job.state = JobState.DONE
    session.add(job)


def backlog(session: Session) -> dict[str, int]:
    """Outbox rows per state."""
    from sqlalchemy import func

    return {s: n for s, n in session.exec(select(OutboxItem.state, func.count()).group_by(OutboxItem.state))}


def _bytes_writer(data: bytes) -> Callable[[BinaryIO], object]:
    """A ``write_atomically`` writer of ``data``."""
    return lambda fh: fh.write(data)
