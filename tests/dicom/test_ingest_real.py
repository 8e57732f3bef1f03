"""Real hospital DICOM at ingest (issue 13): one bad data set never aborts its association, data
sets written with VR UN are stored and filed by their header values, and every storage SOP class
DCMTK's storescp accepts (the retired ones too) is accepted, against real DCMTK peers."""

from __future__ import annotations

import struct
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from sqlmodel import Session, select

from node.dicom import status
from node.dicom.sop_classes import storage_sop_classes
from node.store.tables import Instance, Series
from tests.helpers import dataset_bytes, free_port, fresh_copy, need, sample_file, wait_port

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
US_MULTIFRAME_RETIRED = "1.2.840.10008.5.1.4.1.1.3"
NM_RETIRED = "1.2.840.10008.5.1.4.1.1.5"
PIXEL_DATA = 0x7FE00010


def rows(node) -> dict[str, Instance]:  # noqa: ANN001
    with Session(node.engine) as s:
        return {i.sop_instance_uid: i for i in s.exec(select(Instance))}


def series_of(node, row: Instance) -> Series:  # noqa: ANN001
    with Session(node.engine) as s:
        series = s.get(Series, row.series_uid)
        assert series is not None
        return series


def un_body(ds: Dataset, keep: tuple[int, ...] = ()) -> bytes:
    """``ds`` (no file meta) in explicit VR little endian with every element but Pixel Data and
    the tags in ``keep`` written as UN, as some de-identification and conversion tools write
    them: the value is the element's implicit VR little endian encoding (PS3.5 6.2.2)."""
    out = bytearray()
    for elem in ds:
        if elem.tag.group == 2:
            continue
        explicit = elem.tag == PIXEL_DATA or int(elem.tag) in keep
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, not explicit
        write_data_element(fp, elem)
        raw = fp.getvalue()
        out += raw if explicit else raw[:4] + b"UN\0\0" + raw[4:]
    return bytes(out)


def part10(path: Path, ds: Dataset, body: bytes) -> Path:
    """A Part 10 file of ``body`` (a data set's bytes) with ``ds``'s file meta."""
    meta = BytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + body)
    return path


def fresh_ct(tmp_path: Path, name: str) -> Path:
    return fresh_copy(sample_file("CT_small.dcm"), tmp_path / f"{name}.dcm")


class OneAssociation:
    """Raw C-STOREs over one pynetdicom association: the command's UIDs go out as given (even
    ones pynetdicom's own setters refuse), the data set bytes unchecked."""

    def __init__(self, port: int, contexts: list[str]) -> None:
        self.ae = AE(ae_title="RAWSCU")
        for sop_class in contexts:
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
        self.ae.dimse_timeout = self.ae.network_timeout = 20
        self.assoc = self.ae.associate("127.0.0.1", port, ae_title="PACSNODE")
        assert self.assoc.is_established, "association refused"
        self.message_id = 0

    def store(self, context_class: str, sop_class: str, sop_instance: str, data: bytes) -> Dataset:
        """Send one C-STORE on the context of ``context_class``; the response (Status, ErrorComment)."""
        assert self.assoc.is_established, "the association is gone"
        context = self.assoc._get_valid_context(context_class, ExplicitVRLittleEndian, "scu")
        self.message_id += 1
        req = C_STORE()
        req.MessageID = self.message_id
        req._affected_sop_class_uid = pydicom.uid.UID(sop_class)  # past the setter's validation
        req._affected_sop_instance_uid = pydicom.uid.UID(sop_instance)
        req.Priority = 2
        req.DataSet = BytesIO(data)
        self.assoc._reactor_checkpoint.clear()  # the hand-off Association.send_c_store does
        while not self.assoc._is_paused:
            time.sleep(0.0001)
        try:
            self.assoc.dimse.send_msg(req, context.context_id)
            _, rsp = self.assoc.dimse.get_msg(block=True)
        finally:
            self.assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response (the association was aborted?)"
        answer = Dataset()
        answer.Status = int(rsp.Status)
        answer.ErrorComment = str(getattr(rsp, "ErrorComment", "") or "")
        return answer

    def release(self) -> None:
        self.assoc.release()


