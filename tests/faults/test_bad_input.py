"""A bad-input corpus (>= 30 generated cases) sent to one running node, one case after another.

Each case either gets a DICOM failure status at C-STORE time (and then leaves no row and no file
behind), or is accepted and then ends visibly: its series "not routed" with a reason, or its job
failed with a recorded error (or done, when the node could in fact analyse it). After every case a
normal instance is still stored with success, and nothing from a failed case reaches the
destination."""

from __future__ import annotations

import copy
import struct
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlmodel import Session, select

from node.app import build_node
from node.settings import load_settings
from node.store.tables import Instance, Job, Series
from node.synth import generate_study
from tests.helpers import StoreSCP, analysing_config, free_port, make_series, need, raw_store, raw_store_file

pytestmark = pytest.mark.slow
SR = "1.2.840.10008.5.1.4.1.1.88.22"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
TERMINAL_JOB = ("done", "failed")


def _encode(ds: Dataset, implicit: bool = False) -> bytes:
    """The data set alone (no file meta), in implicit or explicit VR little endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    body = Dataset({tag: elem for tag, elem in ds.items() if tag.group != 2})
    write_dataset(buf, body)
    return buf.getvalue()


def _element(tag: tuple[int, int], vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """One explicit-VR little-endian element with an arbitrary (possibly lying) length."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", *tag) + vr
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"OF"):
        return head + b"\0\0" + struct.pack("<I", n) + value
    return head + struct.pack("<H", n & 0xFFFF) + value


class Corpus:
    """Builds (name, sop_class, sop_instance, transfer syntax, bytes) cases from a phantom CXR."""

    def __init__(self, template: Path) -> None:
        self.template = pydicom.dcmread(template)

    def fresh(self) -> Dataset:
        ds = copy.deepcopy(self.template)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
        return ds

    def case(self, ds: Dataset, ts: str = ExplicitVRLittleEndian, data: bytes | None = None, **req: str):  # noqa: ANN201
        body = _encode(ds, implicit=ts == ImplicitVRLittleEndian) if data is None else data
        return (
            req.get("sop_class", str(ds.get("SOPClassUID", ""))),
            req.get("sop_instance", str(ds.get("SOPInstanceUID", ""))),
            ts,
            body,
            ds,
        )


def _mutated(corpus: Corpus, fn: Callable[[Dataset], None], **kw: str):  # noqa: ANN202
    ds = corpus.fresh()
    fn(ds)
    return corpus.case(ds, **kw)


