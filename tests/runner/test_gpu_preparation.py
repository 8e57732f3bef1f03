"""Who prepares a job's frames (issue 16, item 3): a model that runs on CUDA gets the GPU
preparer (made once, its CPU side the node's preparation processes) where the GPU preparation is
usable and ``models.gpu_preparation`` is on; anything else, and every model on the CPU, keeps the
preparation processes. Per-pixel and volume models always prepare on the CPU side."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import numpy as np
import pytest

from node import runner as runner_module
from node.inference import gpu_probe
from node.inference.gpu_prepare import GpuPreparer
from node.inference.registry import load_registry
from node.inference.runtime import CPU, CUDA, RuntimeConfig, create_session
from node.runner.analyse import Stopwatch, analyse
from node.synth import generate_study
from tests.helpers import REPO

MODELS = {"directory": str(REPO / "models" / "onnx"), "providers": [CPU]}


def _session(provider: str) -> SimpleNamespace:
    return SimpleNamespace(active_provider=provider, max_batch=16)


def test_a_cpu_model_keeps_the_preparation_processes(make_node, monkeypatch) -> None:
    node = make_node(models=MODELS)

    def never(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("the GPU preparation was probed for a CPU model")

    monkeypatch.setattr(runner_module, "make_gpu_preparer", never)
    assert node.runner._preparer_for(_session(CPU)) is node.preparer


def test_a_cuda_model_without_cupy_keeps_them_and_the_reason_is_logged_once(make_node, caplog) -> None:
    node = make_node(models=MODELS)
    gpu_probe.gpu_preparation.cache_clear()
    caplog.set_level(logging.INFO, logger="node.inference.gpu_probe")
    for _ in range(3):
        assert node.runner._preparer_for(_session(CUDA)) is node.preparer
    found = gpu_probe.gpu_preparation(CUDA)
    assert not found.usable  # this machine has no GPU (the gpu-marked tests run where one is)
    reasons = [r.getMessage() for r in caplog.records if r.name == "node.inference.gpu_probe"]
    assert len(reasons) == 1 and found.reason in reasons[0], reasons


def test_a_cuda_model_gets_one_gpu_preparer_over_the_processes(make_node, monkeypatch) -> None:
    node = make_node(models=MODELS)
    made: list[GpuPreparer] = []

    def make(provider: str, cpu=None) -> GpuPreparer:  # noqa: ANN001 - the probe said usable
        made.append(GpuPreparer(xp=np, device_decode=False, cpu=cpu))
        return made[-1]

    monkeypatch.setattr(runner_module, "make_gpu_preparer", make)
    first = node.runner._preparer_for(_session(CUDA))
    assert isinstance(first, GpuPreparer) and first.cpu is node.preparer
    assert node.runner._preparer_for(_session(CUDA)) is first and len(made) == 1
    assert node.runner._preparer_for(_session(CPU)) is node.preparer


def test_the_setting_turns_it_off(make_node, monkeypatch) -> None:
    node = make_node(models={**MODELS, "gpu_preparation": False})
    monkeypatch.setattr(runner_module, "make_gpu_preparer", lambda *a, **k: pytest.fail("probed"))
    assert node.runner._preparer_for(_session(CUDA)) is node.preparer


class _Refusing(GpuPreparer):
    """A GPU preparer (NumPy) that fails any job handed to its device side."""

    def stream(self, *args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("a per-pixel model's frames reached the device side")


def test_per_pixel_models_prepare_on_the_cpu_side(tmp_path) -> None:
    model = load_registry(REPO / "models" / "onnx").models["ct-liver-seg"]
    session = create_session(model, RuntimeConfig())
    truth = generate_study("ct", tmp_path / "ct", seed=1, label=None, slices=6, write_masks=False)
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    assert len(files) == len(truth.instances)

    def run(preparer: GpuPreparer | None):  # noqa: ANN202
        watch = Stopwatch(deadline=time.monotonic() + 600)
        kwargs = {"level": "series", "uid_seed": "t", "watch": watch, "preparer": preparer}
        result, _ = analyse(model, session, files, **kwargs)
        return result

    ref = run(None)
    got = run(_Refusing(xp=np, device_decode=False, cpu=None))
    assert [f.label for f in got.findings] == [f.label for f in ref.findings]
    assert [f.probability for f in got.findings] == [f.probability for f in ref.findings]
