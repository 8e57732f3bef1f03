"""Shared pieces of the destination tests: a job row to hang outbox rows on, stand-in DICOM
outputs, one outbox pass, and Orthanc (DICOMweb plugin) on a chosen loopback port with users."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlmodel import Session, select

from node.runner import outbox
from node.store.tables import Job, JobState, OutboxItem, utcnow
from node.types import AlgorithmIdentity, AnalysisResult, Code, LabelScore, OutputIdentity
from tests import helpers
from tests.helpers import sample_file, wait_port
from tests.orthanc import _dicomweb_plugin


@pytest.fixture
def store(tmp_path):
    """(engine, job id) with one job in state WRITING."""
    engine = helpers.make_test_engine(tmp_path)
    with Session(engine) as s:
        return engine, helpers.add_job(s, key="chest|series|1.2.3", model_id="chest").id


def stand_in_outputs(seed: str, count: int) -> list[tuple[str, pydicom.Dataset]]:
    """CT_small copies with fresh instance UIDs in one fresh study (any storable object will do)."""
    study = generate_uid(entropy_srcs=["send test study", seed])
    out = []
    for i in range(count):
        ds = pydicom.dcmread(sample_file("CT_small.dcm"))
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["send test", seed, str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(("sc", ds))
    return out


def items(engine) -> list[OutboxItem]:
    """Every outbox row."""
    with Session(engine) as s:
        return list(s.exec(select(OutboxItem).order_by(OutboxItem.id)))


def deliver(engine, destinations, data_dir: Path, at) -> int:
    """One outbox pass at time ``at``."""
    with Session(engine) as s:
        sent = outbox.deliver_due(s, destinations, data_dir, at)
        s.commit()
    return sent


class DicomwebOrthanc:
    """Orthanc with its DICOMweb plugin on ``http_port``, HTTP basic authentication for ``users``."""

    def __init__(self, folder: Path, http_port: int, users: dict[str, str]) -> None:
        binary = shutil.which("Orthanc")
        if binary is None:
            import os

            if os.environ.get("CI"):
                pytest.fail("Orthanc is not installed; .ci/run installs it")
            pytest.skip("Orthanc is not installed (apt-get install orthanc)")
        folder.mkdir(parents=True, exist_ok=True)
        self.http_port = http_port
        self.users = users
        config = {
            "Name": "pacs-node-stow-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": http_port,
            "DicomPort": helpers.free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": users,
            "Plugins": [_dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "SaveJobs": False,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self._log = (folder / "orthanc.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, str(folder / "orthanc.json")], stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_port(http_port, 30)
        user, password = next(iter(users.items()))
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", auth=(user, password), timeout=60)

    @property
    def url(self) -> str:
        """The DICOMweb root."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def instance_uids(self) -> list[str]:
        """The SOP Instance UID of every stored instance (one entry per stored instance)."""
        ids = self.http.get("/instances").raise_for_status().json()
        return [
            self.http.get(f"/instances/{i}").raise_for_status().json()["MainDicomTags"]["SOPInstanceUID"]
            for i in ids
        ]

    def stop(self) -> None:
        """Stop Orthanc and wait for it."""
        self.http.close()
        self.proc.terminate()
        self.proc.wait(30)
        self._log.close()


@pytest.fixture
def orthanc_factory(tmp_path) -> Iterator:
    """Start (and at the end stop) DicomwebOrthanc instances: ``factory(port, users)``."""
    started: list[DicomwebOrthanc] = []

    def start(port: int, users: dict[str, str] | None = None) -> DicomwebOrthanc:
        peer = DicomwebOrthanc(tmp_path / "orthanc", port, users or {"node": "stow-secret"})
        started.append(peer)
        return peer

    yield start
    for peer in started:
        if peer.proc.poll() is None:
            peer.stop()


def chest_result(study_uid: str = "1.2.826.0.1.3680043.8.498.77.1") -> AnalysisResult:
    """A positive chest X-ray result as the cxr reference model reports one (tuberculosis, triage)."""
    findings = (
        LabelScore("tuberculosis", Code("56717001", "SCT", "Tuberculosis"), 0.9132, 0.3089, True, True),
        LabelScore("pneumonia", Code("233604007", "SCT", "Pneumonia"), 0.0412, 0.5011, False, True),
    )
    return AnalysisResult(
        algorithm=AlgorithmIdentity("cxr", "CXR triage (research)", "1.0.0", sha256="0" * 64),
        study_uid=study_uid,
        series_uids=(study_uid + ".1",),
        level="image",
        findings=findings,
        images=(),
        uid_seed="cxr|image|" + study_uid,
    )


IDENTITY = OutputIdentity(
    uid_root="1.2.826.0.1.3680043.8.498.", device_name="PACSNODE", device_uid="1.2.826.0.1.3680043.8.498.9"
)


def chest_source(study_uid: str = "1.2.826.0.1.3680043.8.498.77.1") -> pydicom.Dataset:
    """The source image's header: made-up patient, accession and study (patient data in tests only)."""
    ds = pydicom.Dataset()
    ds.StudyInstanceUID = study_uid
    ds.PatientID = "PHANTOM-0042"
    ds.IssuerOfPatientID = "NODE-TEST"
    ds.PatientName = "Phantom^Chest^A"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-1|2^3"  # delimiters on purpose: they must be escaped
    ds.StudyDate, ds.StudyTime = "20261201", "101500"
    ds.Modality = "DX"
    return ds


def queue_message(engine, job_id: int, data_dir: Path, dests, result=None) -> list[outbox.WrittenMessage]:
    """Write and queue the job's messages for ``dests``; the job is then SENDING."""
    result = result or chest_result()
    with Session(engine) as s:
        job = s.get(Job, job_id)
        written = outbox.write_messages(
            data_dir / "outbox", job, result, [chest_source()], IDENTITY, dests, utcnow()
        )
        outbox.queue_messages(s, job, written, data_dir, utcnow())
        job.state = JobState.SENDING
        s.add(job)
        s.commit()
    return written
