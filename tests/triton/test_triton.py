"""models.backend: triton — the exported repository, and TritonSession against PyTriton on loopback.

- ``export_repository`` writes a config.pbtxt per model that Triton's own protobuf parses, with the
  manifest's names, dims and data types, dynamic batching and the ONNX file beside it; the server
  below serves exactly those configs.
- The node's analyse() over phantom studies gives the same probabilities through TritonSession as
  through ModelSession (1e-5), for every bundled model.
- max_batch_size comes from the server; an unreachable server is a transient InferenceError (the
  runner retries the job), a connection error moves to the next URL, and a server error carries
  the server's message.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sqlmodel import Session, select

from node.errors import ConfigError, InferenceError
from node.inference.registry import TensorInfo
from node.inference.runtime import CPU, RuntimeConfig, create_session
from node.inference.triton import PROVIDER, TritonConfig, TritonSession, create_triton_session
from node.inference.triton_repo import export_repository, model_config
from node.runner import PERMANENT
from node.runner.analyse import Stopwatch, analyse
from node.settings import ModelsSettings
from node.store.tables import Job, JobState
from node.synth import generate_study
from tests.helpers import REPO, free_port, raw_store_file

from .conftest import FAILING_MESSAGE, TritonServer, parse_config

PHANTOMS = {  # model id -> (phantom kind, label, options): small, fast studies
    "cxr": ("cxr", "tuberculosis+pneumonia", {"scale": 0.2}),
    "mammo": ("mammo", "malignant", {"scale": 0.12}),
    "ct-liver": ("ct", "malignant", {"slices": 6, "size": 128}),
    "ct-liver-seg": ("ct", "malignant", {"slices": 4, "size": 128}),
    "mr-brain": ("mr", "tumour", {"slices": 6, "size": 96}),
}
TYPES = {"float32": 11, "float16": 10, "uint8": 2}  # inference.DataType


def _dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# ------------------------------------------------------------------ the exported repository


def test_exported_config_parses_with_tritons_protobuf(bundled, repository):
    for model_id, model in bundled.models.items():
        config = parse_config(repository / model_id / "config.pbtxt")
        m = model.manifest
        assert config.name == model_id
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 8
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        (inp,) = config.input
        assert inp.name == m.input.name and inp.data_type == TYPES[m.input.dtype]
        assert list(inp.dims) == [d if isinstance(d, int) else -1 for d in m.input.shape[1:]]
        wanted = [m.outputs.probabilities] + ([m.outputs.cam] if m.outputs.cam else [])
        assert [o.name for o in config.output] == wanted
        graph = {o.name: o for o in model.outputs}
        for out in config.output:
            assert out.data_type == TYPES[graph[out.name].dtype]
            assert list(out.dims) == [d if isinstance(d, int) else -1 for d in graph[out.name].shape[1:]]
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params == {"pacs_node_model_version": m.version, "pacs_node_model_sha256": m.model.sha256}
        onnx = repository / model_id / "1" / "model.onnx"
        assert hashlib.sha256(onnx.read_bytes()).hexdigest() == m.model.sha256
        assert not config.instance_group  # auto: Triton chooses GPU when it has one


def test_fixed_batch_graph_and_instance_kind(bundled, tmp_path):
    model = bundled.models["mammo"]
    graph_in = model.inputs[0]
    fixed = replace(model, inputs=(TensorInfo(graph_in.name, (4, *graph_in.shape[1:]), graph_in.dtype),))
    config = parse_config(
        _write(tmp_path / "c.pbtxt", model_config(fixed, instance_kind="gpu", instance_count=2))
    )
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [4, 1, 64, 64]  # the batch is part of the dims
    assert list(config.output[0].dims)[0] == -1 or list(config.output[0].dims)[0] == 4
    (group,) = config.instance_group
    assert group.kind == 1 and group.count == 2  # KIND_GPU


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_export_refuses_an_existing_model_folder(bundled, tmp_path):
    models = [bundled.models["cxr"]]
    export_repository(models, tmp_path)
    with pytest.raises(ConfigError, match="exists"):
        export_repository(models, tmp_path)
    (written,) = export_repository(models, tmp_path, overwrite=True)
    assert written.onnx_path.read_bytes() == bundled.models["cxr"].onnx_path.read_bytes()


def test_cli_export_triton(tmp_path):
    from typer.testing import CliRunner

    from node.evaluate.cli import models_app

    out = tmp_path / "repo"
    result = CliRunner().invoke(
        models_app, ["export-triton", str(out), "--models", str(REPO / "models" / "onnx"), "--model", "cxr"]
    )
    assert result.exit_code == 0, result.output
    assert "cxr:" in result.output and "max_batch_size 16" in result.output
    assert parse_config(out / "cxr" / "config.pbtxt").max_batch_size == 16
    assert (out / "cxr" / "1" / "model.onnx").is_file()
    again = CliRunner().invoke(
        models_app, ["export-triton", str(out), "--models", str(REPO / "models" / "onnx")]
    )
    assert again.exit_code == 2 and "exists" in again.output


def test_settings_backend_and_urls():
    s = ModelsSettings.model_validate(
        {
            "backend": "triton",
            "triton": {"urls": ["https://gpu-1:8443", "http://127.0.0.1:8000"], "timeout_s": 5},
        }
    )
    assert s.backend == "triton" and s.triton.urls[0] == "https://gpu-1:8443"
    with pytest.raises(ValueError, match="http://host:port"):
        ModelsSettings.model_validate({"triton": {"urls": ["gpu-1:8000"]}})
    with pytest.raises(ValueError, match="go together"):
        ModelsSettings.model_validate({"triton": {"tls": {"cert_file": "c.pem"}}})
    assert ModelsSettings().backend == "onnxruntime"


# ------------------------------------------------------------------ against PyTriton


def _config(*urls: str, max_batch: int = 16, timeout_s: float = 20.0) -> TritonConfig:
    return TritonConfig(urls=urls, timeout_s=timeout_s, max_batch=max_batch)


def _analyse(model, session, files):  # noqa: ANN001, ANN202
    watch = Stopwatch(deadline=time.monotonic() + 120)
    result, _ = analyse(
        model, session, files, level=model.manifest.aggregation.level, uid_seed="t", watch=watch
    )
    return result, watch.batches


@pytest.mark.parametrize("model_id", sorted(PHANTOMS))
def test_analyse_through_triton_equals_onnxruntime(model_id, triton_server: TritonServer, tmp_path):
    model = triton_server.registry.models[model_id]
    kind, label, options = PHANTOMS[model_id]
    generate_study(kind, tmp_path / "study", 7, label, write_masks=False, **options)
    files = sorted((tmp_path / "study").rglob("*.dcm"))
    assert files
    local = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    remote = create_triton_session(model, _config(triton_server.url))
    assert remote.max_batch == 8 and remote.active_provider == PROVIDER  # the server's max_batch_size
    expected, _ = _analyse(model, local, files)
    got, batches = _analyse(model, remote, files)
    assert got.frames_analysed == expected.frames_analysed > 0
    assert [f.label for f in got.findings] == [f.label for f in expected.findings]
    np.testing.assert_allclose(
        [f.probability for f in got.findings], [f.probability for f in expected.findings], atol=1e-5
    )
    assert [f.positive for f in got.findings] == [f.positive for f in expected.findings]
    assert len(got.images) == len(expected.images)
    for a, b in zip(got.images, expected.images, strict=True):
        assert a.sop_instance_uid == b.sop_instance_uid
        np.testing.assert_allclose(
            [s.probability for s in a.scores], [s.probability for s in b.scores], atol=1e-5
        )
        for ha, hb in zip(a.heatmaps, b.heatmaps, strict=True):
            np.testing.assert_allclose(ha.values, hb.values, atol=1e-4)


def test_chunks_follow_the_servers_max_batch_size(triton_server: TritonServer):
    model = triton_server.registry.models["cxr"]
    session = TritonSession(
        name="cxr",
        model_name="cxr-mb3",
        input_name="image",
        output_names=["logits", "cam"],
        config=_config(triton_server.url),
    )
    assert session.max_batch == 16  # not known before the first call
    x = np.random.default_rng(3).random((7, 1, 128, 128), dtype=np.float32)
    out = session.run(x)
    assert session.server_max_batch() == 3 and session.max_batch == 3
    local = create_session(model, RuntimeConfig(providers=(CPU,), max_batch=64, warmup=False))
    ref = local.run(x)
    assert out["logits"].shape == (7, 2) and out["cam"].shape == (7, 2, 16, 16)
    np.testing.assert_allclose(out["logits"], ref["logits"], atol=1e-5)
    node_cap = TritonSession(
        name="cxr",
        input_name="image",
        output_names=["logits"],
        config=_config(triton_server.url, max_batch=2),
    )
    node_cap.run(x[:5])
    assert node_cap.max_batch == 2  # the node's cap when it is lower than the server's


def test_unreachable_server_is_a_transient_error():
    session = TritonSession(
        name="cxr",
        input_name="image",
        output_names=["logits"],
        config=_config(_dead_url(), _dead_url(), timeout_s=3),
    )
    with pytest.raises(
        InferenceError, match=r"model cxr: no Triton server reachable .*Connection ?Refused"
    ) as info:
        session.run(np.zeros((1, 1, 128, 128), np.float32))
    assert info.value.__class__ not in PERMANENT and not isinstance(info.value, PERMANENT)  # retried
    assert str(info.value).count("http://127.0.0.1:") == 2  # every URL named with its error


def test_connection_error_moves_to_the_next_url(triton_server: TritonServer):
    dead = _dead_url()
    session = TritonSession(
        name="cxr", input_name="image", output_names=["logits"], config=_config(dead, triton_server.url)
    )
    out = session.run(np.zeros((2, 1, 128, 128), np.float32))
    assert out["logits"].shape == (2, 2)
    assert session._preferred == 1  # the live server is tried first from now on


def test_server_error_carries_the_servers_message(triton_server: TritonServer):
    failing = TritonSession(
        name="cxr",
        model_name="failing",
        input_name="image",
        output_names=["logits"],
        config=_config(triton_server.url),
    )
    with pytest.raises(InferenceError, match="refused a batch of shape") as info:
        failing.run(np.zeros((1, 1, 128, 128), np.float32))
    assert FAILING_MESSAGE in str(info.value) and triton_server.url in str(info.value)
    wrong = TritonSession(
        name="cxr", input_name="image", output_names=["logits"], config=_config(triton_server.url)
    )
    with pytest.raises(InferenceError, match=r"unexpected shape for input 'image' for model 'cxr'"):
        wrong.run(np.zeros((1, 1, 64, 64), np.float32))
    unknown = TritonSession(
        name="x",
        model_name="no-such-model",
        input_name="image",
        output_names=["logits"],
        config=_config(triton_server.url),
    )
    with pytest.raises(InferenceError, match="no-such-model"):
        unknown.run(np.zeros((1, 1, 128, 128), np.float32))


def test_concurrent_workers_share_one_session(triton_server: TritonServer):
    """16 threads at once (each its own client): every answer is its own input's."""
    model = triton_server.registry.models["mammo"]
    session = create_triton_session(model, _config(triton_server.url))
    local = create_session(model, RuntimeConfig(providers=(CPU,), warmup=False))
    rng = np.random.default_rng(11)
    inputs = [rng.random((1, 1, 64, 64), dtype=np.float32) for _ in range(16)]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = session.run(inputs[i])["logits"]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for i, x in enumerate(inputs):
        np.testing.assert_allclose(results[i], local.run(x)["logits"], atol=1e-5)


