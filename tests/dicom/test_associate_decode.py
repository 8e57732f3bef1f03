"""The A-ASSOCIATE-RQ is decoded once per association: the gate's decoded PDU is the one the DUL
negotiates with (decoding a request of ~120 contexts costs ~4 ms of CPU)."""

from __future__ import annotations

from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from node.allowlist import AllowList
from node.dicom.transport import Gate, NetworkLimits, start_gated_server
from node.prometheus import NodeMetrics
from node.settings import DicomSettings


def test_associate_rq_decoded_once_and_events_fire(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    original = A_ASSOCIATE_RQ.decode

    def counting(self: A_ASSOCIATE_RQ, bytestream: bytes) -> None:
        decoded.append(len(bytestream))
        original(self, bytestream)

    monkeypatch.setattr(A_ASSOCIATE_RQ, "decode", counting)
    seen: list[tuple[str, Any]] = []
    settings = DicomSettings(host="127.0.0.1")
    ae = AE(ae_title="PACSNODE")
    ae.add_supported_context(CTImageStorage)
    ae.add_supported_context(Verification)
    handlers: list[Any] = [
        (evt.EVT_DATA_RECV, lambda e: seen.append(("data", e.data[:1]))),
        (evt.EVT_PDU_RECV, lambda e: seen.append(("pdu", type(e.pdu).__name__))),
        (evt.EVT_C_ECHO, lambda e: 0x0000),
    ]
    gate = Gate(NetworkLimits.of(settings), AllowList.parse([]), NodeMetrics())
    server = start_gated_server(ae, ("127.0.0.1", 0), gate, handlers, list(ae.supported_contexts))
    try:
        port = server.server_address[1]
        for _ in range(2):
            requestor = AE(ae_title="SCU")
            requestor.add_requested_context(Verification)
            requestor.add_requested_context(CTImageStorage)
            assoc = requestor.associate("127.0.0.1", port, ae_title="PACSNODE")
            assert assoc.is_established
            assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification, CTImageStorage]
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
    finally:
        server.shutdown()
        server.server_close()
    assert len(decoded) == 2, "one decode per association (the gate's)"
    assert seen.count(("data", b"\x01")) == 2, "EVT_DATA_RECV still fires with the request's bytes"
    assert seen.count(("pdu", "A_ASSOCIATE_RQ")) == 2, "EVT_PDU_RECV still fires with the request"


def test_remembered_uid_validation_answers_as_pydicom() -> None:
    """The remembered UID checks (node.dicom.transport) answer as pydicom's own, and pydicom still
    warns about an invalid UID every time one is made."""
    import re
    import warnings

    from pydicom.uid import RE_VALID_UID, UID
    from pydicom.valuerep import VALIDATORS, validate_length_and_type_and_regex
    from pynetdicom._config import VALIDATORS as pynetdicom_validators
    from pynetdicom._validators import validate_ui

    from node.dicom.transport import remember_uid_checks

    remember_uid_checks()  # as the node's DICOM server does when it starts
    assert getattr(VALIDATORS["UI"], "memoized", False)
    values = ["1.2.3", "1.02", "0", "", "1." * 40 + "1", "1.2.840.10008.1.2.1", "a.b", "1.2 ", "1..2"]
    for value in values * 2:
        assert VALIDATORS["UI"]("UI", value) == validate_length_and_type_and_regex("UI", value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            uid = UID(value)  # stripped
        assert uid.is_valid is (len(uid) <= 64 and re.match(RE_VALID_UID, uid) is not None)
        assert pynetdicom_validators["UI"](uid) == validate_ui(uid)
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            UID("1.02")
        assert any("Invalid value for VR UI" in str(w.message) for w in caught)
