"""Slow and misbehaving peers: a client that opens an association (or just a TCP connection) and
goes silent is cut off by the node's timeouts, freeing its slot; a client that aborts in the
middle of a data set leaves no partial file and no row behind."""

from __future__ import annotations

import socket
import time
from io import BytesIO

import pydicom
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from sqlmodel import Session, select

from node.store.tables import Instance
from tests.helpers import dataset_bytes, fresh_copy, make_series, raw_store_file, sample_file

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
SHORT = {"acse_timeout_s": 1.0, "dimse_timeout_s": 1.0, "network_timeout_s": 1.0, "max_associations": 1}


def _silent_association(port: int):  # noqa: ANN202
    ae = AE(ae_title="SILENT")
    ae.network_timeout = None  # the client itself never gives up
    ae.acse_timeout = 30
    ae.add_requested_context(CT, [EXPLICIT])
    return ae.associate("127.0.0.1", port, ae_title="PACSNODE")


def _wait_until(predicate, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_silent_association_is_cut_off_and_frees_its_slot(make_node, tmp_path):
    node = make_node(dicom=SHORT)
    (src,) = make_series(tmp_path / "in", 1)
    held = _silent_association(node.scp.port)
    assert held.is_established
    # the only slot is taken: a second association is turned away meanwhile
    ae = AE(ae_title="OTHER")
    ae.add_requested_context(CT, [EXPLICIT])
    other = ae.associate("127.0.0.1", node.scp.port, ae_title="PACSNODE")
    assert not other.is_established
    # the node's network timeout (1 s) aborts the silent association
    assert _wait_until(lambda: not held.is_alive(), 8.0), "silent association still held"
    assert held.is_aborted
    time.sleep(0.3)
    assert raw_store_file(node.scp.port, src) == 0  # the slot is free again


def test_silent_tcp_connection_is_closed_by_artim(make_node, tmp_path):
    node = make_node(dicom=SHORT)
    (src,) = make_series(tmp_path / "in", 1)
    with socket.create_connection(("127.0.0.1", node.scp.port)) as sock:
        sock.settimeout(8.0)
        started = time.monotonic()
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
        assert closed, "a connection that never sends A-ASSOCIATE-RQ was kept open"
        assert time.monotonic() - started < 6.0
    # the slot (max_associations 1) is free again once the node's acceptor thread has ended, which
    # can be a moment after the socket closed
    assert _wait_until(lambda: _stored(node.scp.port, src), 3.0), "the slot was not freed"


def _stored(port: int, path) -> bool:  # noqa: ANN001
    try:
        return raw_store_file(port, path) == 0
    except AssertionError:  # association refused: the slot is still taken
        return False


def _abort_mid_dataset(port: int, sop_instance: str, data: bytes) -> None:
    """Send the C-STORE command and the first part of the data set's fragments, then A-ABORT."""
    ae = AE(ae_title="ABORTER")
    ae.add_requested_context(CT, [EXPLICIT])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    context = assoc._get_valid_context(CT, EXPLICIT, "scu")
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = BytesIO(data)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.context_id = context.context_id
    fragments = list(msg.encode_msg(context.context_id, 4096))
    assert len(fragments) > 4
    for pdu in fragments[: len(fragments) // 2]:
        assert isinstance(pdu, P_DATA)
        assoc.dul.send_pdu(pdu)
    time.sleep(0.5)  # let the node take in what was sent
    assoc._reactor_checkpoint.set()
    assoc.abort()


def test_abort_mid_dataset_leaves_no_partial_file(make_node, tmp_path):
    node = make_node(dicom=SHORT)
    src = fresh_copy(sample_file("CT_small.dcm"), tmp_path / "a.dcm")
    sop = str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)
    _abort_mid_dataset(node.scp.port, sop, dataset_bytes(src))
    time.sleep(0.5)
    assert list(node.spool.tmp_dir.iterdir()) == []
    assert list(node.spool.root.rglob("*.dcm")) == []
    with Session(node.engine) as s:
        assert s.exec(select(Instance)).first() is None
    # the node keeps serving, and the same instance sent whole is stored
    assert raw_store_file(node.scp.port, src) == 0
    assert len(list(node.spool.root.rglob("*.dcm"))) == 1