# ------------------------------------------------------------------ the node with models.backend: triton


def _models_folder(folder: Path) -> Path:
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / "cxr").symlink_to(REPO / "models" / "onnx" / "cxr")
    return models


def _wait_finished(node, timeout: float = 90.0) -> Job:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    jobs: list[Job] = []
    while time.monotonic() < deadline:
        with Session(node.engine) as s:
            jobs = list(s.exec(select(Job)))
        if jobs and all(j.state in (JobState.DONE, JobState.FAILED) for j in jobs):
            (job,) = jobs
            return job
        time.sleep(0.1)
    raise AssertionError(f"job did not finish: {[(j.state, j.attempts, j.error) for j in jobs]}")


def _cxr_study(folder: Path) -> Path:
    generate_study("cxr", folder / "cxr", seed=5, label="normal", scale=0.25, write_masks=False)
    (path,) = sorted((folder / "cxr").glob("*.dcm"))
    return path


def test_node_with_an_unreachable_triton_retries_the_job(make_node, tmp_path):
    node = make_node(
        models={
            "directory": str(_models_folder(tmp_path)),
            "backend": "triton",
            "triton": {"urls": [_dead_url()], "timeout_s": 2},
        },
        assembly={"series_quiet_s": 0.3, "poll_interval_s": 0.1},
        runner={"max_attempts": 2, "retry_backoff_s": 0},
    )
    assert isinstance(node.models.sessions["cxr"], TritonSession)
    assert raw_store_file(node.scp.port, _cxr_study(tmp_path)) == 0
    job = _wait_finished(node)
    assert job.state == JobState.FAILED and job.attempts == 2, job.error  # transient: retried
    assert "InferenceError: model cxr: no Triton server reachable" in job.error


def test_node_with_triton_backend_analyses_a_study(make_node, triton_server: TritonServer, tmp_path):
    node = make_node(
        models={
            "directory": str(_models_folder(tmp_path)),
            "backend": "triton",
            "triton": {"urls": [triton_server.url]},
        },
        assembly={"series_quiet_s": 0.3, "poll_interval_s": 0.1},
        runner={"max_attempts": 1},
    )
    session = node.models.sessions["cxr"]
    assert isinstance(session, TritonSession) and session.max_batch == 8
    assert raw_store_file(node.scp.port, _cxr_study(tmp_path)) == 0
    job = _wait_finished(node)
    assert job.state == JobState.DONE, job.error
