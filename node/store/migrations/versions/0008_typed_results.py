"""Typed job results (issue 19): the three list columns hold JSON arrays instead of
backslash-joined strings.

- study.modalities (VARCHAR 64): ``CT\\MR`` -> ``["CT","MR"]``;
- series.route_models (VARCHAR 256): ``cxr\\tb`` -> ``["cxr","tb"]``;
- job.series_uids (VARCHAR): ``1.2.3\\1.2.4`` -> ``["1.2.3","1.2.4"]``.

An empty string becomes ``[]``. A list whose JSON would not fit the column keeps the items that
fit (whole: an item is never cut, where the old code cut the joined string at the length).
Downgrade joins them back, cut at the column length as the old code did. The column types are
unchanged (node.store.tables.StringList is a VARCHAR). The conversion is written out here, not
imported, so that this revision keeps doing what it did when the code moves on.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

#: (table, key column, list column, the list column's length; None: unbounded)
_COLUMNS = (
    ("study", "study_uid", "modalities", 64),
    ("series", "series_uid", "route_models", 256),
    ("job", "id", "series_uids", None),
)


def _to_json(joined: str, length: int | None) -> str:
    kept: list[str] = []
    for item in (part for part in joined.split("\\") if part):
        if length is not None and len(json.dumps([*kept, item], separators=(",", ":"))) > length:
            break
        kept.append(item)
    return json.dumps(kept, separators=(",", ":"))


def _to_joined(stored: str, length: int | None) -> str:
    joined = "\\".join(json.loads(stored)) if stored else ""
    return joined if length is None else joined[:length]


def _convert(to: str) -> None:
    bind = op.get_bind()
    for table_name, key_name, column_name, length in _COLUMNS:
        table = sa.table(table_name, sa.column(key_name), sa.column(column_name, sa.String()))
        key, column = table.c[key_name], table.c[column_name]
        rows = bind.execute(sa.select(key, column)).all()
        changed = []
        for row_key, value in rows:
            new = _to_json(value or "", length) if to == "json" else _to_joined(value or "", length)
            if new != value:
                changed.append({"b_key": row_key, "b_value": new})
        if changed:
            values: dict[str, Any] = {column_name: sa.bindparam("b_value")}
            bind.execute(sa.update(table).where(key == sa.bindparam("b_key")).values(values), changed)


def upgrade() -> None:
    """Backslash-joined lists to JSON arrays."""
    _convert("json")


def downgrade() -> None:
    """JSON arrays back to backslash-joined lists."""
    _convert("joined")