def test_bad_data_sets_do_not_abort_their_association(make_node, tmp_path):
    """Over ONE association: good, UN-VR, garbled and mismatched requests, garbage, good. Every
    good one (the UN-VR one too) is stored; each bad one gets a failure naming its problem."""
    node = make_node()
    port = node.scp.port
    good_first, un_src, good_last = (fresh_ct(tmp_path, n) for n in ("first", "un", "last"))
    un_ds = pydicom.dcmread(un_src)
    un_data = un_body(un_ds)
    assert un_data.count(b"UN\0\0") > 20  # every header attribute is UN, the UIDs included
    bad = [fresh_ct(tmp_path, f"bad{i}") for i in range(5)]
    bad_uid = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in bad]
    link = OneAssociation(port, [CT, MR])
    try:
        answers = {
            "good-first": link.store(CT, CT, _uid(good_first), dataset_bytes(good_first)),
            "un-vr": link.store(CT, CT, str(un_ds.SOPInstanceUID), un_data),
            # what DCMTK 3.6.7 dcmsend puts in the request for a data set whose SOP Class UID is UN
            "garbled-class": link.store(CT, "31", bad_uid[0], dataset_bytes(bad[0])),
            "class-over-64": link.store(CT, "1." * 40 + "1", bad_uid[1], dataset_bytes(bad[1])),
            "class-contradicts-data": link.store(CT, MR, bad_uid[2], dataset_bytes(bad[2])),
            "context-contradicts-data": link.store(MR, CT, bad_uid[3], dataset_bytes(bad[3])),
            "truncated-garbage": link.store(CT, CT, bad_uid[4], _truncated(dataset_bytes(bad[4]))),
            "instance-over-64": link.store(CT, CT, "9." * 40 + "9", dataset_bytes(good_last)),
            "good-last": link.store(CT, CT, _uid(good_last), dataset_bytes(good_last)),
        }
        assert link.assoc.is_established, "the association did not survive the bad data sets"
    finally:
        link.release()
    codes = {name: a.Status for name, a in answers.items()}
    assert codes == {
        "good-first": status.SUCCESS,
        "un-vr": status.SUCCESS,
        "garbled-class": status.SUCCESS,  # misread by the sender; data set and context agree
        "class-over-64": status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "class-contradicts-data": status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "context-contradicts-data": status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        "truncated-garbage": status.CANNOT_UNDERSTAND,
        "instance-over-64": status.CANNOT_UNDERSTAND,
        "good-last": status.SUCCESS,
    }
    comments = {name: a.ErrorComment for name, a in answers.items()}
    assert "is CTImageStorage, request says MRImageStorage" in comments["class-contradicts-data"]
    assert "context is MRImageStorage" in comments["context-contradicts-data"]
    assert "truncated: element (7FE0,0010)" in comments["truncated-garbage"]
    assert "empty or over 64 chars" in comments["instance-over-64"]
    stored = rows(node)
    assert set(stored) == {_uid(good_first), str(un_ds.SOPInstanceUID), bad_uid[0], _uid(good_last)}
    # filed under the data set's own UIDs, in its file meta too (the request said '31')
    garbled_meta = pydicom.dcmread(
        node.spool.root / stored[bad_uid[0]].path, stop_before_pixels=True
    ).file_meta
    assert (garbled_meta.MediaStorageSOPClassUID, garbled_meta.MediaStorageSOPInstanceUID) == (CT, bad_uid[0])
    un_row = stored[str(un_ds.SOPInstanceUID)]
    # filed by header values read through VR UN
    assert (un_row.study_uid, un_row.series_uid) == (
        str(un_ds.StudyInstanceUID),
        str(un_ds.SeriesInstanceUID),
    )
    assert un_row.sop_class_uid == CT and series_of(node, un_row).modality == "CT"
    assert un_row.instance_number == int(un_ds.InstanceNumber)
    assert dataset_bytes(node.spool.root / un_row.path) == un_data  # the bytes as received, UN kept
    assert list(node.spool.tmp_dir.iterdir()) == []


