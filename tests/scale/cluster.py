"""Helpers for the scale-out tests: node processes of one cluster (one PostgreSQL database, one
shared data folder or one object store), a DCMTK storescp destination, a loopback webhook
receiver that counts, HAProxy in front of receivers and modalities that resend a failed
association."""

from __future__ import annotations

import collections
import contextlib
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml

from tests.helpers import REPO, free_port, need, wait_for, wait_port, write_config

#: Set to a folder holding a (mutated) copy of the ``node`` package to run the node processes on
#: it instead of the checkout's (the mutation checks in docs/scale.md).
NODE_SRC_ENV = "PACS_NODE_TEST_NODE_SRC"


def cxr_models(folder: Path) -> Path:
    """A models folder with only the CXR reference model (fast to load in several processes)."""
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "cxr"
    if not link.exists():
        link.symlink_to(REPO / "models" / "onnx" / "cxr", target_is_directory=True)
    return folder


def node_config(
    folder: Path, name: str, db: str, data_dir: Path, dest_port: int, webhook_url: str, lease_s: float
) -> Path:
    """The configuration of one cluster node: its own ports and node id; the shared database and
    data folder; the CXR model; every output to the storescp (AE DEST) on ``dest_port``."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(
        folder,
        storage={"data_dir": str(data_dir), "database_url": db, "min_free_mb": 0},
        models={
            "directory": str(cxr_models(folder.parent / "models")),
            "providers": ["CPUExecutionProvider"],
        },
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
        assembly={"series_quiet_s": 0.5, "poll_interval_s": 0.1},
        runner={"workers": 2, "retry_backoff_s": 0.2},
        cluster={"node_id": name, "lease_s": lease_s},
        webhook={"url": webhook_url, "backoff_s": 0.2} if webhook_url else {},
    )


def with_object_store(config: Path, seaweed: object, **more: object) -> Path:
    """``config`` with ``storage.object_store`` on ``seaweed`` (a tests.seaweed.SeaweedFS), keys
    under ``site-a/``; ``more`` overrides its settings."""
    data = yaml.safe_load(config.read_text())
    data["storage"]["object_store"] = seaweed.settings(**{"prefix": "site-a/", "max_parallel": 4, **more})  # type: ignore[attr-defined]
    config.write_text(yaml.safe_dump(data))
    return config


def receiver_config(config: Path) -> tuple[Path, int]:
    """The cluster node's configuration as a receiver with its status page on (HAProxy checks its
    /readyz; its /metrics counts the associations it accepted); returns it and the web port."""
    data = yaml.safe_load(config.read_text())
    data["web"] = {"enabled": True, "host": "127.0.0.1", "port": free_port()}
    config.write_text(yaml.safe_dump(data))
    return config, data["web"]["port"]


def ready(web_port: int) -> int:
    """The status of a node's /readyz (-1 while its web server does not answer)."""
    return readiness(web_port)[0]


def readiness(web_port: int) -> tuple[int, str]:
    """The status and body of a node's /readyz (the body names each check); (-1, why) while its
    web server does not answer."""
    try:
        answer = httpx.get(f"http://127.0.0.1:{web_port}/readyz", timeout=5)
    except httpx.TransportError as exc:
        return -1, type(exc).__name__
    return answer.status_code, answer.text


