"""Copies of a SOP Instance UID the node has stored already (issue 21, item 9), sent with DCMTK
storescu to a running node:

- the same bytes again is a plain resend: success, nothing recorded;
- different content: storage.duplicates keep_first answers success and keeps the first copy,
  refuse answers 0x0111 Duplicate SOP Instance, keep_last replaces the stored copy and reopens
  its series; each is recorded (table, API, study page);
- the same UID under other study or series UIDs leaves no file no row points to and no empty
  study or series, and is recorded with the conflict named.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pydicom
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from node.store.tables import DuplicateEvent, Instance, Series, SeriesState, Study
from tests.helpers import fresh_copy, need, sample_file, wait_for

QUIET = {"series_quiet_s": 0.5, "poll_interval_s": 0.1}


def storescu(port: int, *files: Path, aet: str = "MODALITY") -> list[str]:
    """Send with DCMTK storescu; the status of each C-STORE response as storescu logged it."""
    run = subprocess.run(
        [need("storescu"), "-v", "-aet", aet, "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return re.findall(r"Received Store Response \(([^)]*)\)", run.stdout + run.stderr)


def _variant(src: Path, dst: Path, description: str, **uids: str) -> Path:
    """A copy of ``src`` with the same SOP Instance UID and a different Series Description (and
    optionally other study/series UIDs): other content under a known UID."""
    ds = pydicom.dcmread(src)
    ds.SeriesDescription = description
    if "study" in uids:
        ds.StudyInstanceUID = uids["study"]
    if "series" in uids:
        ds.SeriesInstanceUID = uids["series"]
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def _instances(node) -> list[Instance]:  # noqa: ANN001
    with Session(node.engine) as s:
        return list(s.exec(select(Instance)))


def _events(node) -> list[DuplicateEvent]:  # noqa: ANN001
    with Session(node.engine) as s:
        return list(s.exec(select(DuplicateEvent).order_by(DuplicateEvent.id)))


def _spool_files(node) -> list[Path]:  # noqa: ANN001
    return sorted(p for p in node.spool.root.rglob("*") if p.is_file() and ".tmp" not in p.parts)


def _first(tmp_path: Path) -> Path:
    return fresh_copy(sample_file("CT_small.dcm"), tmp_path / "first.dcm", generate_uid(), generate_uid())


def test_same_bytes_again_is_a_plain_resend(make_node, tmp_path):
    node = make_node(assembly=QUIET)
    first = _first(tmp_path)
    assert storescu(node.scp.port, first) == ["Success"]
    assert storescu(node.scp.port, first) == ["Success"]
    assert storescu(node.scp.port, first, aet="OTHERAE") == ["Success"]  # file meta differs, data set not
    assert len(_instances(node)) == 1
    assert _events(node) == [], "a resend of the same content is not a duplicate"
    assert len(_spool_files(node)) == 1


def test_different_content_keep_first_is_recorded_and_shown(make_node, tmp_path):
    node = make_node(assembly=QUIET)
    first = _first(tmp_path)
    second = _variant(first, tmp_path / "second.dcm", "other content")
    assert storescu(node.scp.port, first) == ["Success"]
    (row,) = _instances(node)
    stored = node.spool.root / row.path
    assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    before = stored.read_bytes()

    assert storescu(node.scp.port, second, aet="OTHERAE") == ["Success"]
    (after,) = _instances(node)
    assert (after.path, after.sha256) == (row.path, row.sha256)
    assert stored.read_bytes() == before, "keep_first: the stored copy stays"
    assert _spool_files(node) == [stored]
    (event,) = _events(node)
    assert (event.sop_instance_uid, event.calling_aet) == (row.sop_instance_uid, "OTHERAE")
    assert (event.content_differs, event.action, event.conflict) == (True, "kept first", "")

    client = TestClient(node.web_app())
    detail = client.get(f"/api/v1/studies/{row.study_uid}").json()
    assert [(d["sop_instance_uid"], d["action"]) for d in detail["duplicates"]] == [
        (row.sop_instance_uid, "kept first")
    ]
    page = client.get(f"/studies/{row.study_uid}").text
    assert "Duplicates" in page and "different content" in page


def test_different_content_refused_with_duplicate_sop_instance(make_node, tmp_path):
    node = make_node(assembly=QUIET, storage={"duplicates": "refuse"})
    first = _first(tmp_path)
    second = _variant(first, tmp_path / "second.dcm", "other content")
    assert storescu(node.scp.port, first) == ["Success"]
    before = (node.spool.root / _instances(node)[0].path).read_bytes()
    statuses = storescu(node.scp.port, second)
    assert len(statuses) == 1 and statuses[0] != "Success", statuses
    # 0x0111 Duplicate SOP Instance (PS3.7 Annex C); DCMTK names no C-STORE status for it
    assert re.search(r"0x0?111\b|Duplicate", statuses[0]), statuses
    assert storescu(node.scp.port, first) == ["Success"], "the same bytes are still a plain resend"
    (row,) = _instances(node)
    assert (node.spool.root / row.path).read_bytes() == before
    assert [(e.action, e.content_differs) for e in _events(node)] == [("refused", True)]
    assert len(_spool_files(node)) == 1


def test_different_content_keep_last_replaces_and_reopens_the_series(make_node, tmp_path):
    node = make_node(assembly=QUIET, storage={"duplicates": "keep_last"})
    first = _first(tmp_path)
    second = _variant(first, tmp_path / "second.dcm", "second content")
    third = _variant(first, tmp_path / "third.dcm", "third content")
    assert storescu(node.scp.port, first) == ["Success"]
    (row,) = _instances(node)
    wait_for(
        lambda: _series(node, row.series_uid).state == SeriesState.NOT_ROUTED, 20, "first copy not routed"
    )
    for copy in (second, third):
        assert storescu(node.scp.port, copy) == ["Success"]
        (now,) = _instances(node)
        stored = node.spool.root / now.path
        assert pydicom.dcmread(stored).SeriesDescription == pydicom.dcmread(copy).SeriesDescription
        assert now.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
        assert now.replaced_at is not None
        assert _spool_files(node) == [stored], "the replaced copy's file is removed"
    series = _series(node, row.series_uid)
    assert series.instance_count == 1 and series.byte_size == now.byte_size
    assert [(e.action, e.content_differs) for e in _events(node)] == [("replaced", True)] * 2
    # the series was reopened: it completes and is routed again
    wait_for(lambda: _series(node, row.series_uid).completed_at is not None, 20, "series not completed again")
    assert _series(node, row.series_uid).last_received_at > series.first_received_at


def _series(node, uid: str) -> Series:  # noqa: ANN001
    with Session(node.engine) as s:
        series = s.get(Series, uid)
        assert series is not None
        return series


def test_same_uid_under_other_study_and_series_uids_leaves_no_orphan(make_node, tmp_path):
    node = make_node(assembly=QUIET)
    first = _first(tmp_path)
    assert storescu(node.scp.port, first) == ["Success"]
    (row,) = _instances(node)
    copies = [
        _variant(first, tmp_path / f"study{i}.dcm", "moved", study=generate_uid(), series=generate_uid())
        for i in range(5)
    ]
    copies.append(_variant(first, tmp_path / "series.dcm", "moved", series=generate_uid()))
    assert storescu(node.scp.port, *copies) == ["Success"] * 6

    assert [(i.sop_instance_uid, i.study_uid) for i in _instances(node)] == [
        (row.sop_instance_uid, row.study_uid)
    ]
    assert _spool_files(node) == [node.spool.root / row.path], "files no row points to were left"
    events = _events(node)
    assert [e.conflict for e in events] == ["study UID differs"] * 5 + ["series UID differs"]
    assert {e.action for e in events} == {"kept first"}
    assert {e.study_uid for e in events} == {row.study_uid}
    # no empty study or series appears, and none completes empty
    wait_for(lambda: _series(node, row.series_uid).completed_at is not None, 20, "series not completed")
    with Session(node.engine) as s:
        studies = list(s.exec(select(Study)))
        series = list(s.exec(select(Series)))
    assert [(st.study_uid, st.instance_count, st.series_count) for st in studies] == [(row.study_uid, 1, 1)]
    assert [(se.series_uid, se.instance_count) for se in series] == [(row.series_uid, 1)]
    # the conflicts show on the stored instance's study
    detail = TestClient(node.web_app()).get(f"/api/v1/studies/{row.study_uid}").json()
    assert sorted(d["conflict"] for d in detail["duplicates"]) == sorted(e.conflict for e in events)


def test_refuse_answers_a_conflicting_study_uid_with_duplicate_sop_instance(make_node, tmp_path):
    node = make_node(assembly=QUIET, storage={"duplicates": "refuse"})
    first = _first(tmp_path)
    moved = _variant(first, tmp_path / "moved.dcm", "same", study=generate_uid(), series=generate_uid())
    assert storescu(node.scp.port, first) == ["Success"]
    statuses = storescu(node.scp.port, moved)
    assert len(statuses) == 1 and re.search(r"0x0?111\b", statuses[0]), statuses
    assert len(_spool_files(node)) == 1
    with Session(node.engine) as s:
        assert len(list(s.exec(select(Study)))) == 1
    assert [(e.action, e.conflict) for e in _events(node)] == [("refused", "study UID differs")]
