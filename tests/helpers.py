"""Shared helpers for tests: instances with fresh UIDs, free ports, DCMTK lookup, node processes."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

if TYPE_CHECKING:
    from node.app import Node
    from node.store.tables import Job

REPO = Path(__file__).resolve().parents[1]

# Only files bundled with pydicom (others would be downloaded, and there is no network in CI).
TS_FILES = {
    "explicit-le": "CT_small.dcm",
    "implicit-le": "MR_small_implicit.dcm",
    "big-endian": "MR_small_bigendian.dcm",
    "deflated": "image_dfl.dcm",
    "jpeg-baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "jpeg-extended": "JPEG-lossy.dcm",
    "jpeg-ls": "MR_small_jpeg_ls_lossless.dcm",
    "jpeg2000-lossless": "MR_small_jp2klossless.dcm",
    "jpeg2000": "JPEG2000.dcm",
    "rle": "MR_small_RLE.dcm",
}
# storescu flag that proposes each file's own transfer syntax
STORESCU_FLAG = {
    "explicit-le": "-xe",
    "implicit-le": "-xi",
    "big-endian": "-xb",
    "deflated": "-xd",
    "jpeg-baseline": "-xy",
    "jpeg-extended": "-xx",
    "jpeg-ls": "-xt",
    "jpeg2000-lossless": "-xv",
    "jpeg2000": "-xw",
    "rle": "-xr",
}


def sample_file(name: str) -> Path:
    """A pydicom bundled test file."""
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not bundled with pydicom"
    return Path(path)


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the file meta group of a Part 10 file."""
    raw = path.read_bytes()
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return raw[132 + 12 + int(meta.FileMetaInformationGroupLength) :]


def fresh_copy(
    src: Path,
    dst: Path,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str | None = None,
    body_part: str | None = None,
) -> Path:
    """Copy ``src`` with a new SOP Instance UID (and optionally study/series UIDs, patient name and
    BodyPartExamined), pixel data untouched."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
    if series_uid:
        ds.SeriesInstanceUID = series_uid
    if patient_name:
        ds.PatientName = patient_name
    if body_part:
        ds.BodyPartExamined = body_part
    if 0xFFFCFFFC in ds:  # DCMTK drops Data Set Trailing Padding when it sends; so do we, to compare bytes
        del ds[0xFFFCFFFC]
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


def make_series(
    folder: Path, count: int, template: str = "CT_small.dcm", body_part: str | None = None, **uids: str
) -> list[Path]:
    """``count`` copies of a test file in one new series (fresh SOP Instance UIDs); ``body_part``
    sets BodyPartExamined (CT_small, a chest slice, names none: routing then reads its pixels)."""
    study_uid = uids.get("study_uid") or generate_uid()
    series_uid = uids.get("series_uid") or generate_uid()
    return [
        fresh_copy(sample_file(template), folder / f"{i:05d}.dcm", study_uid, series_uid, body_part=body_part)
        for i in range(count)
    ]


_PORTS_HANDED_OUT: set[int] = set()
_PORTS_LOCK = threading.Lock()


def _ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections (Linux's default 32768)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port free on loopback right now, never the same twice in this process, and below the
    kernel's range for outgoing connections: a port the kernel hands out for port 0 is taken from
    that range, where any client connection of the machine (thousands in a test run) may take it
    again before the server meant for it binds, and two calls may get the same one."""
    high = _ephemeral_low()
    low = max(1024, high - 12000)
    pick = random.Random(os.getpid() ^ time.monotonic_ns())
    with _PORTS_LOCK:
        for _ in range(500):
            port = pick.randrange(low, high)
            if port in _PORTS_HANDED_OUT:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _PORTS_HANDED_OUT.add(port)
            return port
    raise RuntimeError(f"no free loopback port between {low} and {high}")


def need(tool: str) -> str:
    """Path of a DCMTK/dicom3tools binary; skip (outside CI) or fail (in CI) when it is missing."""
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; .ci/run installs it")
        pytest.skip(f"{tool} is not installed (apt-get install dcmtk dicom3tools)")
    return path


def need_module(name: str) -> object:
    """Import an optional Python package; skip (outside CI) or fail (in CI, which installs the
    `convert` extra) when it is missing."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"Python package {name} is not installed; ./run-tests installs the convert extra")
        pytest.skip(f"{name} is not installed (pip install -e '.[convert]')", allow_module_level=True)


# Set by tests/conftest.py when PACS_NODE_TEST_DATABASE=postgresql: returns the URL of a fresh empty
# database on the session's PostgreSQL server. None: each node gets SQLite in its data folder.
DATABASE_FACTORY: Callable[[], str] | None = None


def write_config(folder: Path, **sections: dict) -> Path:
    """A node.yaml for tests: loopback ports, short quiet period, no disk watermark; a fresh
    PostgreSQL database when the suite runs against PostgreSQL."""
    import yaml

    config = {
        "dicom": {"host": "127.0.0.1", "port": free_port(), "ae_title": "PACSNODE"},
        "web": {"host": "127.0.0.1", "port": free_port()},
        "storage": {"data_dir": str(folder / "data"), "min_free_mb": 0},
        "assembly": {"series_quiet_s": 1.0, "poll_interval_s": 0.2},
        # no models by default (fast start); the repository's routing rules
        "models": {"directory": str(folder / "no-models")},
        "routing": {"rules_file": str(REPO / "config" / "routes.yaml")},
    }
    if DATABASE_FACTORY is not None:
        config["storage"]["database_url"] = DATABASE_FACTORY()
    for name, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(name, {}).update(values)
        else:
            config[name] = values
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def analysing_config(folder: Path, dest_port: int, destination: dict | None = None, **sections: dict) -> Path:
    """write_config for a node with the reference models on CPU that sends every output (no
    parametric maps) to a DCMTK storescp (AE DEST) on loopback ``dest_port``; web server off.
    ``destination`` adds to the destination's settings; other sections as in write_config."""
    return write_config(
        folder,
        **{
            "models": {"directory": str(REPO / "models" / "onnx"), "providers": ["CPUExecutionProvider"]},
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": "DEST",
                    "host": "127.0.0.1",
                    "port": dest_port,
                    "parametric_map": False,
                    **(destination or {}),
                }
            ],
            "outputs": {"send_to": "all"},
            "web": {"enabled": False},
            **sections,
        },
    )