def _truncated(body: bytes) -> bytes:
    """The data set cut 20 bytes into its pixel data, then 7 bytes of garbage."""
    return body[: body.rfind(b"\xe0\x7f\x10\x00") + 20] + b"\xff" * 7


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _dcmsend(port: int, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            need("dcmsend"),
            "-v",
            "-aet",
            "DCMSEND",
            "-aec",
            "PACSNODE",
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dcmsend_un_vr_file_between_good_ones(make_node, tmp_path):
    """The reported case: DCMTK dcmsend sends a real CT whose attributes are all UN (its request
    then says SOP class '31'); the association stays up, the CT is stored under its data set's
    UIDs (as DCMTK storescp stores it) and the good files after it arrive."""
    node = make_node()
    first, last = fresh_ct(tmp_path, "first"), fresh_ct(tmp_path, "last")
    un_file = sample_file("explicit_VR-UN.dcm")
    result = _dcmsend(node.scp.port, [first, un_file, last])
    out = result.stdout + result.stderr
    assert "Peer Aborted" not in out and "Association Aborted" not in out, out
    assert "with status SUCCESS  : 3" in out, out
    un_uid = str(pydicom.dcmread(un_file, stop_before_pixels=True).SOPInstanceUID)
    assert set(rows(node)) == {_uid(first), un_uid, _uid(last)}
    assert rows(node)[un_uid].sop_class_uid == CT


def test_dcmsend_data_set_with_un_header_is_stored(make_node, tmp_path):
    """A data set whose filing attributes (study, series, modality...) are UN, its SOP UIDs UI so
    DCMTK's request is right: stored as DCMTK's storescp stores it, and filed by those values."""
    node = make_node()
    src = fresh_ct(tmp_path, "src")
    ds = pydicom.dcmread(src)
    body = un_body(ds, keep=(0x00080016, 0x00080018))
    path = part10(tmp_path / "un-header.dcm", ds, body)
    result = _dcmsend(node.scp.port, [path])
    assert result.returncode == 0, result.stdout + result.stderr
    row = rows(node)[str(ds.SOPInstanceUID)]
    assert (row.study_uid, row.series_uid) == (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    series = series_of(node, row)
    assert (series.modality, series.series_number) == ("CT", int(ds.SeriesNumber))
    assert series.series_description == str(ds.get("SeriesDescription", ""))
    assert dataset_bytes(node.spool.root / row.path) == body


def _retired_copy(src: Path, dst: Path, sop_class: str) -> Path:
    ds = pydicom.dcmread(src)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_retired_storage_classes_are_accepted_from_dcmsend(make_node, tmp_path):
    """Retired US, US multi-frame and NM image storage: negotiated, stored, filed (storescp does)."""
    node = make_node()
    files = [
        _retired_copy(sample_file("OBXXXX1A.dcm"), tmp_path / "us.dcm", US_RETIRED),
        _retired_copy(sample_file("OBXXXX1A.dcm"), tmp_path / "usmf.dcm", US_MULTIFRAME_RETIRED),
        _retired_copy(sample_file("CT_small.dcm"), tmp_path / "nm.dcm", NM_RETIRED),
    ]
    result = _dcmsend(node.scp.port, files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "with status SUCCESS  : 3" in result.stdout + result.stderr
    stored = rows(node)
    assert sorted(r.sop_class_uid for r in stored.values()) == sorted(
        [US_RETIRED, US_MULTIFRAME_RETIRED, NM_RETIRED]
    )
    us = next(r for r in stored.values() if r.sop_class_uid == US_RETIRED)
    assert series_of(node, us).modality == "US"


def _accepted(port: int, aet: str, candidates: list[str]) -> set[str]:
    """The abstract syntaxes of ``candidates`` an SCP accepts, proposed 120 per association."""
    accepted: set[str] = set()
    for i in range(0, len(candidates), 120):
        ae = AE(ae_title="PROBE")
        for uid in candidates[i : i + 120]:
            ae.add_requested_context(uid, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title=aet)
        assert assoc.is_established
        accepted |= {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assoc.release()
    return accepted


def test_every_storage_class_storescp_accepts_is_accepted(make_node, tmp_path):
    """Propose every SOP class pydicom's dictionary calls Storage to DCMTK's storescp and to the
    node: the node accepts at least what storescp accepts."""
    from pydicom._uid_dict import UID_dictionary

    candidates = sorted(u for u, v in UID_dictionary.items() if v[1] == "SOP Class" and "Storage" in v[0])
    port = free_port()
    peer = subprocess.Popen(
        [need("storescp"), "--aetitle", "REF", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        reference = _accepted(port, "REF", candidates)
    finally:
        peer.terminate()
        peer.wait(10)
    assert {US_RETIRED, US_MULTIFRAME_RETIRED, NM_RETIRED} <= reference  # the check can fail
    node = make_node()
    ours = _accepted(node.scp.port, "PACSNODE", candidates)
    assert reference - ours == set()
    assert set(storage_sop_classes()) >= reference


@pytest.mark.parametrize("sop_class", [US_RETIRED, NM_RETIRED])
def test_retired_class_mismatch_still_answers(make_node, tmp_path, sop_class):
    """A retired class in the request but a CT data set: a failure status, not an abort."""
    node = make_node()
    src = fresh_ct(tmp_path, "ct")
    link = OneAssociation(node.scp.port, [sop_class, CT])
    try:
        answer = link.store(sop_class, sop_class, _uid(src), dataset_bytes(src))
        assert answer.Status == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
        assert link.store(CT, CT, _uid(src), dataset_bytes(src)).Status == status.SUCCESS
    finally:
        link.release()


def test_un_vr_element_header_is_explicit_un(tmp_path):
    """The UN encoder writes what a UN element is on the wire: tag, 'UN', 2 reserved, 4-byte length."""
    ds = pydicom.dcmread(fresh_ct(tmp_path, "x"))
    body = un_body(ds)
    at = body.index(struct.pack("<HH", 0x0008, 0x0060))
    assert body[at + 4 : at + 8] == b"UN\0\0"
    assert struct.unpack("<I", body[at + 8 : at + 12])[0] == 2 and body[at + 12 : at + 14] == b"CT"


def test_unexpected_error_filing_one_data_set_is_a_failure_status(make_node, tmp_path, monkeypatch):
    """A bug of ours while filing one data set (here the spool path raising) costs that data set
    a failure status with a comment, not the association; the next one is stored."""
    node = make_node()
    broken, fine = fresh_ct(tmp_path, "broken"), fresh_ct(tmp_path, "fine")
    real = node.scp.spool.relative_path

    def relative_path(study: str, series: str, instance: str):  # noqa: ANN202
        if instance == _uid(broken):
            raise RuntimeError("simulated bug")
        return real(study, series, instance)

    monkeypatch.setattr(node.scp.spool, "relative_path", relative_path)
    link = OneAssociation(node.scp.port, [CT])
    try:
        answer = link.store(CT, CT, _uid(broken), dataset_bytes(broken))
        assert answer.Status == status.PROCESSING_FAILURE
        assert answer.ErrorComment == "node error (RuntimeError); see its log"
        assert link.store(CT, CT, _uid(fine), dataset_bytes(fine)).Status == status.SUCCESS
    finally:
        link.release()
    assert set(rows(node)) == {_uid(fine)}


def test_dcmsend_un_vr_file_after_dcmconv_convert_un_is_stored(make_node, tmp_path):
    """The sender-side fix for dcmsend's garbled request: ``dcmconv +uc`` gives the UN elements
    their real VR; the same real CT is then stored and filed by its own UIDs."""
    node = make_node()
    converted = tmp_path / "converted.dcm"
    run = subprocess.run(
        [need("dcmconv"), "+uc", str(sample_file("explicit_VR-UN.dcm")), str(converted)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result = _dcmsend(node.scp.port, [converted])
    assert result.returncode == 0, result.stdout + result.stderr
    ds = pydicom.dcmread(sample_file("explicit_VR-UN.dcm"), stop_before_pixels=True)
    row = rows(node)[str(ds.SOPInstanceUID)]
    assert (row.sop_class_uid, row.study_uid) == (CT, str(ds.StudyInstanceUID))
    assert series_of(node, row).modality == "CT"
