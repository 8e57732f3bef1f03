"""Spool files no row points to are set aside at start (issue 21, item 11): moved to the
quarantine when older than storage.orphan_grace_s, never when a row points to them or when they
are younger (another process may be writing or committing them right now); partial files are
removed when their writer is gone, kept while it runs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import yaml
from sqlmodel import Session

from node.dicom.spool import Spool, safe_name
from node.store.db import make_engine
from node.store.orphans import sweep_orphans
from node.store.received import record_instances
from tests.helpers import make_series, need, node_db_url, query_db, start_node_process, write_config
from tests.store.test_received import received

HOUR = 3600.0


def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_sweep_moves_only_old_unrecorded_files(tmp_path, database_url):
    engine = make_engine(database_url)
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.prepare()
    with Session(engine) as s:
        record_instances(s, [received("1.2.3.9.1"), received("1.2.3.9.2")])
        s.commit()
    series = spool.root / "1.2.3" / "1.2.3.1"
    series.mkdir(parents=True)
    recorded = [series / "1.2.3.9.1.dcm", series / "1.2.3.9.2.dcm"]
    orphan, beside, fresh = (
        series / "1.2.3.9.3.dcm",
        series / "1.2.3.9.1.0123456789abcdef.dcm",
        series / "7.dcm",
    )
    odd = spool.root / safe_name("1.2.3") / safe_name("not a uid") / "x.dcm"  # digest-named folder
    odd.parent.mkdir(parents=True)
    empty = spool.root / "9.9" / "9.9.9"  # a folder a removed conflict left
    empty.mkdir(parents=True)
    for path in [*recorded, orphan, beside, fresh, odd]:
        path.write_bytes(b"DICM" + path.name.encode())
    for path in [*recorded, orphan, beside, odd, empty, empty.parent]:
        _age(path, 2 * HOUR)

    sweep = sweep_orphans(engine, spool.root, tmp_path / "quarantine", HOUR)

    assert (sweep.files, sweep.moved) == (3, 3)
    assert all(p.is_file() for p in [*recorded, fresh]), "a recorded or young file was moved"
    assert not any(p.exists() for p in (orphan, beside, odd))
    moved = sorted(
        str(p.relative_to(tmp_path / "quarantine")) for p in (tmp_path / "quarantine").rglob("*.dcm")
    )
    assert moved == sorted(str(p.relative_to(spool.root)) for p in (orphan, beside, odd))
    assert (
        tmp_path / "quarantine" / orphan.relative_to(spool.root)
    ).read_bytes() == b"DICM" + orphan.name.encode()
    assert not empty.exists() and not empty.parent.exists(), "empty old folders stay"
    assert not odd.parent.exists(), "the folder emptied by the sweep stays"
    again = sweep_orphans(engine, spool.root, tmp_path / "quarantine", HOUR)
    assert again.files == 0
    engine.dispose()


def test_partial_files_of_a_live_writer_are_kept(tmp_path):
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.prepare()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = os.getppid()
    names = {
        "legacy": "0123456789abcdef.part",  # named before the writer's pid was in the name
        "dead": f"{dead.pid}-aaaa.part",
        "live": f"{live}-bbbb.part",
        "live-old": f"{live}-cccc.part",
    }
    for name in names.values():
        (spool.tmp_dir / name).write_bytes(b"partial")
    _age(spool.tmp_dir / names["live-old"], 2 * HOUR)
    spool.prepare(grace_s=HOUR)
    assert sorted(p.name for p in spool.tmp_dir.iterdir()) == [names["live"]]


def test_node_start_quarantines_what_a_killed_ingest_left(tmp_path):
    """A node killed with SIGKILL, its spool holding what a store cut off between writing its file
    and committing its row leaves (a file no row points to, a partial file); at the next start,
    with the leftovers older than the grace period, they are set aside and the acknowledged
    instances stay."""
    need("storescu")
    config = write_config(tmp_path, storage={"min_free_mb": 0, "orphan_grace_s": 60.0})
    settings = yaml.safe_load(config.read_text())
    port, data_dir = settings["dicom"]["port"], Path(settings["storage"]["data_dir"])
    files = make_series(tmp_path / "in", 3)
    log = tmp_path / "node.log"
    node = start_node_process(config, log)
    try:
        run = subprocess.run(
            [need("storescu"), "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, files)],
            capture_output=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
    finally:
        os.kill(node.pid, signal.SIGKILL)
        node.wait(10)
    db = node_db_url(config)
    acknowledged = {uid: path for uid, path in query_db(db, "select sop_instance_uid, path from instance")}
    assert len(acknowledged) == 3
    spool = data_dir / "spool"
    series_dir = (spool / next(iter(acknowledged.values()))).parent
    cut_off = series_dir / (pydicom.uid.generate_uid() + ".dcm")  # linked, its row never committed
    cut_off.write_bytes((spool / next(iter(acknowledged.values()))).read_bytes())
    young = series_dir / (pydicom.uid.generate_uid() + ".dcm")  # as another process is writing now
    young.write_bytes(b"in flight")
    partial = spool / ".tmp" / f"{node.pid}-dead.part"
    partial.write_bytes(b"partial")
    for path in (spool / p for p in acknowledged.values()):
        _age(path, HOUR)
    _age(cut_off, HOUR)

    node = start_node_process(config, log)
    try:
        quarantine = data_dir / "quarantine"
        assert [p.name for p in quarantine.rglob("*.dcm")] == [cut_off.name]
        assert not cut_off.exists() and young.exists() and not partial.exists()
        for path in acknowledged.values():
            assert (spool / path).is_file(), "an acknowledged instance's file was set aside"
        text = log.read_text()
        assert "moved 1 of 1 files no row points to" in text
        assert all(uid not in text for uid in acknowledged), "the log names an instance"
    finally:
        node.kill()
        node.wait(10)
