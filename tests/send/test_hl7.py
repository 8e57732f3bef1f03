"""HL7 v2 ORU^R01 over MLLP to python-hl7's MLLP server on loopback: the message parsed back by
python-hl7, ACK handling (AA delivered, AR retried, AE parked), the receiver down then up, and
the triage flag in a configured field."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session

from node.send import make_destination
from node.send.hl7 import MllpDestination
from node.settings import DestinationSettings
from node.store.tables import Job, JobState, OutboxState, utcnow
from tests.helpers import free_port
from tests.send.conftest import deliver, items, queue_message
from tests.send.peers import MllpReceiver


def _ris(port: int, **hl7: object) -> DestinationSettings:
    return DestinationSettings(
        name="ris", kind="hl7", host="127.0.0.1", port=port, max_attempts=4, backoff_initial_s=5, hl7=hl7
    )


def test_oru_for_a_positive_chest_study_received_and_parsed_back(store, tmp_path):
    engine, job_id = store
    ris = MllpReceiver()
    try:
        dest = _ris(ris.port, receiving_facility="RADIOLOGY")
        sender = make_destination(dest, calling_aet="PACSNODE")
        assert isinstance(sender, MllpDestination)
        (written,) = queue_message(engine, job_id, tmp_path, [dest])
        t0 = utcnow()
        assert deliver(engine, {"ris": (dest, sender)}, tmp_path, t0) == 1
        assert deliver(engine, {"ris": (dest, sender)}, tmp_path, t0 + timedelta(hours=1)) == 0  # once
        (row,) = items(engine)
        assert (row.state, row.kind, row.attempts, row.last_error) == (OutboxState.SENT, "hl7", 1, "")
        assert row.sop_instance_uid == written.uid
        with Session(engine) as s:
            assert s.get(Job, job_id).state == JobState.DONE

        (msg,) = ris.received
        assert str(msg.segment("MSH")(9)) == "ORU^R01^ORU_R01"
        assert str(msg.segment("MSH")(12)) == "2.5.1"
        assert str(msg.segment("MSH")(6)) == "RADIOLOGY"
        pid = msg.segment("PID")
        assert str(pid(3)(1)(1)) == "PHANTOM-0042" and str(pid(3)(1)(4)) == "NODE-TEST"
        assert str(pid(5)(1)(1)) == "Phantom" and str(pid(7)) == "19700101" and str(pid(8)) == "F"
        obr = msg.segment("OBR")
        assert msg.unescape(str(obr(18))) == "ACC-1|2^3"  # escaped on the wire, the same value back
        assert str(obr(4)(1)(1)) == "cxr" and str(obr(25)) == "F"
        assert str(obr(27)(1)(6)) == "S"  # urgent: tuberculosis is a triage finding
        assert str(msg.segment("ZDS")(1)(1)(1)) == "1.2.826.0.1.3680043.8.498.77.1"
        obx = {str(seg(3)(1)(2)): seg for seg in msg.segments("OBX")}
        assert str(obx["Algorithm Name"](5)) == "CXR triage (research)"
        assert str(obx["Algorithm Version"](5)) == "1.0.0"
        tb, pneumonia = obx["Tuberculosis"], obx["Pneumonia"]
        assert (str(tb(2)), str(tb(3)(1)(1)), str(tb(3)(1)(3))) == ("NM", "56717001", "SCT")
        assert float(str(tb(5))) == 0.9132 and str(tb(8)) == "A" and str(tb(11)) == "F"
        assert float(str(pneumonia(5))) == 0.0412 and str(pneumonia(8)) == "N"
        assert str(tb(18)(1)(1)) == "cxr 1.0.0"
        assert [int(str(s(1))) for s in msg.segments("OBX")] == [1, 2, 3, 4]
        assert "not for diagnostic use" in str(msg.segment("NTE")(3))
    finally:
        ris.stop()


def test_ack_ar_is_retried_and_ae_is_parked(store, tmp_path):
    engine, job_id = store
    ris = MllpReceiver()
    try:
        ris.acks = ["AR"]
        dest = _ris(ris.port)
        destinations = {"ris": (dest, make_destination(dest, calling_aet="PACSNODE"))}
        queue_message(engine, job_id, tmp_path, [dest])
        t0 = utcnow()
        assert deliver(engine, destinations, tmp_path, t0) == 0
        (row,) = items(engine)
        assert row.state == OutboxState.PENDING and row.last_error.startswith("ACK AR")
        assert deliver(engine, destinations, tmp_path, t0 + timedelta(seconds=6)) == 1
        assert items(engine)[0].state == OutboxState.SENT
        first, second = ris.received  # the same message (same control ID) sent again
        assert str(first.segment("MSH")(10)) == str(second.segment("MSH")(10))

        other = _ris(ris.port).model_copy(update={"name": "ris2"})
        destinations["ris2"] = (other, make_destination(other, calling_aet="PACSNODE"))
        with Session(engine) as s:
            job = s.get(Job, job_id)
            job.state = JobState.WRITING
            s.add(job)
            s.commit()
        ris.acks = ["AE"]
        queue_message(engine, job_id, tmp_path, [other])
        assert deliver(engine, destinations, tmp_path, t0 + timedelta(seconds=7)) == 0
        parked = next(r for r in items(engine) if r.destination == "ris2")
        assert (parked.state, parked.attempts) == (OutboxState.FAILED, 1)  # at once, not max_attempts
        assert "ACK AE" in parked.last_error
        with Session(engine) as s:
            assert s.get(Job, job_id).state == JobState.FAILED
    finally:
        ris.stop()


def test_receiver_down_then_up_and_triage_in_a_configured_field(store, tmp_path):
    engine, job_id = store
    port = free_port()
    dest = _ris(port, triage_field="OBR-5", triage_urgent="STAT")
    destinations = {"ris": (dest, make_destination(dest, calling_aet="PACSNODE"))}
    queue_message(engine, job_id, tmp_path, [dest])
    t0 = utcnow()
    assert deliver(engine, destinations, tmp_path, t0) == 0
    (row,) = items(engine)
    assert row.state == OutboxState.PENDING and row.last_error.startswith("not reachable")
    ris = MllpReceiver(port)
    try:
        assert deliver(engine, destinations, tmp_path, t0 + timedelta(seconds=6)) == 1
        (msg,) = ris.received
        assert str(msg.segment("OBR")(5)) == "STAT"
        assert len(msg.segment("OBR")) <= 27  # OBR-27, the default place, is not written
    finally:
        ris.stop()
