"""Retention removes only finished studies (jobs done, outputs sent), by age and under a free-space
watermark, rows and files together; pending work is never touched."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlmodel import Session, select
from typer.testing import CliRunner

from node.cli import app
from node.store.db import make_engine
from node.store.retention import prune
from node.store.tables import (
    DuplicateEvent,
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from tests.helpers import write_config

NOW = utcnow()


def _study(engine, data: Path, uid: str, age_days: float, job_state: str | None, sent: bool) -> list[Path]:
    """A complete study with one instance, optionally one job and one output; returns its files."""
    at = NOW - timedelta(days=age_days)
    spool_file = data / "spool" / uid / f"{uid}.1" / f"{uid}.1.1.dcm"
    spool_file.parent.mkdir(parents=True)
    spool_file.write_bytes(b"x" * 1000)
    files = [spool_file]
    with Session(engine) as s:
        s.add(Study(study_uid=uid, state="complete", first_received_at=at, last_received_at=at))
        s.flush()
        s.add(
            Series(
                series_uid=f"{uid}.1",
                study_uid=uid,
                state=SeriesState.ROUTED if job_state else SeriesState.NOT_ROUTED,
                first_received_at=at,
                last_received_at=at,
            )
        )
        s.flush()
        s.add(
            Instance(
                sop_instance_uid=f"{uid}.1.1",
                series_uid=f"{uid}.1",
                study_uid=uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                byte_size=1000,
                path=str(spool_file.relative_to(data / "spool")),
                received_at=at,
            )
        )
        s.commit()
        if job_state:
            job = Job(
                key=f"m|series|{uid}.1",
                model_id="m",
                level="series",
                study_uid=uid,
                series_uids=[f"{uid}.1"],
                state=job_state,
                created_at=at,
                updated_at=at,
                not_before=at,
            )
            s.add(job)
            s.commit()
            out = data / "outbox" / str(job.id) / "sr.dcm"
            out.parent.mkdir(parents=True)
            out.write_bytes(b"y" * 500)
            files.append(out)
            s.add(
                OutboxItem(
                    job_id=job.id,
                    destination="pacs",
                    kind="sr",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    sop_instance_uid=f"{uid}.9",
                    path=str(out.relative_to(data)),
                    state=OutboxState.SENT if sent else OutboxState.PENDING,
                    next_attempt_at=at,
                    created_at=at,
                )
            )
            s.commit()
    return files


def _studies(engine) -> set[str]:
    with Session(engine) as s:
        return set(s.exec(select(Study.study_uid)))


def test_age_and_watermark_remove_only_finished_studies(tmp_path, database_url):
    data = tmp_path / "data"
    engine = make_engine(database_url)
    try:
        old_done = _study(engine, data, "1.1", 30, JobState.DONE, sent=True)
        old_not_routed = _study(engine, data, "1.2", 30, None, sent=False)
        old_queued = _study(engine, data, "1.3", 30, JobState.QUEUED, sent=False)
        old_unsent = _study(engine, data, "1.4", 30, JobState.DONE, sent=False)
        new_done = _study(engine, data, "1.5", 1, JobState.DONE, sent=True)
        with Session(engine) as s:  # a copy of a stored instance was received for 1.1 and 1.3
            for uid in ("1.1", "1.3"):
                s.add(
                    DuplicateEvent(
                        received_at=NOW,
                        sop_instance_uid=f"{uid}.1.1",
                        study_uid=uid,
                        series_uid=f"{uid}.1",
                        received_study_uid="9.9",
                        received_series_uid="9.9.1",
                        content_differs=True,
                        conflict="study UID differs",
                        action="kept first",
                    )
                )
            s.commit()

        dry = prune(engine, data, data / "spool", NOW, max_age=timedelta(days=7), dry_run=True)
        assert sorted(dry.studies) == ["1.1", "1.2"] and dry.bytes == 2500
        assert _studies(engine) == {"1.1", "1.2", "1.3", "1.4", "1.5"}

        report = prune(engine, data, data / "spool", NOW, max_age=timedelta(days=7))
        assert sorted(report.studies) == ["1.1", "1.2"] and report.files == 3
        assert _studies(engine) == {"1.3", "1.4", "1.5"}
        assert not any(p.exists() for p in old_done + old_not_routed)
        assert not (data / "spool" / "1.1").exists(), "empty study folders go too"
        assert all(p.exists() for p in old_queued + old_unsent + new_done)
        with Session(engine) as s:  # a removed study's duplicate events go with it
            assert [e.study_uid for e in s.exec(select(DuplicateEvent))] == ["1.3"]

        # under the watermark: the oldest finished studies go whatever their age; pending ones stay
        freed = prune(engine, data, data / "spool", NOW, min_free_bytes=10**12, free_bytes=lambda: 0)
        assert freed.studies == ["1.5"]
        assert _studies(engine) == {"1.3", "1.4"}
        with Session(engine) as s:
            assert {j.study_uid for j in s.exec(select(Job))} == {"1.3", "1.4"}
            assert len(list(s.exec(select(OutboxItem)))) == 2
    finally:
        engine.dispose()


def test_cli_prune(tmp_path, database_url):
    config = write_config(tmp_path, storage={"database_url": database_url})
    engine = make_engine(database_url)
    _study(engine, tmp_path / "data", "2.1", 40, JobState.DONE, sent=True)
    engine.dispose()
    runner = CliRunner()
    assert runner.invoke(app, ["db", "prune", "--config", str(config)]).exit_code == 2
    dry = runner.invoke(app, ["db", "prune", "--older-than-days", "30", "--dry-run", "--config", str(config)])
    assert dry.exit_code == 0 and "would remove 1 studies (2 files" in dry.output
    done = runner.invoke(app, ["db", "prune", "--older-than-days", "30", "--config", str(config)])
    assert done.exit_code == 0 and "removed 1 studies" in done.output
