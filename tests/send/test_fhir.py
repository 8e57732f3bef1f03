"""FHIR R4 out: the transaction Bundle for a positive chest study, received by a FHIR transaction
endpoint on loopback (tests/send/peers.py; no FHIR server installs from the package registries
here), validated there with fhir.resources and parsed back; bearer authentication, retries, a
resend that creates nothing twice, and a refused Bundle parked at once."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session

from node.send import make_destination
from node.send.fhir import FhirDestination
from node.settings import DestinationSettings
from node.store.tables import Job, JobState, OutboxState, utcnow
from tests.send.conftest import deliver, items, queue_message
from tests.send.peers import FhirReceiver


def _ehr(url: str, token: str = "ehr-token") -> DestinationSettings:
    return DestinationSettings(
        name="ehr", kind="fhir", url=url, token=token, max_attempts=4, backoff_initial_s=5
    )


def test_diagnostic_report_for_a_positive_chest_study_received_and_parsed_back(store, tmp_path):
    engine, job_id = store
    ehr = FhirReceiver(token="ehr-token")
    try:
        dest = _ehr(ehr.url)
        sender = make_destination(dest, calling_aet="PACSNODE")
        assert isinstance(sender, FhirDestination)
        queue_message(engine, job_id, tmp_path, [dest])
        t0 = utcnow()
        assert deliver(engine, {"ehr": (dest, sender)}, tmp_path, t0) == 1
        (row,) = items(engine)
        assert (row.state, row.kind, row.attempts) == (OutboxState.SENT, "fhir", 1)
        with Session(engine) as s:
            assert s.get(Job, job_id).state == JobState.DONE

        (bundle,) = ehr.bundles
        by_type: dict[str, list] = {}
        for entry in bundle.entry:
            by_type.setdefault(entry.resource.get_resource_type(), []).append(entry)
        (report,) = by_type["DiagnosticReport"]
        (study,) = by_type["ImagingStudy"]
        (device,) = by_type["Device"]
        (patient,) = by_type["Patient"]
        observations = by_type["Observation"]
        assert len(observations) == 2  # one per finding
        dr = report.resource
        assert dr.status == "final" and dr.category[0].coding[0].code == "RAD"
        assert {r.reference for r in dr.result} == {o.fullUrl for o in observations}
        assert dr.imagingStudy[0].reference == study.fullUrl
        assert dr.subject.reference == patient.fullUrl
        assert "Tuberculosis" not in (dr.conclusion or "") and "tuberculosis" in dr.conclusion
        assert study.resource.identifier[0].system == "urn:dicom:uid"
        assert study.resource.identifier[0].value == "urn:oid:1.2.826.0.1.3680043.8.498.77.1"
        assert study.resource.identifier[1].value == "ACC-1|2^3"
        assert patient.resource.identifier[0].value == "PHANTOM-0042"
        assert patient.resource.gender == "female" and str(patient.resource.birthDate) == "1970-01-01"
        assert device.resource.version[0].value == "1.0.0"
        obs = {o.resource.code.coding[0].code: o.resource for o in observations}
        tb = obs["56717001"]
        assert tb.code.coding[0].system == "http://snomed.info/sct"
        assert tb.valueCodeableConcept.coding[0].code == "52101004"  # Present
        assert tb.interpretation[0].coding[0].code == "A"
        assert tb.component[0].code.coding[0].code == "122157"  # DCM Probability
        assert float(tb.component[0].valueQuantity.value) == 0.9132
        assert tb.derivedFrom[0].reference == study.fullUrl and tb.device.reference == device.fullUrl
        pneumonia = obs["233604007"]
        assert pneumonia.valueCodeableConcept.coding[0].code == "272519000"  # Absent
        assert pneumonia.interpretation[0].coding[0].code == "N"
        assert all(e.request.method == "POST" and e.request.ifNoneExist for e in bundle.entry)

        created = dict(ehr.stored)
        answer = ehr.transaction(row_path_bytes(tmp_path, row.path))  # the same Bundle again
        assert {e["response"]["status"] for e in answer["entry"]} == {"200 OK"}  # nothing created twice
        assert ehr.stored == created
    finally:
        ehr.stop()


def row_path_bytes(data_dir, path: str) -> bytes:
    """The queued Bundle's bytes."""
    return (data_dir / path).read_bytes()


def test_wrong_token_and_outage_are_retried_and_a_refused_bundle_is_parked(store, tmp_path):
    engine, job_id = store
    ehr = FhirReceiver(token="ehr-token")
    try:
        wrong = _ehr(ehr.url, token="stale")
        queue_message(engine, job_id, tmp_path, [wrong])
        t0 = utcnow()
        assert deliver(engine, {"ehr": (wrong, make_destination(wrong, "PACSNODE"))}, tmp_path, t0) == 0
        (row,) = items(engine)
        assert (row.state, row.last_error) == (OutboxState.PENDING, "HTTP 401 Unauthorized")
        right = _ehr(ehr.url)
        destinations = {"ehr": (right, make_destination(right, "PACSNODE"))}
        ehr.fail_next = [503]
        assert deliver(engine, destinations, tmp_path, t0 + timedelta(seconds=6)) == 0
        assert items(engine)[0].last_error == "HTTP 503 Service Unavailable"
        assert deliver(engine, destinations, tmp_path, t0 + timedelta(minutes=1)) == 1
        assert len(ehr.bundles) == 1

        with Session(engine) as s:
            job = s.get(Job, job_id)
            job.state = JobState.WRITING
            s.add(job)
            s.commit()
        other = right.model_copy(update={"name": "ehr2"})
        destinations["ehr2"] = (other, make_destination(other, "PACSNODE"))
        queue_message(engine, job_id, tmp_path, [other])
        ehr.fail_next = [422]
        assert deliver(engine, destinations, tmp_path, t0 + timedelta(minutes=2)) == 0
        parked = next(r for r in items(engine) if r.destination == "ehr2")
        assert (parked.state, parked.attempts) == (OutboxState.FAILED, 1)
        assert parked.last_error.startswith("HTTP 422 Unprocessable")
    finally:
        ehr.stop()
