"""Which destination gets what: the kind decides (objects for dicom/dicomweb, one message per job
for hl7/fhir), the per-destination switches still apply, ``send_to: origin`` chooses only among
destinations with an AE title, and existing configurations (no kind) stay C-STORE destinations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlmodel import Session

from node.runner import outbox
from node.send import make_destination
from node.send.cstore import CStoreDestination
from node.settings import DestinationSettings, load_settings
from node.store.tables import Job, utcnow
from tests.helpers import write_config
from tests.send.conftest import IDENTITY, chest_result, chest_source, items, queue_message, stand_in_outputs

PACS = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}
ARCHIVE = {
    "name": "archive",
    "kind": "dicomweb",
    "url": "http://127.0.0.1:1/dicom-web",
    "parametric_map": False,
}
RIS = {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": 2575}
EHR = {"name": "ehr", "kind": "fhir", "url": "http://127.0.0.1:1/fhir", "token": "s3cr3t-token"}


def test_a_configuration_without_kind_is_dicom_and_each_kind_needs_its_fields(tmp_path):
    settings = load_settings(write_config(tmp_path, destinations=[PACS, ARCHIVE, RIS, EHR]))
    pacs, archive, ris, ehr = settings.destinations
    assert pacs.kind == "dicom" and isinstance(make_destination(pacs, "PACSNODE"), CStoreDestination)
    assert [d.takes_objects for d in settings.destinations] == [True, True, False, False]
    assert "s3cr3t" not in repr(ehr) and "s3cr3t" not in settings.model_dump_json()  # a secret
    with pytest.raises(ValidationError, match="needs ae_title, host, port"):
        DestinationSettings(name="x")
    with pytest.raises(ValidationError, match="needs url"):
        DestinationSettings(name="x", kind="fhir")
    with pytest.raises(ValidationError, match="not both"):
        DestinationSettings(name="x", kind="dicomweb", url="http://h/", username="u", token="t")
    with pytest.raises(ValidationError, match="hl7 section"):
        DestinationSettings(name="x", kind="fhir", url="http://h/", hl7={"receiving_application": "X"})
    with pytest.raises(ValidationError, match="triage_field"):
        DestinationSettings(name="x", kind="hl7", host="h", port=1, hl7={"triage_field": "OBX-5"})


def test_origin_chooses_among_titled_destinations_and_messages_always_go():
    dests = [
        DestinationSettings(**d) for d in (PACS, {**PACS, "name": "other", "ae_title": "OTHER"}, ARCHIVE, RIS)
    ]
    chosen = outbox.choose_destinations(dests, "origin", {"PACS"})
    assert [d.name for d in chosen] == ["pacs", "archive", "ris"]
    assert [d.name for d in outbox.choose_destinations(dests, "origin", {"NOBODY"})] == [
        d.name for d in dests
    ]


def test_objects_go_to_object_kinds_and_messages_to_message_kinds(store, tmp_path):
    engine, job_id = store
    dests = [DestinationSettings(**d) for d in (PACS, ARCHIVE, RIS, EHR)]
    files = stand_in_outputs("dispatch", 1)
    files.append(("pm", stand_in_outputs("dispatch-pm", 1)[0][1]))
    written = outbox.write_output_files(tmp_path / "outbox", job_id, files)
    with Session(engine) as s:
        # sc to pacs and archive; pm only to pacs (archive: parametric_map false); none to ris/ehr
        assert outbox.queue_outputs(s, s.get(Job, job_id), written, dests, tmp_path, utcnow()) == 3
        s.commit()
    messages = queue_message(engine, job_id, tmp_path, dests)
    assert [(m.destination, m.kind) for m in messages] == [("ris", "hl7"), ("ehr", "fhir")]
    rows = {(r.destination, r.kind) for r in items(engine)}
    assert rows == {("pacs", "sc"), ("pacs", "pm"), ("archive", "sc"), ("ris", "hl7"), ("ehr", "fhir")}
    with Session(engine) as s:  # a retried job writes the same messages: the same UIDs
        job = s.get(Job, job_id)
        rewritten = outbox.write_messages(
            tmp_path / "outbox", job, chest_result(), [chest_source()], IDENTITY, dests, utcnow()
        )
    assert [m.uid for m in rewritten] == [m.uid for m in messages]
