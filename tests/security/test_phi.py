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
from node.store.tables import JobState
from node.synth import generate_study
from tests.helpers import REPO, StoreSCP, free_port, need, wait_first_job_finished

pytestmark = pytest.mark.slow


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


def _debug_node(make_node, dest_port: int) -> Node:
    """A node with the bundled models, logging at DEBUG, sending every output to ``dest_port``."""
    return make_node(
        models={"directory": str(REPO / "models" / "onnx")},
        destinations=[{"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}],
        outputs={"send_to": "all"},
        logging={"level": "DEBUG"},
    )


def test_logs_carry_no_patient_identifiers(make_node, tmp_path: Path, caplog) -> None:
    port = free_port()
    receiver = StoreSCP(tmp_path / "received", port)
    caplog.set_level(logging.DEBUG)
    for name in ("node", "pynetdicom"):
        caplog.set_level(logging.DEBUG, logger=name)
    try:
        node = _debug_node(make_node, port)
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
        job = wait_first_job_finished(node)
        assert job.state == JobState.DONE, job.error
    finally:
        receiver.stop()
    assert receiver.received(), "the outputs were not delivered"

    text = "\n".join(caplog.text.splitlines() + [r.getMessage() for r in caplog.records])
    assert "job " in text and "pynetdicom" in {r.name.split(".")[0] for r in caplog.records}
    assert len(caplog.records) > 50, "the capture saw too little to prove anything"
    for name, value in phi.items():
        assert value not in text, f"the log output contains the phantom's {name}"


def test_an_invalid_birth_date_reaches_no_log_job_api_or_page(make_node, tmp_path: Path, caplog) -> None:
    """Issue 21 item 6 as it was found: a chest radiograph whose PatientBirthDate is not a DICOM
    date ('1911-09-27') used to fail its job with pydicom's "Unable to convert '1911-09-27' to
    'DA'", written to the ERROR log, the job's error, the API and the pages, and the study got no
    result. Now the job is done, its SR carries the birth date as unknown (empty), and the value
    appears in no log record (pydicom's own warning included), job, API answer or page."""
    from fastapi.testclient import TestClient

    from tests.helpers import raw_store_file

    bad = "1911-09-27"
    port = free_port()
    receiver = StoreSCP(tmp_path / "received", port)
    caplog.set_level(logging.DEBUG)
    try:
        node = _debug_node(make_node, port)
        generate_study("cxr", tmp_path / "cxr", seed=24, label="pneumonia", scale=0.5, write_masks=False)
        for f in sorted((tmp_path / "cxr").glob("*.dcm")):
            ds = pydicom.dcmread(f)
            ds.PatientBirthDate = bad  # not YYYYMMDD: pydicom refuses it as a DA when the SR copies it
            ds.save_as(f)
            assert raw_store_file(node.scp.port, f) == 0
        job = wait_first_job_finished(node)
        client = TestClient(node.web_app())
        seen = {
            "job error": job.error,
            "log": caplog.text + "\n".join(r.getMessage() for r in caplog.records),
            "jobs API": client.get("/api/v1/jobs").text,
            "studies API": client.get("/api/v1/studies").text,
            "overview page": client.get("/").text,
            "study page": client.get(f"/studies/{_study_uid(node)}").text,
        }
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(d.Modality == "SR" for d in receiver.received()):
            time.sleep(0.2)
        reports = [d for d in receiver.received() if d.Modality == "SR"]
    finally:
        receiver.stop()
    # the study gets its result: the invalid date is carried as unknown (Type 2, empty)
    assert job.state == JobState.DONE, job.error
    assert reports and all(str(r.PatientBirthDate) == "" for r in reports)
    assert len(seen["jobs API"]) > 20 and len(seen["study page"]) > 200
    for where, text in seen.items():
        assert bad not in text and "1911" not in text, f"the invalid birth date is in the {where}"


def _study_uid(node: Node) -> str:
    from node.store.tables import Study

    with Session(node.engine) as s:
        study = s.exec(select(Study)).first()
    assert study is not None
    return study.study_uid
