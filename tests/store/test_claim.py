"""Concurrent workers (threads with their own sessions, as separate node processes would be) never
claim the same job twice; on PostgreSQL the select takes FOR UPDATE SKIP LOCKED."""

from __future__ import annotations

import threading

from sqlalchemy.exc import OperationalError
from sqlmodel import Session, select

from node.runner.jobs import claim_job
from node.store.db import make_engine
from node.store.tables import Job, JobState, utcnow

JOBS = 60
WORKERS = 6


def test_concurrent_claims_take_each_job_once(database_url):
    engine = make_engine(database_url)
    now = utcnow()
    with Session(engine) as s:
        for i in range(JOBS):
            s.add(
                Job(
                    key=f"m|series|{i}",
                    model_id="m",
                    level="series",
                    study_uid="1",
                    series_uids=[str(i)],
                    created_at=now,
                    updated_at=now,
                    not_before=now,
                )
            )
        s.commit()

    claimed: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(WORKERS)
    guard = threading.Lock()

    def worker() -> None:
        start.wait()
        idle = 0
        while idle < 3:
            try:
                with Session(engine, expire_on_commit=False) as s:
                    job = claim_job(s, utcnow())
                    s.commit()
            except OperationalError as exc:  # SQLite: "database is locked" under contention; try again
                if engine.dialect.name != "sqlite":
                    errors.append(exc)
                    return
                continue
            if job is None:
                idle += 1
                continue
            idle = 0
            with guard:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert len(claimed) == len(set(claimed)), "a job was claimed twice"
        with Session(engine) as s:
            rows = list(s.exec(select(Job)))
        assert sorted(claimed) == sorted(j.id for j in rows), "every job is claimed exactly once"
        assert all(j.state == JobState.PREPROCESSING and j.attempts == 1 for j in rows)
    finally:
        engine.dispose()
