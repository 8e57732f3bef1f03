"""Durability: SIGKILL the node mid-stream; after a restart, every instance that got a success
status is on disk (byte-identical) and in the database."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from sqlmodel import Session, create_engine, select

from node.store.tables import Instance
from tests.helpers import dataset_bytes, make_series, send_until_failure, start_node_process, write_config

SENDERS = 4
PER_SENDER = 120
KILL_AFTER = 150


@pytest.mark.slow
def test_sigkill_mid_stream_loses_nothing_acknowledged(tmp_path):
    config = write_config(tmp_path)
    port = yaml.safe_load(config.read_text())["dicom"]["port"]
    batches = [make_series(tmp_path / f"in{i}", PER_SENDER) for i in range(SENDERS)]
    proc = start_node_process(config, tmp_path / "node.log")
    acked: list[Path] = []
    lock = threading.Lock()
    threads = [
        threading.Thread(target=send_until_failure, args=(port, b, acked, lock, f"CRASH{i}"))
        for i, b in enumerate(batches)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while len(acked) < KILL_AFTER and time.monotonic() < deadline and any(t.is_alive() for t in threads):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for t in threads:
        t.join(timeout=60)
    total = SENDERS * PER_SENDER
    assert KILL_AFTER <= len(acked) < total, "the kill must land mid-stream"

    restarted = start_node_process(config, tmp_path / "node.log")
    try:
        storage = yaml.safe_load(config.read_text())["storage"]
        data_dir = Path(storage["data_dir"])
        engine = create_engine(storage.get("database_url") or f"sqlite:///{data_dir / 'node.db'}")
        with Session(engine) as s:
            stored = {row.sop_instance_uid: row for row in s.exec(select(Instance))}
        engine.dispose()
        import pydicom

        for path in acked:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert uid in stored, f"acknowledged instance {path.name} missing from the database"
            on_disk = data_dir / "spool" / stored[uid].path
            assert on_disk.is_file(), f"acknowledged instance {path.name} missing from the spool"
            assert dataset_bytes(on_disk) == dataset_bytes(path)
        assert not list((data_dir / "spool" / ".tmp").iterdir()), "partial files survived the restart"
    finally:
        restarted.terminate()
        restarted.wait(timeout=30)
