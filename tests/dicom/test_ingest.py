"""C-STORE / C-ECHO against real DCMTK clients and a pynetdicom client: transfer syntaxes arrive
byte-for-byte, duplicates are stored once, bad input gets a failure status, the allow-list holds.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlmodel import Session, select

from node.dicom import status
from node.store.tables import Instance
from tests.helpers import (
    STORESCU_FLAG,
    TS_FILES,
    dataset_bytes,
    free_port,
    fresh_copy,
    make_series,
    need,
    raw_store_file,
    sample_file,
    wait_port,
)


def storescu(port: int, files: list[Path], *flags: str, aet: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(
        [need("storescu"), "-aet", aet, "-aec", "PACSNODE", *flags, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def rows(node) -> list[Instance]:
    with Session(node.engine) as s:
        return list(s.exec(select(Instance)))


def pynetdicom_store(port: int, path: Path, aet: str = "PYSCU") -> int:
    """Send a file as stored (no decoding) with pynetdicom; return the status."""
    meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
    ae = AE(ae_title=aet)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        return int(rsp.Status)
    finally:
        assoc.release()


def test_echoscu_gets_success(make_node):
    node = make_node()
    result = subprocess.run(
        [need("echoscu"), "-aec", "PACSNODE", "127.0.0.1", str(node.scp.port)],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def dcmtk_storescp(tmp_path):
    """DCMTK's storescp accepting every transfer syntax, writing what it receives: the reference
    for the bytes storescu actually put on the wire (DCMTK re-encodes some elements when sending)."""
    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [need("storescp"), "+xa", "+B", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    yield port, folder
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("kind", sorted(TS_FILES))
def test_transfer_syntax_arrives_byte_for_byte(make_node, tmp_path, dcmtk_storescp, kind):
    node = make_node()
    src = fresh_copy(sample_file(TS_FILES[kind]), tmp_path / "in" / f"{kind}.dcm")
    sent_syntax = pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID
    peer_port, peer_folder = dcmtk_storescp
    result = storescu(node.scp.port, [src], STORESCU_FLAG[kind])
    assert result.returncode == 0, result.stderr
    assert storescu(peer_port, [src], STORESCU_FLAG[kind]).returncode == 0
    (row,) = rows(node)
    stored = node.spool.root / row.path
    (reference,) = list(peer_folder.iterdir())
    assert row.transfer_syntax_uid == sent_syntax
    assert dataset_bytes(stored) == dataset_bytes(reference)  # what storescu sent, as DCMTK received it
    stored_meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
    assert stored_meta.TransferSyntaxUID == sent_syntax
    assert stored_meta.MediaStorageSOPInstanceUID == row.sop_instance_uid
    assert stored_meta.SourceApplicationEntityTitle == "STORESCU"
    assert row.byte_size == stored.stat().st_size


@pytest.mark.parametrize("kind", sorted(TS_FILES))
def test_raw_sender_bytes_are_kept_exactly(make_node, tmp_path, kind):
    """pynetdicom sends a file's data set without re-encoding: the node must keep those very bytes."""
    node = make_node()
    src = fresh_copy(sample_file(TS_FILES[kind]), tmp_path / "in" / f"{kind}.dcm")
    assert pynetdicom_store(node.scp.port, src) == status.SUCCESS
    (row,) = rows(node)
    assert dataset_bytes(node.spool.root / row.path) == dataset_bytes(src)


def test_duplicate_is_stored_once_and_succeeds_twice(make_node, tmp_path):
    node = make_node()
    (src,) = make_series(tmp_path / "in", 1)
    assert storescu(node.scp.port, [src]).returncode == 0
    first = node.spool.root / rows(node)[0].path
    mtime = first.stat().st_mtime_ns
    assert storescu(node.scp.port, [src]).returncode == 0
    assert pynetdicom_store(node.scp.port, src) == status.SUCCESS
    assert len(rows(node)) == 1
    assert len([p for p in node.spool.root.rglob("*.dcm")]) == 1
    assert first.stat().st_mtime_ns == mtime  # not rewritten
    with Session(node.engine) as s:
        from node.store.tables import Series, Study

        assert s.exec(select(Series)).one().instance_count == 1
        assert s.exec(select(Study)).one().instance_count == 1