def _cases(corpus: Corpus) -> dict[str, tuple]:
    c = corpus

    def raw(
        transform: Callable[[bytes, Dataset], bytes], ts: str = ExplicitVRLittleEndian, **kw: str
    ) -> tuple:
        ds = c.fresh()  # every case has its own UIDs
        return c.case(ds, ts=ts, data=transform(_encode(ds), ds), **kw)

    def pixel_at(body: bytes) -> int:
        return body.rfind(b"\xe0\x7f\x10\x00")

    cases: dict[str, tuple] = {
        "truncated-half": raw(lambda b, ds: b[: len(b) // 2]),
        "truncated-in-tag": raw(lambda b, ds: b[: pixel_at(b) + 1]),
        "truncated-after-pixel-header": raw(lambda b, ds: b[: pixel_at(b) + 12]),
        "empty-dataset": raw(lambda b, ds: b""),
        "random-bytes": raw(lambda b, ds: np.random.default_rng(1).bytes(4096)),
        "overrun-short-element": raw(lambda b, ds: b + _element((0x0011, 0x0010), b"LO", b"AB", 200)),
        "overrun-long-element": raw(
            lambda b, ds: b[: pixel_at(b)] + _element((0x7FE0, 0x0010), b"OW", b"\0" * 64, 10**8)
        ),
        "unknown-vr": raw(lambda b, ds: _element((0x0008, 0x0005), b"ZZ", b"ISO_IR 100") + b),
        "wrong-vr-us-as-da": raw(lambda b, ds: b.replace(b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00DA", 1)),
        "odd-length-ui": raw(
            lambda b, ds: _element((0x0008, 0x0016), b"UI", str(ds.SOPClassUID).encode()[:-1]) + b
        ),
        "implicit-sent-as-explicit": raw(lambda b, ds: _encode(ds, implicit=True)),
        "explicit-sent-as-implicit": raw(lambda b, ds: b, ts=ImplicitVRLittleEndian),
        "native-labelled-jpeg": raw(lambda b, ds: b, ts=JPEG_BASELINE),
        "little-labelled-big-endian": raw(lambda b, ds: b, ts=BIG_ENDIAN),
        "sop-instance-contradicts-request": raw(lambda b, ds: b, sop_instance=generate_uid()),
        "sop-class-contradicts-request": raw(lambda b, ds: b, sop_class="1.2.840.10008.5.1.4.1.1.4"),
        "no-sop-instance-uid": _mutated(
            c, lambda ds: delattr(ds, "SOPInstanceUID"), sop_instance=generate_uid()
        ),
        "no-study-uid": _mutated(c, lambda ds: delattr(ds, "StudyInstanceUID")),
        "no-series-uid": _mutated(c, lambda ds: delattr(ds, "SeriesInstanceUID")),
        "missing-pixel-data": _mutated(c, lambda ds: delattr(ds, "PixelData")),
        "short-pixel-data": _mutated(
            c, lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2])
        ),
        "rows-zero": _mutated(c, lambda ds: setattr(ds, "Rows", 0)),
        "columns-zero": _mutated(c, lambda ds: setattr(ds, "Columns", 0)),
        "rows-huge": _mutated(c, lambda ds: setattr(ds, "Rows", 65535)),
        "bits-allocated-13": _mutated(c, lambda ds: setattr(ds, "BitsAllocated", 13)),
        "samples-per-pixel-3-mono": _mutated(c, lambda ds: setattr(ds, "SamplesPerPixel", 3)),
        "photometric-unknown": _mutated(c, lambda ds: setattr(ds, "PhotometricInterpretation", "WEIRD")),
        "multiframe-claimed": _mutated(c, lambda ds: setattr(ds, "NumberOfFrames", 4)),
    }

    def multiframe(ds: Dataset) -> None:
        frame = ds.PixelData
        ds.NumberOfFrames = 3
        ds.PixelData = frame * 3

    cases["multiframe-real"] = _mutated(c, multiframe)

    def non_image(sop_class: str, modality: str) -> tuple:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.PatientID, ds.PatientName = modality, "BAD1", "Bad^Input"
        if sop_class == PDF:
            ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
            ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
        if sop_class == SR:
            ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
        ds.file_meta = FileMetaDataset()
        return corpus.case(ds)

    cases["sr-object"] = non_image(SR, "SR")
    cases["pdf-object"] = non_image(PDF, "DOC")
    cases["rtstruct-object"] = non_image(RTSTRUCT, "RTSTRUCT")
    return cases


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN001, ANN201
    need("storescp")
    tmp = tmp_path_factory.mktemp("bad")
    dest_port = free_port()
    config = analysing_config(
        tmp,
        dest_port,
        assembly={"series_quiet_s": 0.3, "poll_interval_s": 0.1},
        runner={"max_attempts": 1, "retry_backoff_s": 0},
    )
    scp = StoreSCP(tmp / "received", dest_port)
    node = build_node(load_settings(config))
    node.start()
    generate_study("cxr", tmp / "cxr", seed=5, label="normal", scale=0.25, write_masks=False)
    template = sorted((tmp / "cxr").glob("*.dcm"))[0]
    yield node, scp, Corpus(template), tmp
    node.stop()
    scp.stop()


def _outcome(node, sop_instance: str, series_uid: str | None, accepted: bool, timeout: float = 60) -> str:  # noqa: ANN001
    with Session(node.engine) as s:
        stored = s.exec(select(Instance).where(Instance.sop_instance_uid == sop_instance)).first()
    if not accepted:
        assert stored is None, "refused but recorded"
        return "refused"
    assert stored is not None, "acknowledged but not recorded"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(node.engine) as s:
            series = s.get(Series, stored.series_uid)
            jobs = [j for j in s.exec(select(Job)) if stored.series_uid in j.series_uids]
        if series is not None and series.state == "not routed":
            assert series.route_note, "not routed without a reason"
            return "not routed: " + series.route_note[:60]
        if jobs and all(j.state in TERMINAL_JOB for j in jobs):
            failed = [j for j in jobs if j.state == "failed"]
            if failed:
                assert all(j.error for j in failed), "failed job without an error"
                return "job failed: " + failed[0].error[:60]
            return "done"
        time.sleep(0.1)
    raise AssertionError(f"accepted case never reached a visible end state ({series and series.state})")


def test_bad_input_corpus(env, tmp_path):
    node, scp, corpus, _ = env
    cases = _cases(corpus)
    assert len(cases) >= 30
    port = node.scp.port
    report: dict[str, str] = {}
    (good_src,) = make_series(tmp_path / "good", 1)
    failed_studies: set[str] = set()
    for name, (sop_class, sop_instance, ts, data, ds) in cases.items():
        try:
            status = raw_store(port, sop_class, sop_instance, ts, data)
        except AssertionError as exc:  # association refused (e.g. unknown SOP class): also a clear answer
            status = -1
            report[name] = f"association refused: {exc}"
        accepted = status == 0
        outcome = _outcome(node, sop_instance, getattr(ds, "SeriesInstanceUID", None), accepted)
        report[name] = f"0x{status:04X} {outcome}" if status >= 0 else report[name]
        if outcome.startswith("job failed") or not accepted:
            failed_studies.add(str(getattr(ds, "StudyInstanceUID", "")))
        # the node keeps serving: a normal instance is stored with success after every case
        fresh = tmp_path / "good" / f"{name}.dcm"
        from tests.helpers import fresh_copy

        fresh_copy(good_src, fresh)
        assert raw_store_file(port, fresh) == 0, f"node stopped serving after {name}"
    spool_tmp = list(node.spool.tmp_dir.iterdir())
    assert spool_tmp == [], f"partial files left: {spool_tmp}"
    time.sleep(1.0)
    sent_studies = {str(d.StudyInstanceUID) for d in scp.received()}
    assert not (sent_studies & failed_studies), "an output was sent for a failed case"
    print("\n".join(f"{k:<36} {v}" for k, v in report.items()))
