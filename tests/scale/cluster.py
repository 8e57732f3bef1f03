"""Helpers for the scale-out tests: node processes of one cluster (one PostgreSQL database, one
shared data folder), a DCMTK storescp destination, a loopback webhook receiver that counts."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom

from tests.helpers import REPO, free_port, need, wait_port, write_config

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


class NodeProcess:
    """``pacs-node serve --role ROLE`` as a subprocess, logging to ``folder/node.log``."""

    def __init__(self, config: Path, role: str = "all") -> None:
        import yaml

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

    def wait_listening(self) -> None:
        """Wait for the DICOM port (receivers); fail with the log if the process ended."""
        try:
            wait_port(self.port, 60)
        except TimeoutError:
            self.kill()
            raise AssertionError(f"node did not listen:\n{self.log.read_text()[-3000:]}") from None

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


def dcmsend(port: int, files: list[Path]) -> None:
    """Send ``files`` to a node with DCMTK's dcmsend (called AE PACSNODE)."""
    cmd = [need("dcmsend"), "-aet", "MODALITY", "-aec", "PACSNODE", "127.0.0.1", str(port), *map(str, files)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


class Destination:
    """DCMTK storescp with ``+uf``: one file per C-STORE received, so copies are counted."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = port or free_port()
        cmd = [
            need("storescp"),
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
