"""ONNX Runtime sessions: provider fallback, warm-up, batch splitting, threads."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from node.errors import InferenceError
from node.inference.registry import load_model
from node.inference.runtime import (
    CPU,
    ModelSession,
    RuntimeConfig,
    create_session,
    open_session,
    select_providers,
)

from .conftest import cam_model_reference, make_cam_model

GPU_FIRST = ("TensorrtExecutionProvider", "CUDAExecutionProvider", CPU)


def test_select_providers_keeps_order_and_cpu_last(caplog):
    available = ["CUDAExecutionProvider", CPU]
    assert select_providers(GPU_FIRST, available) == ["CUDAExecutionProvider", CPU]
    assert "TensorrtExecutionProvider is not available" in caplog.text
    assert select_providers([CPU, "CUDAExecutionProvider"], available) == ["CUDAExecutionProvider", CPU]
    assert select_providers([], available) == [CPU]


def test_session_logs_the_active_provider(caplog):
    caplog.set_level(logging.INFO, logger="node.inference.runtime")
    sess = open_session(make_cam_model(), RuntimeConfig(providers=GPU_FIRST, intra_op_threads=1), "cam")
    active = sess.get_providers()[0]
    assert f"model cam: active execution provider {active}" in caplog.text
    assert sess.get_session_options().intra_op_num_threads == 1
    if active == CPU:  # this machine has no GPU: why it runs on the CPU is reported
        assert (
            "no usable GPU here" in caplog.text
            or "active provider is CPUExecutionProvider (fallback)" in caplog.text
        )


@pytest.fixture(scope="module")
def cam_session() -> ModelSession:
    sess = open_session(make_cam_model(), RuntimeConfig(intra_op_threads=1), "cam")
    return ModelSession(sess, name="cam", input_name="image", output_names=["logits", "cam"], max_batch=3)


def test_run_splits_batches_and_matches_reference(cam_session):
    x = np.random.default_rng(0).normal(size=(7, 3, 32, 32)).astype(np.float32)
    out = cam_session.run(x)
    logits, cam = cam_model_reference(x)
    assert out["logits"].shape == (7, 2) and out["cam"].shape == (7, 2, 8, 8)
    np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["cam"], cam, rtol=1e-4, atol=1e-5)
    only = cam_session.run(x[:2], outputs=["logits"])
    assert list(only) == ["logits"]
    assert not cam_session.uses_io_binding  # CPU


class FakeSession:
    """Records the batch sizes it is called with; output = per-sample sum."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def get_providers(self) -> list[str]:
        return [CPU]

    def run(self, names, feeds):
        x = feeds["x"]
        with self.lock:
            self.calls.append(x.shape[0])
        return [x.reshape(x.shape[0], -1).sum(axis=1, keepdims=True)]


def test_chunking_and_fixed_batch_padding():
    fake = FakeSession()
    s = ModelSession(fake, name="f", input_name="x", output_names=["y"], max_batch=4)
    out = s.run(np.ones((10, 2), dtype=np.float32))
    assert fake.calls == [4, 4, 2]
    np.testing.assert_array_equal(out["y"][:, 0], [2.0] * 10)

    fixed = FakeSession()
    s2 = ModelSession(fixed, name="f", input_name="x", output_names=["y"], max_batch=16, fixed_batch=4)
    out2 = s2.run(np.ones((5, 2), dtype=np.float32))
    assert fixed.calls == [4, 4]  # the last chunk is padded to the fixed batch and trimmed
    assert out2["y"].shape == (5, 1)


def test_run_errors_are_typed(cam_session):
    with pytest.raises(InferenceError, match="model cam: run failed on a batch of shape \\(1, 3, 16, 16\\)"):
        cam_session.run(np.zeros((1, 3, 16, 16), dtype=np.float32))
    with pytest.raises(InferenceError, match="empty batch"):
        cam_session.run(np.zeros((0, 3, 32, 32), dtype=np.float32))


def test_thread_safety(cam_session):
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=(int(n), 3, 32, 32)).astype(np.float32) for n in rng.integers(1, 6, size=16)]

    def work(x):
        return cam_session.run(x)["logits"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, inputs))
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got, cam_model_reference(x)[0], rtol=1e-4, atol=1e-5)


def test_create_session_from_registry_warms_up(make_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="node.inference.runtime")
    model = load_model(make_model_dir())
    s = create_session(model, RuntimeConfig(providers=GPU_FIRST, intra_op_threads=1, max_batch=2))
    assert s.output_names == ("logits", "cam")
    assert "warmed up with a batch of (1, 3, 32, 32)" in caplog.text
    assert s.run(np.zeros((3, 3, 32, 32), dtype=np.float32))["cam"].shape == (3, 2, 8, 8)
