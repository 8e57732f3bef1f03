"""Recording received instances: the one write on the ingest path, made as a few set-based
statements per batch (SQLAlchemy Core), safe when several receiving processes write at once.

Every C-STORE waits for this write, so it is kept to five statements whatever the batch size: the
study and series rows are created with ``INSERT .. ON CONFLICT DO NOTHING``, the instances are
inserted the same way with ``RETURNING`` (so that an instance two processes received at the same
moment counts once), then the counters of the touched series and studies are raised relative to
their stored values; a duplicate only moves its still-receiving series' last receive time. Rows are
written in key order, so that writers on PostgreSQL take their row locks in one order and cannot
deadlock. No row is read and written back, except a study's modality list when one of its series
is new (read under ``FOR UPDATE`` on PostgreSQL; SQLite holds the write lock by then).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, bindparam, case, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlmodel import Session

from node.store.tables import Instance, Series, SeriesState, Study, StudyState, UTCDateTime, dump_list

_STUDY = Study.__table__  # type: ignore[attr-defined]
_SERIES = Series.__table__  # type: ignore[attr-defined]
_INSTANCE = Instance.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class ReceivedInstance:
    """What the SCP hands the store for one instance already durable on disk."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    modality: str
    body_part: str
    series_number: int | None
    series_description: str
    instance_number: int | None
    byte_size: int
    path: str
    calling_aet: str
    received_at: datetime
    sha256: str | None = None  # hex SHA-256 of the file's bytes; None: not known


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """What the committed row of an instance says about the file it points to."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    path: str
    sha256: str | None
    byte_size: int


# Every function here runs its statements on the connection of a session, or on a connection in a
# transaction (the ingest committer's, which skips the ORM session's ~0.4 ms per batch)
Db = Session | Connection


def _conn(db: Db) -> Connection:
    """The connection to execute on."""
    return db.connection() if isinstance(db, Session) else db


@functools.cache
def _inserts(dialect: str) -> tuple[Any, Any, Any]:
    """The three ``INSERT .. ON CONFLICT DO NOTHING`` statements (study, series, instance) for a
    dialect, built once: building a statement costs about as much as running it."""
    if dialect == "postgresql":
        insert: Any = postgresql.insert
    elif dialect == "sqlite":
        insert = sqlite.insert
    else:
        raise NotImplementedError(f"recording instances needs SQLite or PostgreSQL, not {dialect}")
    return (
        insert(_STUDY).on_conflict_do_nothing().returning(_STUDY.c.study_uid),
        insert(_SERIES).on_conflict_do_nothing().returning(_SERIES.c.series_uid),
        insert(_INSTANCE).on_conflict_do_nothing().returning(_INSTANCE.c.sop_instance_uid),
    )


def _raise_statement(table: Any, **extra: Any) -> Any:
    """``UPDATE`` adding a batch's count and size to a row, keeping the later receive time, and
    reopening it (state receiving, not completed)."""
    c = table.c
    last = bindparam("b_last", type_=UTCDateTime())
    key = c.series_uid if table is _SERIES else c.study_uid
    return (
        update(table)
        .where(key == bindparam("b_uid"))
        .values(
            instance_count=c.instance_count + bindparam("b_count"),
            byte_size=c.byte_size + bindparam("b_size"),
            last_received_at=case((c.last_received_at < last, last), else_=c.last_received_at),
            completed_at=None,
            **extra,
        )
    )


def _touch_statement(table: Any, receiving: str) -> Any:
    """``UPDATE`` moving a still-receiving row's last receive time forward (for duplicates)."""
    c = table.c
    last = bindparam("b_last", type_=UTCDateTime())
    key = c.series_uid if table is _SERIES else c.study_uid
    return (
        update(table)
        .where(key == bindparam("b_uid"), c.state == receiving, c.last_received_at < last)
        .values(last_received_at=last)
    )


_TOUCH_SERIES = _touch_statement(_SERIES, SeriesState.RECEIVING.value)
_TOUCH_STUDY = _touch_statement(_STUDY, StudyState.RECEIVING.value)
_MERGED = bindparam("b_modalities", type_=String())  # the stored JSON text, "" for no change
_RAISE_SERIES = _raise_statement(_SERIES, state=SeriesState.RECEIVING.value)
_RAISE_STUDY = _raise_statement(
    _STUDY,
    state=StudyState.RECEIVING.value,
    series_count=_STUDY.c.series_count + bindparam("b_series"),
    modalities=case((_MERGED == "", _STUDY.c.modalities), else_=_MERGED),
)


