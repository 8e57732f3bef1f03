"""A PyTriton server on loopback serving the bundled models (exported by the node) through onnxruntime.

The server runs in its own venv (tests/triton/setup-pytriton.sh; nvidia-pytriton needs numpy<2).
Tests that need it skip, saying why, when that venv is absent; PACS_NODE_PYTRITON_PYTHON names
its python explicitly. The model configs it serves are the ones ``export_repository`` wrote,
parsed with Triton's own protobuf (``tritonclient.grpc.model_config_pb2``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip(
    "tritonclient.http", reason="tritonclient[http] is not installed (pip install -e '.[dev]')"
)

from node.inference.registry import Registry, load_registry  # noqa: E402
from node.inference.triton_repo import export_repository  # noqa: E402
from tests.helpers import free_port  # noqa: E402

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).with_name("pytriton_server.py")
SETUP = Path(__file__).with_name("setup-pytriton.sh")
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pacs-node" / "venv-pytriton"
FAILING_MESSAGE = "model weights are corrupt on this server (test)"
_DTYPES = {1: "bool", 2: "uint8", 10: "float16", 11: "float32"}  # inference.DataType values used


def model_config_pb2() -> ModuleType:
    """Triton's ``model_config_pb2`` from the tritonclient wheel, loaded by file: importing
    ``tritonclient.grpc`` would import grpcio, which only the config's protobuf does not need."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("tritonclient_model_config_pb2", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_config(path: Path) -> Any:
    """A ``config.pbtxt`` as an ``inference.ModelConfig`` message (raises on any text-format error)."""
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2().ModelConfig())


def _pytriton_python() -> Path | None:
    explicit = os.environ.get("PACS_NODE_PYTRITON_PYTHON")
    if explicit:
        return Path(explicit)
    venv = Path(os.environ.get("PACS_NODE_PYTRITON_VENV", DEFAULT_VENV))
    python = venv / "bin" / "python"
    return python if python.exists() else None


def _tensor(t: Any) -> dict[str, Any]:
    return {"name": t.name, "dtype": _DTYPES[t.data_type], "dims": list(t.dims)}


@dataclass
class TritonServer:
    """The running PyTriton server: its URL, the exported repository, and the batch sizes its
    inference functions received (filled in when it stops)."""

    url: str
    repository: Path
    registry: Registry
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    batches: dict[str, list[int]] = field(default_factory=dict)


@pytest.fixture(scope="session")
def bundled() -> Registry:
    """The bundled reference models."""
    registry = load_registry(ROOT / "models" / "onnx")
    assert registry.models and not registry.refused
    return registry


@pytest.fixture(scope="session")
def repository(bundled: Registry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled models exported as a Triton model repository (max_batch_size 8)."""
    out = tmp_path_factory.mktemp("triton-repo")
    export_repository(bundled.models.values(), out, max_batch=8, queue_delay_us=2000)
    return out


@pytest.fixture(scope="session")
def triton_server(
    bundled: Registry, repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    """PyTriton on a free loopback port serving every exported model (by its config.pbtxt), a copy
    of cxr with max_batch_size 3 (``cxr-mb3``) and a model that always fails (``failing``)."""
    if os.environ.get("PACS_NODE_TEST_DATABASE", "sqlite") != "sqlite":
        pytest.skip("the Triton tests do not touch the database: they run in the SQLite pass only")
    python = _pytriton_python()
    if python is None:
        pytest.skip(
            f"PyTriton is not installed: run {SETUP.relative_to(ROOT)} (a venv of its own: it needs numpy<2)"
        )
    models = []
    for model_id in bundled.models:
        config = parse_config(repository / model_id / "config.pbtxt")
        models.append(
            {
                "name": config.name,
                "onnx": str(repository / model_id / "1" / "model.onnx"),
                "max_batch_size": config.max_batch_size,
                "queue_delay_us": config.dynamic_batching.max_queue_delay_microseconds,
                "input": _tensor(config.input[0]),
                "outputs": [_tensor(o) for o in config.output],
            }
        )
    cxr = next(m for m in models if m["name"] == "cxr")
    models.append({**cxr, "name": "cxr-mb3", "max_batch_size": 3})
    failing = {**cxr, "name": "failing", "message": FAILING_MESSAGE}
    ports = [free_port() for _ in range(3)]
    spec = {
        "http_port": ports[0],
        "grpc_port": ports[1],
        "metrics_port": ports[2],
        "models": models,
        "failing": [failing],
    }
    spec_path = tmp_path_factory.mktemp("pytriton") / "spec.json"
    spec_path.write_text(json.dumps(spec))
    # PyTriton's Python backend stub loads libpython: point it at this interpreter's (a pyenv or
    # venv Python is not where the system's libpython is)
    libdir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p),
    }
    env.pop("PYTHONPATH", None)
    process = subprocess.Popen(
        [str(python), str(SERVER), str(spec_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    server = TritonServer(f"http://127.0.0.1:{ports[0]}", repository, bundled, process)
    ready = threading.Event()

    decoder = json.JSONDecoder()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            server.lines.append(line.rstrip())
            if "PYTRITON-SPEC-READY" in line:  # anywhere: tritonserver's log shares the pipe
                ready.set()
            elif "PYTRITON-SPEC-BATCHES " in line:
                # raw_decode: tritonserver's log may go on on the same line after the JSON; the
                # reader must live on whatever it reads, or the server blocks on a full pipe
                marker = "PYTRITON-SPEC-BATCHES "
                try:
                    sizes, _ = decoder.raw_decode(line, line.index(marker) + len(marker))
                    server.batches.update(sizes)
                except ValueError:
                    server.lines.append(f"(batch sizes not read from: {line.rstrip()!r})")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while not ready.wait(0.5):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            reader.join(5)
            tail = "\n".join(server.lines[-40:])
            pytest.fail(f"PyTriton did not start (exit {process.returncode}):\n{tail}")
    try:
        yield server
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        reader.join(10)
        print(f"PyTriton batch sizes: {server.batches}", file=sys.stderr)
