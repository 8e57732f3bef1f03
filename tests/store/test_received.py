"""Recording received instances: counts, duplicates, late instances, and writers racing on one
database (as several receiving processes do), on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import random
import threading
from datetime import timedelta

from sqlmodel import Session, select

from node.store.db import make_engine
from node.store.received import ReceivedInstance, record_instances
from node.store.tables import Instance, Series, SeriesState, Study, StudyState, utcnow

T0 = utcnow()


def received(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", modality: str = "CT", second: int = 0):
    return ReceivedInstance(
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid=series,
        study_uid=study,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=modality,
        body_part="ABDOMEN",
        series_number=1,
        series_description="desc",
        instance_number=1,
        byte_size=100,
        path=f"{study}/{series}/{sop}.dcm",
        calling_aet="SCU",
        received_at=T0 + timedelta(seconds=second),
    )


def test_counts_duplicates_and_modalities(database_url):
    engine = make_engine(database_url)
    with Session(engine) as s:
        new = record_instances(
            s, [received("1"), received("2"), received("1"), received("3", "1.2.3.2", modality="MR")]
        )
        s.commit()
    assert new == {"1", "2", "3"}
    with Session(engine) as s:
        new = record_instances(
            s, [received("2"), received("4", second=5), received("5", "1.2.3.3", modality="CT")]
        )
        s.commit()
    assert new == {"4", "5"}
    with Session(engine) as s:
        study = s.get(Study, "1.2.3")
        ct = s.get(Series, "1.2.3.1")
        mr = s.get(Series, "1.2.3.2")
        assert (study.instance_count, study.series_count, study.byte_size) == (5, 3, 500)
        assert study.modalities == ["CT", "MR"]
        assert (ct.instance_count, ct.byte_size, mr.instance_count) == (3, 300, 1)
        assert ct.last_received_at == T0 + timedelta(seconds=5)
        assert study.first_received_at == T0 and study.last_received_at == T0 + timedelta(seconds=5)
        assert len(s.exec(select(Instance)).all()) == 5
    with Session(engine) as s:  # only duplicates: nothing changes
        assert record_instances(s, [received("1"), received("5", "1.2.3.3")]) == set()
        s.commit()
        assert s.get(Study, "1.2.3").instance_count == 5


def test_late_instance_reopens_complete_series_and_study(database_url):
    engine = make_engine(database_url)
    with Session(engine) as s:
        record_instances(s, [received("1", second=10)])
        s.commit()
        series, study = s.get(Series, "1.2.3.1"), s.get(Study, "1.2.3")
        series.state, series.completed_at = SeriesState.ROUTED, T0 + timedelta(seconds=20)
        study.state, study.completed_at = StudyState.COMPLETE, T0 + timedelta(seconds=20)
        s.commit()
    with Session(engine) as s:  # an instance stamped earlier than the last one keeps the later time
        assert record_instances(s, [received("2", second=3)]) == {"2"}
        s.commit()
    with Session(engine) as s:
        series, study = s.get(Series, "1.2.3.1"), s.get(Study, "1.2.3")
        assert (series.state, series.completed_at) == (SeriesState.RECEIVING, None)
        assert (study.state, study.completed_at) == (StudyState.RECEIVING, None)
        assert series.last_received_at == T0 + timedelta(seconds=10)
        assert (series.instance_count, study.instance_count, study.series_count) == (2, 2, 1)


def test_racing_writers_count_each_instance_once(database_url):
    """Six writers record overlapping shuffled batches of the same 240 instances in 4 series."""
    engine = make_engine(database_url)
    items = [received(str(i), f"1.2.3.{i % 4}", modality="MR" if i % 4 == 3 else "CT") for i in range(240)]
    got: list[set[str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def writer(seed: int) -> None:
        mine = items[:]
        random.Random(seed).shuffle(mine)
        start.wait()
        try:
            for k in range(0, len(mine), 20):
                with Session(engine) as s:
                    got.append(record_instances(s, mine[k : k + 20]))
                    s.commit()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    claimed = [uid for batch in got for uid in batch]
    assert sorted(claimed, key=int) == [str(i) for i in range(240)]  # each new exactly once
    with Session(engine) as s:
        study = s.get(Study, "1.2.3")
        assert (study.instance_count, study.series_count, study.byte_size) == (240, 4, 24000)
        assert sorted(study.modalities) == ["CT", "MR"]
        assert [s.get(Series, f"1.2.3.{k}").instance_count for k in range(4)] == [60] * 4


def test_duplicate_keeps_a_receiving_series_open_but_leaves_a_complete_one(database_url):
    engine = make_engine(database_url)
    with Session(engine) as s:
        record_instances(s, [received("1"), received("2", "1.2.3.2")])
        s.commit()
        done = s.get(Series, "1.2.3.2")
        done.state, done.completed_at = SeriesState.ROUTED, T0 + timedelta(seconds=1)
        s.commit()
    with Session(engine) as s:  # both resent 30 s later: duplicates, nothing new
        assert record_instances(s, [received("1", second=30), received("2", "1.2.3.2", second=30)]) == set()
        s.commit()
    with Session(engine) as s:
        open_, done = s.get(Series, "1.2.3.1"), s.get(Series, "1.2.3.2")
        assert open_.last_received_at == T0 + timedelta(seconds=30)
        assert (open_.state, open_.instance_count) == (SeriesState.RECEIVING, 1)
        assert (done.state, done.last_received_at) == (SeriesState.ROUTED, T0)
        assert s.get(Study, "1.2.3").last_received_at == T0 + timedelta(seconds=30)


def test_known_uid_under_another_study_or_series_leaves_no_row_behind(database_url):
    """A SOP Instance UID resent under new study/series UIDs makes no study or series row (it would
    complete as an empty study); a new instance in the same batch keeps the rows it needs."""
    engine = make_engine(database_url)
    with Session(engine) as s:
        record_instances(s, [received("1")])
        s.commit()
    with Session(engine) as s:
        new = record_instances(
            s,
            [received("1", "9.9.1", "9.9"), received("1", "1.2.3.7")],  # new study; new series
        )
        s.commit()
    assert new == set()
    with Session(engine) as s:
        # a new instance in a new study, with the known UID under a sibling series of it
        new = record_instances(s, [received("2", "9.8.2", "9.8"), received("1", "9.8.1", "9.8")])
        s.commit()
    assert new == {"2"}
    with Session(engine) as s:
        assert sorted(st.study_uid for st in s.exec(select(Study))) == ["1.2.3", "9.8"]
        assert sorted(se.series_uid for se in s.exec(select(Series))) == ["1.2.3.1", "9.8.2"]
        assert s.get(Study, "9.8").series_count == 1 and s.get(Study, "9.8").instance_count == 1
        assert s.get(Study, "1.2.3").series_count == 1 and s.get(Study, "1.2.3").instance_count == 1
        assert s.get(Instance, "1").study_uid == "1.2.3"


def test_replaced_instance_reopens_its_series_and_makes_a_revision_job(database_url):
    import json

    from node.runner.jobs import _new_job
    from node.store.received import replace_instance, stored_instances
    from node.store.tables import Job, JobState

    engine = make_engine(database_url)
    with Session(engine) as s:
        record_instances(s, [received("1")])
        s.commit()
        series = s.get(Series, "1.2.3.1")
        series.state, series.completed_at = SeriesState.ROUTED, T0 + timedelta(seconds=5)
        s.add(
            Job(
                key="m|series|1.2.3.1",
                model_id="m",
                level="series",
                study_uid="1.2.3",
                series_uids=["1.2.3.1"],
                state=JobState.DONE,
                result=json.dumps({"images": 1}),
                created_at=T0,
                updated_at=T0,
                not_before=T0,
                started_at=T0 + timedelta(seconds=6),
            )
        )
        s.commit()
        # nothing new: no revision
        assert _new_job(s, "m", "r", "series", "1.2.3", ["1.2.3.1"], T0 + timedelta(seconds=7)) is False
    later = dataclasses.replace(received("1", second=60), byte_size=150, sha256="ab")
    with Session(engine) as s:
        old = stored_instances(s, ["1"])["1"]
        replace_instance(s, later, old)
        s.commit()
    with Session(engine) as s:
        row = s.get(Instance, "1")
        assert (row.sha256, row.byte_size, row.replaced_at) == ("ab", 150, T0 + timedelta(seconds=60))
        series, study = s.get(Series, "1.2.3.1"), s.get(Study, "1.2.3")
        assert (series.state, series.completed_at, series.instance_count) == (SeriesState.RECEIVING, None, 1)
        assert (series.byte_size, study.byte_size, study.state) == (150, 150, StudyState.RECEIVING)
        assert _new_job(s, "m", "r", "series", "1.2.3", ["1.2.3.1"], T0 + timedelta(seconds=70)) is True
        s.commit()
        assert [j.key for j in s.exec(select(Job))] == ["m|series|1.2.3.1", "m|series|1.2.3.1#2"]