@dataclass(slots=True)
class _Totals:
    """What a batch adds to one series or study."""

    count: int = 0
    size: int = 0
    last: datetime | None = None

    def add(self, r: ReceivedInstance) -> None:
        self.count += 1
        self.size += r.byte_size
        self.last = r.received_at if self.last is None else max(self.last, r.received_at)


def _totals(received: list[ReceivedInstance]) -> tuple[dict[str, _Totals], dict[str, _Totals]]:
    """What ``received`` adds to each series and to each study, by UID."""
    by_series: dict[str, _Totals] = defaultdict(_Totals)
    by_study: dict[str, _Totals] = defaultdict(_Totals)
    for r in received:
        by_series[r.series_uid].add(r)
        by_study[r.study_uid].add(r)
    return by_series, by_study


def record_instances(session: Db, received: Sequence[ReceivedInstance]) -> set[str]:
    """Add the instances not yet known, updating their series and study; return the new UIDs.

    A series or study that was already complete is reopened by a late instance, so that it
    completes again after a new quiet period. The caller commits.
    """
    first: dict[str, ReceivedInstance] = {}
    for r in sorted(received, key=lambda r: r.sop_instance_uid):  # one lock order for every writer
        first.setdefault(r.sop_instance_uid, r)
    if not first:
        return set()
    studies = dict(sorted({r.study_uid: r for r in reversed(first.values())}.items()))
    series = dict(sorted({r.series_uid: r for r in reversed(first.values())}.items()))
    db = _conn(session)
    insert_study, insert_series, insert_instance = _inserts(db.dialect.name)
    new_studies = db.execute(
        insert_study,
        [
            {"study_uid": uid, "first_received_at": r.received_at, "last_received_at": r.received_at}
            for uid, r in studies.items()
        ],
    ).scalars()
    created_studies = set(new_studies)
    created = db.execute(
        insert_series,
        [
            {
                "series_uid": uid,
                "study_uid": r.study_uid,
                "modality": r.modality[:16],
                "body_part": r.body_part[:64],
                "series_number": r.series_number,
                "series_description": r.series_description[:64],
                "calling_aet": r.calling_aet,
                "first_received_at": r.received_at,
                "last_received_at": r.received_at,
            }
            for uid, r in series.items()
        ],
    )
    new_series = set(created.scalars())
    inserted = db.execute(
        insert_instance,
        [
            {
                "sop_instance_uid": r.sop_instance_uid,
                "series_uid": r.series_uid,
                "study_uid": r.study_uid,
                "sop_class_uid": r.sop_class_uid,
                "transfer_syntax_uid": r.transfer_syntax_uid,
                "instance_number": r.instance_number,
                "byte_size": r.byte_size,
                "path": r.path,
                "calling_aet": r.calling_aet,
                "received_at": r.received_at,
                "sha256": r.sha256,
            }
            for r in first.values()
        ],
    )
    new = set(inserted.scalars())
    kept_series = {first[uid].series_uid for uid in new}
    if new:
        _raise_counters(
            session,
            [first[uid] for uid in sorted(new)],
            {uid: series[uid] for uid in sorted(new_series & kept_series)},
        )
    if len(new) < len(first):
        _touch(session, [r for uid, r in first.items() if uid not in new])
        _drop_empty(
            session, new_series - kept_series, created_studies - {first[uid].study_uid for uid in new}
        )
    return new


def _drop_empty(session: Db, series_uids: set[str], study_uids: set[str]) -> None:
    """Remove the series and study rows this transaction created for instances that turned out to
    be known already (a SOP Instance UID resent under another study or series UID): no instance
    points to them, and left in place they would complete as empty studies."""
    db = _conn(session)
    if series_uids:
        db.execute(_SERIES.delete().where(_SERIES.c.series_uid.in_(sorted(series_uids))))
    if study_uids:
        db.execute(_STUDY.delete().where(_STUDY.c.study_uid.in_(sorted(study_uids))))


def stored_instances(session: Db, sop_instance_uids: Sequence[str]) -> dict[str, StoredInstance]:
    """The committed (or, in this transaction, inserted) rows of some instances, by UID."""
    if not sop_instance_uids:
        return {}
    c = _INSTANCE.c
    rows = _conn(session).execute(
        select(c.sop_instance_uid, c.study_uid, c.series_uid, c.path, c.sha256, c.byte_size).where(
            c.sop_instance_uid.in_(sorted(set(sop_instance_uids)))
        )
    )
    return {str(r[0]): StoredInstance(*r) for r in rows}


