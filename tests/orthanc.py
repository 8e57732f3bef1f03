"""Orthanc as the PACS in tests: started on free loopback ports with a throw-away storage folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, wait_port

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _dicomweb_plugin() -> str:
    if not DICOMWEB_PLUGIN.exists():
        import os

        message = f"{DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb)"
        if os.environ.get("CI"):
            pytest.fail(message + "; scripts/system-deps.sh installs it")
        pytest.skip(message)
    return str(DICOMWEB_PLUGIN)


class Orthanc:
    """A running Orthanc with its REST client."""

    def __init__(
        self,
        folder: Path,
        node_port: int,
        node_aet: str = "PACSNODE",
        dicom_port: int | None = None,
        dicomweb: bool = False,
    ) -> None:
        """``dicomweb``: load the DICOMweb plugin (Debian ``orthanc-dicomweb``), served under
        ``/dicom-web/`` on the HTTP port, as a viewer such as OHIF reads it."""
        binary = shutil.which("Orthanc")
        if binary is None:
            import os

            if os.environ.get("CI"):
                pytest.fail("Orthanc is not installed; .ci/run installs it")
            pytest.skip("Orthanc is not installed (apt-get install orthanc)")
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = dicom_port or free_port()
        self.aet = "ORTHANC"
        config = {
            "Name": "pacs-node-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {"node": [node_aet, "127.0.0.1", node_port]},
            "Plugins": [_dicomweb_plugin()] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "StableAge": 60,
            "SaveJobs": False,
            "LogExportedResources": False,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = (folder / "orthanc.log").open("wb")
        self.proc = subprocess.Popen(
            [binary, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_port(self.http_port, 30)
        wait_port(self.dicom_port, 30)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=120)

    def upload(self, paths: list[Path]) -> set[str]:
        """POST each file; return the Orthanc study ids."""
        studies = set()
        for path in paths:
            rsp = self.http.post("/instances", content=path.read_bytes())
            rsp.raise_for_status()
            studies.add(rsp.json()["ParentStudy"])
        return studies

    def send_to_node(self, study_id: str) -> None:
        """Ask Orthanc to C-STORE a whole study to the node (the modality called "node")."""
        rsp = self.http.post("/modalities/node/store", json={"Resources": [study_id], "Synchronous": True})
        rsp.raise_for_status()

    def study_series(self, study_id: str) -> list[dict]:
        """The series of a study with their main tags."""
        rsp = self.http.get(f"/studies/{study_id}/series")
        rsp.raise_for_status()
        return rsp.json()

    def instance_file(self, instance_id: str) -> bytes:
        """A stored instance's Part 10 bytes."""
        rsp = self.http.get(f"/instances/{instance_id}/file")
        rsp.raise_for_status()
        return rsp.content

    def wait_for_series(self, study_id: str, predicate, timeout: float = 180.0) -> list[dict]:
        """Poll the study until ``predicate(series_list)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            series = self.study_series(study_id)
            if predicate(series) or time.monotonic() > deadline:
                return series
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop Orthanc."""
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
