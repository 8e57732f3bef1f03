"""The same SOP Instance UID arriving on many associations at once (issue 21, item 5): when the
commit of one copy fails after another copy was acknowledged, the acknowledged file stays where
its row points. The failure is real: a database trigger refuses every insert of an instance that
already has a row, as a database failing under the second writer would."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import text
from sqlmodel import Session, select

from node.dicom import status
from node.store.tables import Instance
from tests.helpers import fresh_copy, sample_file

COPIES = 12
ROUNDS = 4


def _fail_duplicate_inserts(engine, on: bool) -> None:  # noqa: ANN001
    """A trigger that fails the insert of an instance whose row exists (ON CONFLICT DO NOTHING
    would otherwise skip it quietly): the commit of a second copy fails."""
    postgres = engine.dialect.name == "postgresql"
    with engine.begin() as db:
        if not on:
            db.execute(
                text("DROP TRIGGER fail_duplicate ON instance" if postgres else "DROP TRIGGER fail_duplicate")
            )
        elif postgres:
            db.execute(
                text(
                    "CREATE FUNCTION fail_duplicate() RETURNS trigger AS $$ BEGIN "
                    "IF EXISTS (SELECT 1 FROM instance WHERE sop_instance_uid = NEW.sop_instance_uid) THEN "
                    "RAISE EXCEPTION 'simulated write failure'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            db.execute(
                text(
                    "CREATE TRIGGER fail_duplicate BEFORE INSERT ON instance "
                    "FOR EACH ROW EXECUTE FUNCTION fail_duplicate()"
                )
            )
        else:
            db.execute(
                text(
                    "CREATE TRIGGER fail_duplicate BEFORE INSERT ON instance "
                    "WHEN EXISTS (SELECT 1 FROM instance WHERE sop_instance_uid = NEW.sop_instance_uid) "
                    "BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END"
                )
            )


def _send_at_once(port: int, paths: list[Path]) -> list[int]:
    """Open one association per file, then send every C-STORE at the same moment."""
    associations = []
    for i, _ in enumerate(paths):
        ae = AE(ae_title=f"SCU{i:02d}")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
        ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 60
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
        assert assoc.is_established
        associations.append(assoc)
    barrier = threading.Barrier(len(paths))
    results: list[int] = [-1] * len(paths)

    def send(i: int) -> None:
        barrier.wait(30)
        rsp = associations[i].send_c_store(paths[i])
        results[i] = int(rsp.Status) if "Status" in rsp else -1

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for assoc in associations:
        assoc.release()
    return results


def test_failed_commit_of_a_concurrent_copy_never_deletes_the_acknowledged_file(make_node, tmp_path):
    node = make_node(assembly={"series_quiet_s": 3600.0})
    _fail_duplicate_inserts(node.engine, on=True)
    for round_ in range(ROUNDS):
        uid = generate_uid()
        study, series = generate_uid(), generate_uid()
        paths = []
        for i in range(COPIES):
            path = fresh_copy(
                sample_file("CT_small.dcm"), tmp_path / f"r{round_}" / f"{i}.dcm", study, series
            )
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        results = _send_at_once(node.scp.port, paths)
        assert set(results) <= {status.SUCCESS, status.OUT_OF_RESOURCES}, results
        assert status.SUCCESS in results, results
        with Session(node.engine) as s:
            row = s.exec(select(Instance).where(Instance.sop_instance_uid == uid)).one()
        stored = node.spool.root / row.path
        assert stored.is_file(), (
            f"round {round_}: {results.count(0)} acknowledged, {results.count(0xA700)} refused, "
            "and the acknowledged instance's file is gone"
        )
        assert str(pydicom.dcmread(stored, stop_before_pixels=True).SOPInstanceUID) == uid
    assert list(node.spool.tmp_dir.iterdir()) == [], "partial files left"
    assert len(node.scp._instance_locks) == 0, "per-instance locks outlive their stores"
    _fail_duplicate_inserts(node.engine, on=False)


def test_spool_write_never_replaces_a_file(tmp_path):
    from node.dicom.spool import Spool

    spool = Spool(tmp_path / "spool", fsync=True)
    spool.prepare()
    relative = spool.relative_path("1.2", "1.2.3", "1.2.3.4")
    assert spool.write(relative, [b"first"]) is not None
    assert spool.write(relative, [b"second"]) is None, "a second writer must not replace the file"
    assert (spool.root / relative).read_bytes() == b"first"
    assert list(spool.tmp_dir.iterdir()) == []