def replace_instance(session: Db, new: ReceivedInstance, old: StoredInstance) -> None:
    """Point the row of an instance at a new copy of it (same study and series) and reopen its
    series and study, so that they complete again and the series is routed again; the caller
    removes the old file once this is committed. The series and study sizes follow the new copy."""
    c = _INSTANCE.c
    db = _conn(session)
    db.execute(
        update(_INSTANCE)
        .where(c.sop_instance_uid == new.sop_instance_uid)
        .values(
            path=new.path,
            sha256=new.sha256,
            byte_size=new.byte_size,
            sop_class_uid=new.sop_class_uid,
            transfer_syntax_uid=new.transfer_syntax_uid,
            instance_number=new.instance_number,
            calling_aet=new.calling_aet,
            received_at=new.received_at,
            replaced_at=new.received_at,
        )
    )
    delta = new.byte_size - old.byte_size
    db.execute(
        _RAISE_SERIES, [{"b_uid": old.series_uid, "b_count": 0, "b_size": delta, "b_last": new.received_at}]
    )
    db.execute(
        _RAISE_STUDY,
        [
            {
                "b_uid": old.study_uid,
                "b_count": 0,
                "b_size": delta,
                "b_series": 0,
                "b_modalities": "",
                "b_last": new.received_at,
            }
        ],
    )


def _touch(session: Db, duplicates: list[ReceivedInstance]) -> None:
    """A duplicate is still an instance arriving: a sender resending a series it was cut off in
    (after a restart of the node, say) keeps that series open while it resends. Series and studies
    already complete stay as they are; counters do not change."""
    by_series, by_study = _totals(duplicates)
    db = _conn(session)
    for statement, totals in ((_TOUCH_SERIES, by_series), (_TOUCH_STUDY, by_study)):
        db.execute(statement, [{"b_uid": uid, "b_last": t.last} for uid, t in sorted(totals.items())])


def _raise_counters(
    session: Db, new: list[ReceivedInstance], new_series: dict[str, ReceivedInstance]
) -> None:
    """Add the new instances to their series and studies, and reopen those that were complete."""
    by_series, by_study = _totals(new)
    db = _conn(session)
    db.execute(
        _RAISE_SERIES,
        [
            {"b_uid": uid, "b_count": t.count, "b_size": t.size, "b_last": t.last}
            for uid, t in sorted(by_series.items())
        ],
    )
    added_series: dict[str, int] = defaultdict(int)
    added_modalities: dict[str, list[str]] = defaultdict(list)
    for r in new_series.values():
        added_series[r.study_uid] += 1
        if r.modality:
            added_modalities[r.study_uid].append(r.modality[:16])
    modalities = _modalities_after(session, added_modalities)
    db.execute(
        _RAISE_STUDY,
        [
            {
                "b_uid": uid,
                "b_count": t.count,
                "b_size": t.size,
                "b_series": added_series.get(uid, 0),
                "b_modalities": modalities.get(uid, ""),
                "b_last": t.last,
            }
            for uid, t in sorted(by_study.items())
        ],
    )


def _modalities_after(session: Db, added: dict[str, list[str]]) -> dict[str, str]:
    """The stored modality list (JSON, :func:`~node.store.tables.dump_list`) of each study once
    ``added`` is merged in; only for the studies whose list changes."""
    if not added:
        return {}
    rows = _conn(session).execute(
        select(_STUDY.c.study_uid, _STUDY.c.modalities)
        .where(_STUDY.c.study_uid.in_(sorted(added)))
        .order_by(_STUDY.c.study_uid)
        .with_for_update()
    )
    merged: dict[str, str] = {}
    for uid, values in rows:
        extra = [m for m in dict.fromkeys(added[uid]) if m not in values]
        if extra:
            merged[uid] = dump_list([*values, *extra], _STUDY.c.modalities.type.length)
    return merged


def recorded_path(session: Db, sop_instance_uid: str) -> str | None:
    """The spool path the committed row of an instance points to; None when there is no row."""
    row = (
        _conn(session)
        .execute(select(_INSTANCE.c.path).where(_INSTANCE.c.sop_instance_uid == sop_instance_uid))
        .first()
    )
    return None if row is None else str(row[0])