def _sockets(pid: int) -> tuple[set[str], list[list[str]]]:
    """The socket inodes process ``pid`` holds and the rows of its /proc/PID/net/tcp (Linux)."""
    fds = f"/proc/{pid}/fd"
    inodes = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):  # a descriptor closed meanwhile
            target = os.readlink(f"{fds}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    rows = [line.split() for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]]
    return inodes, rows


def connected_to(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds an established TCP connection to loopback ``port`` (a sender
    mid-association with the destination), from /proc (Linux)."""
    try:
        inodes, rows = _sockets(pid)
    except OSError:  # the process is gone
        return False
    return any(r[3] == "01" and int(r[2].split(":")[1], 16) == port and r[9] in inodes for r in rows)


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds a listening TCP socket on ``port`` (not merely
    something on the port), from /proc (Linux)."""
    try:
        inodes, rows = _sockets(pid)
    except OSError:  # the process is gone
        return False
    return any(r[3] == "0A" and int(r[1].split(":")[1], 16) == port and r[9] in inodes for r in rows)


class NodeProcess:
    """``pacs-node serve --role ROLE`` as a subprocess, logging to ``folder/node.log``."""

    def __init__(self, config: Path, role: str = "all") -> None:
        self.config = config
        self.role = role
        self.log = config.parent / "node.log"
        self.port = int(yaml.safe_load(config.read_text())["dicom"]["port"])
        env = dict(os.environ)
        if os.environ.get(NODE_SRC_ENV):
            env["PYTHONPATH"] = os.environ[NODE_SRC_ENV] + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--config", str(config), "--role", role],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=config.parent,  # not the checkout: ``-m`` would put its ``node`` first on the path
            env=env,
        )

    def wait_listening(self, timeout: float = 60) -> None:
        """Wait until this process listens on its DICOM port (receivers): something else on the
        port does not count. Fails with the log's end if the process ends or the time runs out."""
        deadline = time.monotonic() + timeout
        while not listens_on(self.proc.pid, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"node did not listen on {self.port}:\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def web_port(self) -> int:
        """The port of its status page (from its configuration)."""
        return int(yaml.safe_load(self.config.read_text())["web"]["port"])

    def wait_ready(self, timeout: float = 90) -> None:
        """Wait until the process's /readyz answers 200 (its status page must be on). Fails at
        once if the process ends, with the log's end; at the timeout with the last /readyz answer
        (which names the failing check) and the log's end."""
        web_port = self.web_port()
        deadline = time.monotonic() + timeout
        while (answer := readiness(web_port))[0] != 200:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"node ended (exit code {self.proc.returncode}) before it was ready:\n"
                    f"{self.text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"node not ready after {timeout} s; /readyz: {answer}\n{self.text()[-3000:]}"
                )
            time.sleep(0.05)

    def text(self) -> str:
        """What it logged so far."""
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM (clean stop), SIGKILL after 30 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


#: what uvicorn or pynetdicom log when a port is taken at bind time
PORT_TAKEN = "address already in use"


def start_ready_receiver(config: Path, tries: int = 3) -> NodeProcess:
    """A receiver (its status page on) started and waited for until it listens and is ready.
    ``free_port()`` only says a port was free when it was asked: when a port was taken by another
    process before the node bound it (the node ends, saying so; a race of the test's port picking,
    not a fault of the node) the configuration gets fresh ports and the node is started again."""
    attempt = 1
    while True:
        node = NodeProcess(config, role="receiver")
        try:
            node.wait_listening()
            node.wait_ready()
            return node
        except AssertionError:
            node.kill()
            if attempt >= tries or PORT_TAKEN not in node.text().lower():
                raise
        attempt += 1
        data = yaml.safe_load(config.read_text())
        data["dicom"]["port"], data["web"]["port"] = free_port(), free_port()
        config.write_text(yaml.safe_dump(data))


def dcmsend(port: int, files: list[Path]) -> None:
    """Send ``files`` to a node with DCMTK's dcmsend (called AE PACSNODE)."""
    cmd = [need("dcmsend"), "-aet", "MODALITY", "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


class Destination:
    """DCMTK storescp with ``+uf``: one file per C-STORE received, so copies are counted."""

    def __init__(self, folder: Path, port: int | None = None, options: tuple[str, ...] = ()) -> None:
        """``options``: more storescp options (``--fork``: associations at once; ``--sleep-after
        1``: a second after each C-STORE, a slow peer)."""
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = port or free_port()
        cmd = [
            need("storescp"),
            *options,
            "+uf",
            "--aetitle",
            "DEST",
            "--output-directory",
            str(folder),
            str(self.port),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, 20)

    def counts(self) -> collections.Counter[str]:
        """How many C-STOREs arrived for each SOP Instance UID."""
        return collections.Counter(
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.folder.iterdir()
        )

    def stop(self) -> None:
        """Stop storescp."""
        self.proc.terminate()
        self.proc.wait(10)


class WebhookReceiver:
    """A loopback HTTP server counting POSTed notifications per Study Instance UID."""

    def __init__(self) -> None:
        self.posts: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    posts[body["study_uid"]] += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()


HAPROXY_CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"


def haproxy_binary() -> str:
    """Debian's haproxy; skip (outside CI) or fail (in CI) when it is not installed."""
    path = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed; scripts/system-deps.sh installs it")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    return path


class HAProxy:
    """HAProxy on deploy/haproxy/haproxy.cfg with loopback values for its environment variables."""

    def __init__(self, folder: Path, receivers: list[tuple[int, int]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.socket = folder / "admin.sock"
        env = dict(
            os.environ,
            PACS_DICOM_BIND=f"127.0.0.1:{self.port}",
            PACS_HAPROXY_LOG="stdout",
            PACS_HAPROXY_STATS_SOCKET=str(self.socket),
            PACS_HAPROXY_CHECK_INTER="300ms",
        )
        for i, (dicom_port, web_port) in enumerate(receivers, start=1):
            env[f"PACS_RECEIVER_{i}"] = f"127.0.0.1:{dicom_port}"
            env[f"PACS_RECEIVER_{i}_WEB"] = str(web_port)
        binary = haproxy_binary()
        check = subprocess.run(
            [binary, "-c", "-f", str(HAPROXY_CONFIG)], env=env, capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr
        self.log = folder / "haproxy.log"
        self.proc = subprocess.Popen(
            [binary, "-db", "-f", str(HAPROXY_CONFIG)],
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        # up once its stats socket answers (a connection to the DICOM port would count as a session)
        wait_for(self._answers, 20, f"haproxy did not start: {self.log}")

    def _answers(self) -> bool:
        try:
            return bool(self.servers())
        except OSError:
            return False

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the receivers backend: per server its status (UP, DOWN, ...), open
        sessions (scur) and sessions so far (stot)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().removeprefix("# ")))
        return {r["svname"]: r for r in rows if r["pxname"] == "receivers" and r["svname"] != "BACKEND"}

    def status(self, server: str) -> str:
        """UP, DOWN, ... of one receiver."""
        return self.servers()[server]["status"]

    def stop(self) -> None:
        """Stop HAProxy."""
        self.proc.terminate()
        self.proc.wait(10)


class Modality:
    """A modality's queue: sends its batches one association each, and resends a batch whose
    association failed (the receiver died under it) after a second, up to ten times."""

    def __init__(self, port: int, batches: list[list[Path]]) -> None:
        self.port = port
        self.batches = batches
        self.failures = 0
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        for files in self.batches:
            for attempt in range(10):
                try:
                    dcmsend(self.port, files)
                    break
                except AssertionError as exc:  # dcmsend's exit status
                    self.failures += 1
                    if attempt == 9:
                        self.errors.append(exc)
                    time.sleep(1.0)
                except BaseException as exc:  # noqa: BLE001 (reported from the test's thread)
                    self.errors.append(exc)
                    return
