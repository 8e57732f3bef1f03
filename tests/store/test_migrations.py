"""Migrations: the schema is made from nothing by them, an older database is upgraded without loss,
and start-up refuses a database that needs upgrading. On SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text
from sqlmodel import Session, SQLModel, select
from typer.testing import CliRunner

from node.cli import app
from node.errors import StoreError
from node.store.db import SchemaOutdated, _alembic_config, head_revision, make_engine, schema_status, upgrade
from node.store.tables import Instance, Job, OutboxItem, Series, StringList, Study, dump_list, load_list
from tests.helpers import write_config

T0 = "2026-01-02 03:04:05+00:00"


def _schema_differences(engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diffs = compare_metadata(context, SQLModel.metadata)

    def same_on_sqlite(diff: object) -> bool:  # INTEGER is BIGINT on SQLite: 0003 is a no-op there
        return (
            engine.dialect.name == "sqlite"
            and isinstance(diff, list)
            and diff[0][0] == "modify_type"
            and diff[0][3] == "byte_size"
        )

    return [d for d in diffs if not same_on_sqlite(d)]


def test_empty_database_gets_the_schema_from_the_migrations(database_url):
    engine = make_engine(database_url)
    try:
        assert schema_status(engine) == (head_revision(), head_revision())
        assert _schema_differences(engine) == [], "the migrations and the SQLModel tables disagree"
        again = make_engine(database_url)  # a second start finds it up to date
        again.dispose()
    finally:
        engine.dispose()


def _fill_revision_0001(engine) -> None:
    """Rows as the node wrote them before the triage columns existed (revision 0001)."""
    with engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO study (study_uid, modalities, state, series_count, instance_count, byte_size,"
                " first_received_at, last_received_at, completed_at)"
                " VALUES ('1.2.3', 'CT', 'complete', 1, 1, 1234, :t, :t, :t)"
            ),
            {"t": T0},
        )
        c.execute(
            text(
                "INSERT INTO series (series_uid, study_uid, modality, body_part, series_number,"
                " series_description, calling_aet, state, route_rule, route_models, route_grouping,"
                " route_note, instance_count, byte_size, first_received_at, last_received_at)"
                " VALUES ('1.2.3.4', '1.2.3', 'CT', 'ABDOMEN', 2, 'portal', 'MODALITY', 'routed',"
                " 'ct-liver', 'ct-liver', 'series', 'matched', 1, 1234, :t, :t)"
            ),
            {"t": T0},
        )
        c.execute(
            text(
                "INSERT INTO instance (sop_instance_uid, series_uid, study_uid, sop_class_uid,"
                " transfer_syntax_uid, instance_number, byte_size, path, calling_aet, received_at)"
                " VALUES ('1.2.3.4.5', '1.2.3.4', '1.2.3', '1.2.840.10008.5.1.4.1.1.2',"
                " '1.2.840.10008.1.2.1', 1, 1234, 'a/b.dcm', 'MODALITY', :t)"
            ),
            {"t": T0},
        )
        c.execute(
            text(
                "INSERT INTO job (key, model_id, rule, level, study_uid, series_uids, state, attempts,"
                " error, timings, result, created_at, updated_at, not_before)"
                " VALUES ('ct-liver|series|1.2.3.4', 'ct-liver', 'ct-liver', 'series', '1.2.3', '1.2.3.4',"
                " 'done', 1, '', '{}', '{\"findings\": []}', :t, :t, :t)"
            ),
            {"t": T0},
        )
        job_id = c.execute(text("SELECT id FROM job")).scalar_one()
        c.execute(
            text(
                "INSERT INTO outboxitem (job_id, destination, kind, sop_class_uid, sop_instance_uid, path,"
                " state, attempts, last_error, next_attempt_at, created_at)"
                " VALUES (:j, 'pacs', 'sr', '1.2.840.10008.5.1.4.1.1.88.34', '9.9.9', 'out/sr.dcm',"
                " 'sent', 1, '', :t, :t)"
            ),
            {"j": job_id, "t": T0},
        )


def test_upgrade_from_the_first_revision_keeps_the_data(database_url):
    engine = make_engine(database_url, check_schema=False)
    try:
        upgrade(engine, "0001")
        _fill_revision_0001(engine)
        with pytest.raises(SchemaOutdated, match="pacs-node db upgrade"):
            make_engine(database_url)

        assert upgrade(engine) == ("0001", head_revision())
        assert _schema_differences(engine) == []
        with Session(engine) as s:
            study = s.exec(select(Study)).one()
            assert (study.study_uid, study.modalities, study.byte_size) == ("1.2.3", ["CT"], 1234)
            assert study.first_received_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
            assert study.priority is None and study.notify_state is None
            assert study.notify_attempts == 0 and study.notify_error == ""
            series = s.exec(select(Series)).one()
            assert (series.route_rule, series.route_models) == ("ct-liver", ["ct-liver"])  # 0008: JSON
            instance = s.exec(select(Instance)).one()
            assert instance.path == "a/b.dcm"
            assert (instance.sha256, instance.replaced_at) == (None, None)  # 0004: integrity unknown
            assert s.exec(select(OutboxItem)).one().sha256 is None
            job = s.exec(select(Job)).one()
            assert (job.state, job.result, job.series_uids) == ("done", '{"findings": []}', ["1.2.3.4"])
            assert s.exec(select(OutboxItem)).one().job_id == job.id
            # 0003: sizes past 2 GiB fit (PostgreSQL's INTEGER is 32-bit)
            study.byte_size = 5 * 2**30
            s.add(study)
            s.commit()
            s.refresh(study)
            assert study.byte_size == 5 * 2**30
        make_engine(database_url).dispose()  # start-up accepts it now
        assert upgrade(engine) == (head_revision(), head_revision())  # idempotent
    finally:
        engine.dispose()


def test_database_from_before_migrations_is_stamped_then_upgraded(database_url):
    engine = make_engine(database_url, check_schema=False)
    try:
        upgrade(engine, "0002")  # what create_all made at the last release without migrations
        _fill_revision_0001(engine)
        with engine.begin() as c:
            c.execute(text("DROP TABLE alembic_version"))
        assert schema_status(engine)[0] == "legacy:0002"
        with pytest.raises(SchemaOutdated):
            make_engine(database_url)
        assert upgrade(engine) == ("0002", head_revision())
        with Session(engine) as s:
            assert s.exec(select(Job)).one().key == "ct-liver|series|1.2.3.4"
    finally:
        engine.dispose()


def test_cli_db_upgrade_and_refusal_at_start(tmp_path, database_url):
    config = write_config(tmp_path, storage={"database_url": database_url})
    engine = make_engine(database_url, check_schema=False)
    upgrade(engine, "0001")
    engine.dispose()
    runner = CliRunner()

    current = runner.invoke(app, ["db", "current", "--config", str(config)])
    assert current.exit_code == 1 and "0001" in current.output

    serve = runner.invoke(app, ["serve", "--config", str(config)])
    assert serve.exit_code == 1  # refused before anything listens; the log says to run db upgrade

    done = runner.invoke(app, ["db", "upgrade", "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert f"0001 -> {head_revision()}" in done.output
    again = runner.invoke(app, ["db", "upgrade", "--config", str(config)])
    assert again.exit_code == 0 and "up to date" in again.output
    assert runner.invoke(app, ["db", "current", "--config", str(config)]).exit_code == 0


def test_database_from_a_newer_version_is_refused(database_url):
    engine = make_engine(database_url)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer version") as caught:
        make_engine(database_url)
    assert not isinstance(caught.value, SchemaOutdated)


# (table, key, column): the list columns 0008 turns from backslash-joined strings into JSON arrays
_LISTS = (
    ("study", "study_uid", "modalities"),
    ("series", "series_uid", "route_models"),
    ("job", "key", "series_uids"),
)


def _raw_lists(engine) -> dict[tuple[str, str], str]:
    with engine.connect() as c:
        return {
            (column, key): value
            for table, key_column, column in _LISTS
            for key, value in c.execute(text(f"SELECT {key_column}, {column} FROM {table}"))
        }


def test_list_columns_become_json_and_back(database_url):
    """0008 on rows in the old form: several values, one, none, and a list whose JSON would not fit
    the column (its whole items that fit are kept); downgrade gives the old strings back."""
    engine = make_engine(database_url, check_schema=False)
    try:
        upgrade(engine, "0001")
        _fill_revision_0001(engine)
        long_models = "\\".join(f"model-{i:02d}-with-a-long-name" for i in range(12))  # 323 > 256 chars
        with engine.begin() as c:
            c.execute(text("UPDATE study SET modalities = 'CT\\MR\\SR'"))
            c.execute(text("UPDATE job SET series_uids = '1.2.3.4\\1.2.3.5'"))
            c.execute(
                text(
                    "INSERT INTO series (series_uid, study_uid, modality, body_part, series_number,"
                    " series_description, calling_aet, state, route_rule, route_models, route_grouping,"
                    " route_note, instance_count, byte_size, first_received_at, last_received_at)"
                    " VALUES ('1.2.3.5', '1.2.3', 'MR', '', 3, '', 'MODALITY', 'not routed', '', '', '',"
                    " 'no rule', 0, 0, :t, :t), ('1.2.3.6', '1.2.3', 'SR', '', 4, '', 'MODALITY', 'routed',"
                    " 'all', :m, 'series', '', 0, 0, :t, :t)"
                ),
                {"t": T0, "m": long_models[:256]},  # the old code cut the joined string at 256
            )
        upgrade(engine, "0007")
        before = _raw_lists(engine)
        assert before[("modalities", "1.2.3")] == "CT\\MR\\SR"

        upgrade(engine, "0008")
        raw = _raw_lists(engine)
        assert raw[("modalities", "1.2.3")] == '["CT","MR","SR"]'
        assert raw[("route_models", "1.2.3.4")] == '["ct-liver"]'
        assert raw[("route_models", "1.2.3.5")] == "[]"
        assert raw[("series_uids", "ct-liver|series|1.2.3.4")] == '["1.2.3.4","1.2.3.5"]'
        kept = json.loads(raw[("route_models", "1.2.3.6")])
        assert len(raw[("route_models", "1.2.3.6")]) <= 256 and kept == long_models.split("\\")[: len(kept)]
        assert len(kept) == 9, "the whole items that fit in 256 characters of JSON (not the 10th, cut)"
        with Session(engine) as s:
            assert s.exec(select(Study)).one().modalities == ["CT", "MR", "SR"]
            assert s.exec(select(Job)).one().series_uids == ["1.2.3.4", "1.2.3.5"]
            assert s.get(Series, "1.2.3.5").route_models == []
            assert s.get(Series, "1.2.3.6").route_models == kept

        with engine.begin() as c:
            command.downgrade(_alembic_config(c), "0007")
        after = _raw_lists(engine)
        assert after[("route_models", "1.2.3.6")] == "\\".join(kept)  # what fitted, joined again
        del before[("route_models", "1.2.3.6")], after[("route_models", "1.2.3.6")]
        assert after == before
    finally:
        engine.dispose()


def test_a_list_column_refuses_a_plain_string_and_keeps_whole_items():
    assert load_list(dump_list(["CT", "MR"], 64)) == ["CT", "MR"]
    assert dump_list([f"{i:09d}" for i in range(10)], 64) == json.dumps(
        [f"{i:09d}" for i in range(5)], separators=(",", ":")
    )
    assert load_list("") == []
    with pytest.raises(TypeError, match="not the string"):
        StringList(64).process_bind_param("CT\\MR", None)
    with pytest.raises(ValueError, match="JSON array of strings"):
        load_list('{"a": 1}')