@pytest.mark.parametrize(
    "damage",
    ["truncated-pixels", "truncated-by-3", "truncated-header", "garbage"],
)
def test_bad_dataset_gets_failure_and_node_keeps_serving(make_node, tmp_path, damage):
    node = make_node()
    good, bad_src = make_series(tmp_path / "in", 2)
    body = dataset_bytes(bad_src)
    data = {
        "truncated-pixels": body[:-1000],
        "truncated-by-3": body[:-3],
        "truncated-header": body[:50],
        "garbage": bytes(range(256)) * 20,
    }[damage]
    assert raw_store_file(node.scp.port, bad_src, data) == status.CANNOT_UNDERSTAND
    assert rows(node) == []
    assert list(node.spool.root.rglob("*.dcm")) == []
    assert list(node.spool.tmp_dir.iterdir()) == []
    # the next association still succeeds
    assert storescu(node.scp.port, [good]).returncode == 0
    assert len(rows(node)) == 1


def test_sop_class_contradicting_context_is_refused(make_node, tmp_path):
    node = make_node()
    (src,) = make_series(tmp_path / "in", 1)  # a CT image sent under MR Image Storage
    assert raw_store_file(node.scp.port, src, sop_class="1.2.840.10008.5.1.4.1.1.4") == (
        status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    )
    assert rows(node) == []


def test_sop_instance_uid_contradicting_request_is_refused(make_node, tmp_path):
    node = make_node()
    (src,) = make_series(tmp_path / "in", 1)
    assert raw_store_file(node.scp.port, src, sop_instance=generate_uid()) == status.CANNOT_UNDERSTAND
    assert rows(node) == []


def test_full_disk_is_out_of_resources_and_nothing_written(make_node, tmp_path):
    node = make_node(storage={"min_free_mb": 10**9})  # watermark far above the free space
    (src,) = make_series(tmp_path / "in", 1)
    assert pynetdicom_store(node.scp.port, src) == status.OUT_OF_RESOURCES
    assert rows(node) == []
    assert list(node.spool.root.rglob("*.dcm")) == []
    assert list(node.spool.tmp_dir.iterdir()) == []


def test_calling_ae_not_on_allow_list_is_rejected(make_node):
    node = make_node(dicom={"allowed_calling_aets": ["MODALITY1"]})
    port = str(node.scp.port)
    bad = subprocess.run(
        [need("echoscu"), "-aet", "INTRUDER", "-aec", "PACSNODE", "127.0.0.1", port],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0
    assert "Rejected" in bad.stderr or "rejected" in bad.stderr
    good = subprocess.run(
        [need("echoscu"), "-aet", "MODALITY1", "-aec", "PACSNODE", "127.0.0.1", port],
        capture_output=True,
        timeout=30,
    )
    assert good.returncode == 0


def test_eight_parallel_associations(make_node, tmp_path):
    node = make_node()
    batches = [make_series(tmp_path / f"in{i}", 5) for i in range(8)]
    results: list[int] = []

    def run(files: list[Path]) -> None:
        results.append(storescu(node.scp.port, files).returncode)

    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [0] * 8
    assert len(rows(node)) == 40
    assert len(list(node.spool.root.rglob("*.dcm"))) == 40


def _fail_instance_inserts(engine, on: bool) -> None:
    """A trigger that makes every insert into the instance table fail, as a broken disk would."""
    from sqlalchemy import text

    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as db:
        if not on:
            db.execute(
                text("DROP TRIGGER fail_instance ON instance" if postgres else "DROP TRIGGER fail_instance")
            )
        elif postgres:
            db.execute(
                text(
                    "CREATE FUNCTION fail_instance() RETURNS trigger AS $$ BEGIN "
                    "RAISE EXCEPTION 'simulated write failure'; END $$ LANGUAGE plpgsql"
                )
            )
            db.execute(
                text(
                    "CREATE TRIGGER fail_instance BEFORE INSERT ON instance "
                    "FOR EACH ROW EXECUTE FUNCTION fail_instance()"
                )
            )
        else:
            db.execute(
                text(
                    "CREATE TRIGGER fail_instance BEFORE INSERT ON instance "
                    "BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END"
                )
            )


def test_success_only_once_the_row_is_committed(make_node, tmp_path):
    """The database refuses the row: the sender gets out of resources (not success), the file does
    not stay in the spool, and once the database is back the same instance is stored."""
    node = make_node()
    (src,) = make_series(tmp_path / "in", 1)
    _fail_instance_inserts(node.engine, on=True)
    assert pynetdicom_store(node.scp.port, src) == status.OUT_OF_RESOURCES
    assert list(node.spool.root.rglob("*.dcm")) == []
    _fail_instance_inserts(node.engine, on=False)
    assert rows(node) == []
    assert pynetdicom_store(node.scp.port, src) == status.SUCCESS
    assert [r.sop_instance_uid for r in rows(node)] == [str(pydicom.dcmread(src).SOPInstanceUID)]
    assert len(list(node.spool.root.rglob("*.dcm"))) == 1