def send_until_failure(
    port: int, files: list[Path], acked: list[Path], lock: threading.Lock, aet: str
) -> None:
    """Send ``files`` in order over one association (CT Image Storage, explicit VR little endian),
    appending each acknowledged with success to ``acked``; stop at the first failure (the node
    died under us, say)."""
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 20
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    if not assoc.is_established:
        return
    for path in files:
        try:
            rsp = assoc.send_c_store(path)
        except Exception:  # the node died under us
            return
        if "Status" not in rsp or int(rsp.Status) != 0:
            return
        with lock:
            acked.append(path)
    assoc.release()


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Wait until something listens on loopback ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def start_node_process(config: Path, log: Path) -> subprocess.Popen:
    """Run `pacs-node serve` as a subprocess and wait until its DICOM port listens."""
    import yaml

    port = yaml.safe_load(config.read_text())["dicom"]["port"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "serve", "--config", str(config)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return proc


def raw_store(port: int, sop_class: str, sop_instance: str, transfer_syntax: str, data: bytes) -> int:
    """Send ``data`` as a C-STORE data set under the given request UIDs, with no checks and no
    encoding on our side (pynetdicom's own send_c_store refuses malformed input), and return the
    status the node answered.
    """
    from io import BytesIO

    from pynetdicom import AE
    from pynetdicom.dimse_primitives import C_STORE

    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(sop_class, [transfer_syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established, "association refused"
    try:
        context = assoc._get_valid_context(sop_class, transfer_syntax, "scu")
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.Priority = 2
        req.DataSet = BytesIO(data)
        assoc._reactor_checkpoint.clear()  # same hand-off as Association.send_c_store
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(req, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert rsp is not None, "no C-STORE response"
        return int(rsp.Status)
    finally:
        assoc.release()


def raw_store_file(port: int, path: Path, data: bytes | None = None, **request: str) -> int:
    """raw_store with the UIDs and syntax of a file's meta (overridable) and its data set bytes."""
    meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
    return raw_store(
        port,
        request.get("sop_class", str(meta.MediaStorageSOPClassUID)),
        request.get("sop_instance", str(meta.MediaStorageSOPInstanceUID)),
        request.get("transfer_syntax", str(meta.TransferSyntaxUID)),
        dataset_bytes(path) if data is None else data,
    )


def node_db_url(config: Path) -> str:
    """The database the node of ``config`` writes (SQLite in its data folder, or PostgreSQL)."""
    import yaml

    storage = yaml.safe_load(config.read_text())["storage"]
    return storage.get("database_url") or f"sqlite:///{Path(storage['data_dir']) / 'node.db'}"


def query_db(db: str, sql: str) -> list[tuple]:
    """Rows of ``sql`` from outside the node process; [] while the schema does not exist yet."""
    if db.startswith("sqlite:///") and not Path(db.removeprefix("sqlite:///")).exists():
        return []
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError, ProgrammingError

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


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``predicate`` until it returns something true (returned); TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(what)


class StoreSCP:
    """DCMTK storescp writing what it receives into a folder, one file per C-STORE (``+uf``: a
    second copy of an instance is a second file, so duplicates can be counted)."""

    def __init__(self, folder: Path, port: int, aet: str = "DEST") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        cmd = [need("storescp"), "+uf", "--aetitle", aet, "--output-directory", str(folder), str(port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, 20)

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(self.folder.iterdir())]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def make_test_engine(tmp_path: Path):  # noqa: ANN201 - a SQLAlchemy Engine
    """The test database: PostgreSQL under PACS_NODE_TEST_DATABASE=postgresql, else SQLite in tmp_path."""
    from node.store.db import make_engine

    return make_engine(DATABASE_FACTORY() if DATABASE_FACTORY else f"sqlite:///{tmp_path / 'node.db'}")


def add_job(session, *, key: str, state: str | None = None, **fields: object):  # noqa: ANN001, ANN201
    """Insert and return one Job row (model m, series level, study 1.2 unless given), committed."""
    from node.store.tables import Job, JobState, utcnow

    now = utcnow()
    values: dict[str, object] = {
        "model_id": "m",
        "level": "series",
        "study_uid": "1.2",
        "series_uids": ["1.2.3"],
        "created_at": now,
        "updated_at": now,
        "not_before": now,
    }
    values.update(fields)
    job = Job(key=key, state=state or JobState.WRITING, **values)
    session.add(job)
    session.commit()
    session.refresh(job)
    return job


def wait_first_job_finished(node: Node, timeout: float = 120.0) -> Job:
    """The first job of an in-process ``node`` once it is done or failed (TimeoutError naming its
    state otherwise)."""
    from sqlmodel import Session, select

    from node.store.tables import Job, JobState  # noqa: F811 - the run-time import of the hint's class

    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        with Session(node.engine) as s:
            job = s.exec(select(Job)).first()
        if job is not None and job.state in (JobState.DONE, JobState.FAILED):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job not finished: {job and (job.state, job.error)}")
