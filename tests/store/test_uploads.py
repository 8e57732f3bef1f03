"""The receiver's uploads and the routing gate (storage.object_store, docs/scale.md), on SQLite and
PostgreSQL, against SeaweedFS on loopback: a complete series is not routed until every instance
of it is in the store; an upload that fails marks nothing; another node's copy comes from the
store into its cache, byte for byte; retention deletes the objects."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from node.pipeline.route import load_rules
from node.runner import jobs
from node.runner.shared_files import Prefetcher, SharedFiles
from node.settings import ObjectStoreSettings
from node.store.db import make_engine
from node.store.objects import ObjectStore, ObjectStoreError, instance_key
from node.store.retention import prune
from node.store.tables import Instance, Series, SeriesState, Study, StudyState, utcnow
from node.store.uploads import upload_pending
from tests.helpers import REPO, free_port, sample_file
from tests.seaweed import SeaweedFS

FILES = ("CT_small.dcm", "MR_small.dcm")


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed"))
    yield server
    server.stop()


@pytest.fixture
def store(seaweed: SeaweedFS, tmp_path: Path) -> Iterator[ObjectStore]:
    s = ObjectStore(ObjectStoreSettings(**seaweed.settings(prefix=f"{tmp_path.name}/")))  # type: ignore[arg-type]
    yield s
    s.close()


def _received(engine, spool: Path) -> list[str]:  # type: ignore[no-untyped-def]
    """A complete study of one series of two instances, its files in ``spool``."""
    now = utcnow() - timedelta(days=30)
    paths = []
    with Session(engine) as s:
        s.add(Study(study_uid="1.2", first_received_at=now, last_received_at=now, state=StudyState.COMPLETE))
        s.flush()
        s.add(
            Series(
                series_uid="1.2.3",
                study_uid="1.2",
                state=SeriesState.COMPLETE,
                first_received_at=now,
                last_received_at=now,
            )
        )
        s.flush()
        for i, name in enumerate(FILES):
            path = f"1.2/1.2.3/{i}.dcm"
            (spool / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sample_file(name), spool / path)
            s.add(
                Instance(
                    sop_instance_uid=f"1.2.3.{i}",
                    series_uid="1.2.3",
                    study_uid="1.2",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    instance_number=i + 1,
                    byte_size=(spool / path).stat().st_size,
                    path=path,
                    received_at=now,
                )
            )
            paths.append(path)
        s.commit()
    return paths


def test_series_waits_for_its_uploads_and_another_node_reads_them_from_the_store(
    database_url: str, store: ObjectStore, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    spool = tmp_path / "receiver" / "spool"
    paths = _received(engine, spool)
    rules = load_rules(REPO / "config" / "routes.yaml")
    now = utcnow()
    try:
        down = ObjectStore(
            ObjectStoreSettings(
                endpoint_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: the store is down
                bucket="pacs",
                access_key="a",  # type: ignore[arg-type]
                secret_key="b",  # type: ignore[arg-type]
                max_attempts=2,
                timeout_s=1,
            )
        )
        with pytest.raises(ObjectStoreError, match="upload failed"):
            upload_pending(engine, down, spool, now)
        down.close()
        with Session(engine) as s:
            assert all(i.uploaded_at is None for i in s.exec(select(Instance)))  # nothing marked
            assert jobs.route_complete_series(s, rules, lambda m: False, spool, now, uploaded_only=True) == 0
            s.commit()
            assert s.get(Series, "1.2.3").state == SeriesState.COMPLETE  # waits for the uploads
        assert upload_pending(engine, store, tmp_path / "other" / "spool", now) == 0  # not its files
        assert upload_pending(engine, store, spool, now) == 2
        assert upload_pending(engine, store, spool, now) == 0  # marked: not put twice
        assert all(store.exists(instance_key(p)) for p in paths)
        with Session(engine) as s:
            assert jobs.route_complete_series(s, rules, lambda m: False, spool, now, uploaded_only=True) == 1
            s.commit()
            assert s.get(Series, "1.2.3").state != SeriesState.COMPLETE

            # a worker on another data folder: its spool lacks the files, its cache gets them
            worker = tmp_path / "worker"
            shared = SharedFiles(store, worker, worker / "spool", 10 * 2**20)
            job = jobs.Job(
                key="k",
                model_id="m",
                level="series",
                study_uid="1.2",
                series_uids=["1.2.3"],
                created_at=now,
                updated_at=now,
                not_before=now,
            )
            s.add(job)
            s.commit()
            # queued: its worker's prefetcher brings the files before the job is claimed
            assert Prefetcher(engine, shared, worker / "spool", depth=4).prefetch_once() == 2
            assert all((worker / "cache" / "spool" / p).is_file() for p in paths)
            stored = shared.localise(jobs.job_stored_files(s, job, worker / "spool"))
            assert [f.path for f in stored] == [worker / "cache" / "spool" / p for p in paths]
            assert [f.path.read_bytes() for f in stored] == [(spool / p).read_bytes() for p in paths]
            jobs.check_stored_files(stored)
            # routing on that node reads them from the cache too
            s.get(Series, "1.2.3").state = SeriesState.COMPLETE
            assert (
                jobs.route_complete_series(
                    s,
                    rules,
                    lambda m: False,
                    worker / "spool",
                    now,
                    localise=shared.localise,
                    uploaded_only=True,
                )
                == 1
            )
            assert "cannot be read" not in (s.get(Series, "1.2.3").route_note or "")
            s.rollback()
            s.get(jobs.Job, job.id).state = jobs.JobState.DONE
            s.commit()

        report = prune(
            engine, tmp_path / "receiver", spool, utcnow(), max_age=timedelta(days=1), objects=store
        )
        assert report.studies == ["1.2"]
        assert not any(store.exists(instance_key(p)) for p in paths)
    finally:
        engine.dispose()


def test_an_uploader_finds_its_files_behind_another_receivers_backlog(
    database_url: str, store: ObjectStore, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    spool = tmp_path / "receiver" / "spool"
    try:
        mine = _received(engine, spool)
        older = utcnow() - timedelta(days=60)
        with Session(engine) as s:  # another receiver's, not uploaded yet, received before ours
            for i in range(1, 10):
                s.add(
                    Instance(
                        sop_instance_uid=f"1.2.3.0.{i}",
                        series_uid="1.2.3",
                        study_uid="1.2",
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        byte_size=1,
                        path=f"1.2/1.2.3/other-{i}.dcm",
                        received_at=older,
                    )
                )
            s.commit()
        assert upload_pending(engine, store, spool, utcnow(), batch=1) == 1
        assert upload_pending(engine, store, spool, utcnow(), batch=1) == 1  # past 9 rows not its own
        assert upload_pending(engine, store, spool, utcnow(), batch=1) == 0
        assert all(store.exists(instance_key(p)) for p in mine)
        with Session(engine) as s:
            assert len([i for i in s.exec(select(Instance)) if i.uploaded_at is not None]) == 2
    finally:
        engine.dispose()
