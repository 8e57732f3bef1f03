"""No patient identifiers in the logs: a phantom study goes through a node with the bundled models,
with every logger at DEBUG (the node's and pynetdicom's included), and the log output is searched
for the phantom's patient name, ID, birth date and accession number."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from sqlmodel import Session, select

from node.app import Node
from node.store.tables import Job, JobState
from node.synth import generate_study
from tests.helpers import REPO, StoreSCP, free_port, need

pytestmark = pytest.mark.slow


def _wait_done(node: Node, timeout: float = 120.0) -> Job:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        with Session(node.engine) as s:
            job = s.exec(select(Job)).first()
        if job is not None and job.state in (JobState.DONE, JobState.FAILED):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job not finished: {job and (job.state, job.error)}")


def _identifiers(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values = {
        "PatientName": str(ds.PatientName),
        "PatientID": str(ds.PatientID),
        "PatientBirthDate": str(ds.PatientBirthDate),
        "AccessionNumber": str(ds.AccessionNumber),
    }
    family = str(ds.PatientName).split("^", 1)[0]
    if len(family) >= 4:
        values["PatientName (family)"] = family
    for name, value in values.items():
        assert len(value) >= 4, f"the phantom's {name} is too short to search for: {value!r}"
    return values


def test_logs_carry_no_patient_identifiers(make_node, tmp_path: Path, caplog) -> None:
    port = free_port()
    receiver = StoreSCP(tmp_path / "received", port)
    caplog.set_level(logging.DEBUG)
    for name in ("node", "pynetdicom"):
        caplog.set_level(logging.DEBUG, logger=name)
    try:
        node = make_node(
            models={"directory": str(REPO / "models" / "onnx")},
            destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": port}],
            outputs={"send_to": "all"},
            logging={"level": "DEBUG"},
        )
        generate_study("cxr", tmp_path / "cxr", seed=23, label="pneumonia", scale=0.5)
        files = sorted((tmp_path / "cxr").glob("*.dcm"))
        phi = _identifiers(files[0])
        sent = subprocess.run(
            [need("storescu"), "-aet", "MODALITY", "-aec", "PACSNODE", "127.0.0.1", str(node.scp.port)]
            + [str(f) for f in files]
            + [str(files[0])],  # a duplicate too
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        job = _wait_done(node)
        assert job.state == JobState.DONE, job.error
    finally:
        receiver.stop()
    assert receiver.received(), "the outputs were not delivered"

    text = "\n".join(caplog.text.splitlines() + [r.getMessage() for r in caplog.records])
    assert "job " in text and "pynetdicom" in {r.name.split(".")[0] for r in caplog.records}
    assert len(caplog.records) > 50, "the capture saw too little to prove anything"
    for name, value in phi.items():
        assert value not in text, f"the log output contains the phantom's {name}"
