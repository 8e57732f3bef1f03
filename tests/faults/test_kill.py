"""SIGKILL of the node process during inference and during sending, then a restart: the work
resumes, and the destination receives each output once, under the SOP Instance UIDs the node
chose before it died (never a second copy under new UIDs)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError, ProgrammingError

from node.synth import generate_study
from tests.helpers import StoreSCP, free_port, need, raw_store_file, start_node_process, write_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _config(tmp_path: Path, dest_port: int) -> Path:
    return write_config(
        tmp_path,
        models={"directory": str(ROOT / "models" / "onnx"), "providers": ["CPUExecutionProvider"]},
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "DEST",
                "host": "127.0.0.1",
                "port": dest_port,
                "parametric_map": False,
                "max_attempts": 100,
                "backoff_initial_s": 0.2,
                "backoff_max_s": 0.5,
            }
        ],
        outputs={"send_to": "all"},
        web={"enabled": False},
    )


def _db_url(config: Path) -> str:
    """The database the node of ``config`` writes (SQLite in its data folder, or PostgreSQL)."""
    import yaml

    storage = yaml.safe_load(config.read_text())["storage"]
    return storage.get("database_url") or f"sqlite:///{Path(storage['data_dir']) / 'node.db'}"


def _query(db: str, sql: str) -> list[tuple]:
    """Rows of ``sql`` from outside the node process; [] while the schema does not exist yet."""
    if db.startswith("sqlite:///") and not Path(db.removeprefix("sqlite:///")).exists():
        return []
    engine = create_engine(db)
    try:
        with engine.connect() as con:
            return [tuple(row) for row in con.execute(text(sql))]
    except OperationalError:
        return []
    except ProgrammingError:  # PostgreSQL: tables not created yet
        return []
    finally:
        engine.dispose()


def _wait(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(what)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def _send_cxr(tmp_path: Path, port: int) -> None:
    generate_study("cxr", tmp_path / "cxr", seed=3, label="pneumonia", scale=0.5, write_masks=False)
    for f in sorted((tmp_path / "cxr").glob("*.dcm")):
        assert raw_store_file(port, f) == 0


def _received_uids(scp: StoreSCP) -> list[str]:
    return [str(d.SOPInstanceUID) for d in scp.received()]


def test_sigkill_during_sending_then_restart_delivers_once(tmp_path):
    need("storescp")
    dest_port = free_port()  # nothing listens yet: the destination is down
    config = _config(tmp_path, dest_port)
    db = _db_url(config)
    log = tmp_path / "node.log"
    node = start_node_process(config, log)
    scp = None
    try:
        import yaml

        port = yaml.safe_load(config.read_text())["dicom"]["port"]
        _send_cxr(tmp_path, port)
        # outputs queued and already tried at least once against the dead destination
        _wait(
            lambda: _query(db, "select count(*) from outboxitem where state='pending' and attempts>0")[0][0],
            90,
            "no pending outbox rows",
        )
        queued = {r[0] for r in _query(db, "select sop_instance_uid from outboxitem")}
        assert len(queued) >= 2  # SR + secondary capture
        _kill(node)
        scp = StoreSCP(tmp_path / "received", dest_port)
        node = start_node_process(config, log)
        _wait(
            lambda: _query(db, "select count(*) from outboxitem where state!='sent'")[0][0] == 0,
            60,
            "outbox not drained after restart",
        )
        received = _received_uids(scp)
        assert sorted(received) == sorted(queued)  # each output once, under the UIDs chosen before the kill
        assert {r[0] for r in _query(db, "select sop_instance_uid from outboxitem")} == queued
        assert _query(db, "select state from job") == [("done",)]
    finally:
        node.kill()
        node.wait(10)
        if scp is not None:
            scp.stop()


def test_sigkill_during_inference_then_restart_resumes(tmp_path):
    need("storescp")
    dest_port = free_port()
    config = _config(tmp_path, dest_port)
    db = _db_url(config)
    log = tmp_path / "node.log"
    scp = StoreSCP(tmp_path / "received", dest_port)
    node = start_node_process(config, log)
    try:
        import yaml

        port = yaml.safe_load(config.read_text())["dicom"]["port"]
        _send_cxr(tmp_path, port)
        _wait(
            lambda: _query(db, "select 1 from job where state in ('preprocessing', 'inferring')"),
            90,
            "job never reached inference",
        )
        _kill(node)
        assert _query(db, "select count(*) from outboxitem")[0][0] == 0  # killed before any output
        assert _received_uids(scp) == []
        node = start_node_process(config, log)
        _wait(
            lambda: (
                _query(db, "select state from job") == [("done",)]
                and _query(db, "select count(*) from outboxitem where state!='sent'")[0][0] == 0
            ),
            90,
            "interrupted job not resumed to done",
        )
        queued = {r[0] for r in _query(db, "select sop_instance_uid from outboxitem")}
        received = _received_uids(scp)
        assert len(queued) >= 2
        assert sorted(received) == sorted(queued)  # one copy each
        assert _query(db, "select attempts from job")[0][0] >= 2  # it really ran again
    finally:
        node.kill()
        node.wait(10)
        scp.stop()
