"""STOW-RS out against Orthanc's DICOMweb plugin: basic and bearer authentication, refused
credentials, and the outage test (destination down, then up: every object delivered exactly once)."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session

from node.runner import outbox
from node.send import make_destination
from node.send.dicomweb import StowDestination
from node.settings import DestinationSettings
from node.store.tables import Job, JobState, OutboxState, utcnow
from tests.helpers import free_port
from tests.send.conftest import deliver, items, stand_in_outputs


def _queue(engine, job_id: int, data_dir, dest: DestinationSettings, count: int) -> list[str]:
    written = outbox.write_output_files(data_dir / "outbox", job_id, stand_in_outputs(str(data_dir), count))
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert outbox.queue_outputs(s, job, written, [dest], data_dir, utcnow()) == count
        job.state = JobState.SENDING
        s.add(job)
        s.commit()
    return [str(ds.SOPInstanceUID) for _, ds, _ in written]


def test_outage_then_every_object_delivered_exactly_once(store, tmp_path, orthanc_factory):
    engine, job_id = store
    port = free_port()
    dest = DestinationSettings(
        name="archive",
        kind="dicomweb",
        url=f"http://127.0.0.1:{port}/dicom-web",
        username="node",
        password="stow-secret",
        max_attempts=5,
        backoff_initial_s=10,
        timeout_s=10,
    )
    sender = make_destination(dest, calling_aet="PACSNODE")
    assert isinstance(sender, StowDestination)
    destinations = {"archive": (dest, sender)}
    uids = _queue(engine, job_id, tmp_path, dest, 4)

    t0 = utcnow()
    assert deliver(engine, destinations, tmp_path, t0) == 0  # down: nothing listens
    rows = items(engine)
    assert all(r.state == OutboxState.PENDING and r.attempts == 1 for r in rows)
    assert all(r.last_error.startswith("not reachable") for r in rows)
    assert all(r.next_attempt_at >= t0 + timedelta(seconds=9) for r in rows)
    assert deliver(engine, destinations, tmp_path, t0 + timedelta(seconds=1)) == 0  # not due yet
    assert all(r.attempts == 1 for r in items(engine))

    peer = orthanc_factory(port)  # up
    assert deliver(engine, destinations, tmp_path, t0 + timedelta(seconds=11)) == 4
    assert deliver(engine, destinations, tmp_path, t0 + timedelta(hours=1)) == 0  # nothing left to send
    rows = items(engine)
    assert all(r.state == OutboxState.SENT and r.attempts == 2 for r in rows)
    assert sorted(peer.instance_uids()) == sorted(uids)  # each once
    with Session(engine) as s:
        assert s.get(Job, job_id).state == JobState.DONE


def test_bearer_token_and_refused_credentials(store, tmp_path, orthanc_factory):
    """A wrong password is retried (it may be fixed at the server), never parked at once; a bearer
    token goes in the Authorization header (Orthanc without a token plugin refuses it: 401)."""
    engine, job_id = store
    port = free_port()
    peer = orthanc_factory(port)
    wrong = DestinationSettings(
        name="archive", kind="dicomweb", url=peer.url, username="node", password="nope", max_attempts=2
    )
    destinations = {"archive": (wrong, make_destination(wrong, calling_aet="PACSNODE"))}
    _queue(engine, job_id, tmp_path, wrong, 2)
    t0 = utcnow()
    assert deliver(engine, destinations, tmp_path, t0) == 0
    rows = items(engine)
    assert all(r.state == OutboxState.PENDING and r.last_error == "HTTP 401 Unauthorized" for r in rows)
    assert peer.instance_uids() == []

    bearer = DestinationSettings(name="archive", kind="dicomweb", url=peer.url, token="t0ken", max_attempts=2)
    sender = make_destination(bearer, calling_aet="PACSNODE")
    assert sender._session.headers["Authorization"] == "Bearer t0ken"  # type: ignore[attr-defined]
    right = wrong.model_copy(
        update={
            "password": DestinationSettings(
                name="x", kind="dicomweb", url=peer.url, username="node", password="stow-secret"
            ).password
        }
    )
    destinations = {"archive": (right, make_destination(right, calling_aet="PACSNODE"))}
    assert deliver(engine, destinations, tmp_path, t0 + timedelta(hours=1)) == 2
    assert len(peer.instance_uids()) == 2
