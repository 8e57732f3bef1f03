"""ONNX Runtime sessions: one per model, created once, warmed up, safe to share between worker threads.

Execution providers come from configuration in order of preference; unavailable ones are dropped.
The onnxruntime-gpu wheel lists CUDA/TensorRT as available even on a machine without a GPU (or
without the CUDA libraries); ONNX Runtime then silently falls back, so the provider that is really
active is read from ``session.get_providers()`` after creation and logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnxruntime as ort

from node.errors import InferenceError
from node.inference.registry import LoadedModel

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class RuntimeConfig:
    """How sessions are created (part of the node's settings, passed down)."""

    providers: tuple[str, ...] = (CPU,)
    provider_options: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    intra_op_threads: int = 0  # 0: ONNX Runtime's default
    inter_op_threads: int = 0
    max_batch: int = 16
    warmup: bool = True
    io_binding: bool = True  # used only when CUDA is the active provider
    device_id: int = 0
    log_severity: int = 3  # ORT's own log: 0 verbose .. 4 fatal
    # ONNX Runtime's intra-op threads busy-wait for the next run by default: beside the node's
    # preparation processes (which run while the model does) that spinning takes their cores
    spin: bool = False


_CUDA_LIBRARIES = ("libcuda.so.1", "libcudart.so.13", "libcublasLt.so.13", "libcudnn.so.9")
_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@functools.cache
def missing_cuda_library() -> str | None:
    """The first CUDA library (driver, runtime, cuBLAS, cuDNN) that cannot be loaded, or None.

    onnxruntime-gpu lists its CUDA provider as available even on a machine without a GPU; asking
    for it there only prints loader errors before falling back. Checking first keeps logs clean."""
    if sys.platform != "linux":
        return None
    for attempt in range(2):
        missing = None
        for lib in _CUDA_LIBRARIES:
            try:
                ctypes.CDLL(lib)
            except OSError:
                missing = lib
                break
        if missing is None or attempt == 1 or not hasattr(ort, "preload_dlls"):
            return missing
        quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())
        with quiet[0], quiet[1], contextlib.suppress(Exception):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip packages, when installed
    return missing


def select_providers(requested: Sequence[str], available: Sequence[str] | None = None) -> list[str]:
    """Requested providers that this onnxruntime build offers (and, for GPU providers, that this
    machine can load), in order; CPU is always last."""
    unusable: set[str] = set()
    if available is None:
        available = list(ort.get_available_providers())
        if any(p in _GPU_PROVIDERS for p in requested) and (lib := missing_cuda_library()):
            log.info("no usable GPU here (%s cannot be loaded): running on the CPU provider", lib)
            unusable = {p for p in available if p in _GPU_PROVIDERS}
            available = [p for p in available if p not in unusable]
    available = list(available)
    chosen = []
    for p in requested:
        if p in available and p not in chosen:
            chosen.append(p)
        elif p not in available and p not in unusable:
            log.warning("execution provider %s is not available in this onnxruntime build; skipped", p)
    if CPU not in chosen:
        chosen.append(CPU)
    else:  # CPU must stay the final fallback
        chosen.remove(CPU)
        chosen.append(CPU)
    return chosen


class ModelSession:
    """A created, warmed-up ONNX Runtime session for one model.

    ``run`` may be called from several threads at once: ONNX Runtime's ``InferenceSession.run``
    is thread-safe, and this class keeps no mutable state (an IO binding is made per call).
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        name: str,
        input_name: str,
        output_names: Sequence[str],
        max_batch: int,
        input_dtype: str = "float32",
        fixed_batch: int | None = None,
        io_binding: bool = True,
        device_id: int = 0,
    ) -> None:
        if max_batch < 1:
            raise InferenceError(f"model {name}: max_batch must be >= 1 (found {max_batch})")
        self._session = session
        self.name = name
        self.input_name = input_name
        self.output_names: tuple[str, ...] = tuple(output_names)
        self.input_dtype = np.dtype(input_dtype)
        self.fixed_batch = fixed_batch
        self.max_batch = fixed_batch if fixed_batch is not None else max_batch
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self.active_provider = self.providers[0]
        self.uses_io_binding = io_binding and self.active_provider == CUDA
        self._device_id = device_id

    def run(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run a batch (N, ...) in chunks of at most ``max_batch``; outputs concatenated along N."""
        names = tuple(outputs) if outputs is not None else self.output_names
        x = np.ascontiguousarray(batch, dtype=self.input_dtype)
        if x.ndim < 1 or x.shape[0] == 0:
            raise InferenceError(f"model {self.name}: empty batch (shape {x.shape})")
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, x.shape[0], self.max_batch):
            chunk = x[start : start + self.max_batch]
            n = chunk.shape[0]
            if self.fixed_batch is not None and n < self.fixed_batch:
                pad = np.zeros((self.fixed_batch - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            result = self._run_chunk(chunk, names)
            for name, value in zip(names, result, strict=True):
                parts[name].append(np.asarray(value)[:n])
        return {name: np.concatenate(vals) for name, vals in parts.items()}

    def _run_chunk(self, chunk: np.ndarray, names: tuple[str, ...]) -> list[np.ndarray]:
        try:
            if self.uses_io_binding:
                binding = self._session.io_binding()
                binding.bind_cpu_input(self.input_name, chunk)
                for name in names:
                    binding.bind_output(name, "cuda", self._device_id)
                self._session.run_with_iobinding(binding)
                return list(binding.copy_outputs_to_cpu())
            return list(self._session.run(list(names), {self.input_name: chunk}))
        except Exception as exc:  # onnxruntime raises its own exception types: re-raise typed
            raise InferenceError(
                f"model {self.name}: run failed on a batch of shape {chunk.shape} "
                f"({self.active_provider}): {exc}"
            ) from exc

    def warmup(self, shape: Sequence[int]) -> None:
        """Run one zero batch of ``shape`` (allocates arenas, builds TensorRT engines)."""
        self.run(np.zeros(tuple(shape), dtype=self.input_dtype))
        log.info("model %s warmed up with a batch of %s on %s", self.name, tuple(shape), self.active_provider)


def _session_options(config: RuntimeConfig) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(0, config.intra_op_threads)
    opts.inter_op_num_threads = max(0, config.inter_op_threads)
    opts.log_severity_level = config.log_severity
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
    return opts


def open_session(
    model: str | Path | bytes, config: RuntimeConfig, name: str = "model"
) -> ort.InferenceSession:
    """Create an InferenceSession with the configured providers, falling back to CPU if creation fails."""
    providers = select_providers(config.providers)
    options = [dict(config.provider_options.get(p, {})) for p in providers]
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(
            source, sess_options=_session_options(config), providers=providers, provider_options=options
        )
    except Exception as exc:  # onnxruntime raises its own exception types: re-raise typed
        if providers == [CPU]:
            raise InferenceError(f"model {name}: ONNX Runtime cannot create a session: {exc}") from exc
        log.warning("model %s: session with %s failed (%s); retrying on CPU", name, providers, exc)
        try:
            session = ort.InferenceSession(source, sess_options=_session_options(config), providers=[CPU])
        except Exception as exc2:  # see above
            raise InferenceError(f"model {name}: ONNX Runtime cannot create a session: {exc2}") from exc2
    active = session.get_providers()
    if active[0] != providers[0]:
        log.warning("model %s: requested %s, active provider is %s (fallback)", name, providers[0], active[0])
    log.info("model %s: active execution provider %s (session providers %s)", name, active[0], active)
    return session


def create_session(model: LoadedModel, config: RuntimeConfig) -> ModelSession:
    """One warmed-up session for a registry model (all outputs the manifest names are fetched)."""
    manifest = model.manifest
    outputs = [manifest.outputs.probabilities]
    if manifest.outputs.cam is not None:
        outputs.append(manifest.outputs.cam)
    session = ModelSession(
        open_session(model.onnx_path, config, manifest.id),
        name=manifest.id,
        input_name=manifest.input.name,
        output_names=outputs,
        max_batch=config.max_batch,
        input_dtype=manifest.input.dtype,
        fixed_batch=model.fixed_batch,
        io_binding=config.io_binding,
        device_id=config.device_id,
    )
    if config.warmup:
        graph_in = next(i for i in model.inputs if i.name == manifest.input.name)
        dims = [
            m if isinstance(m, int) else g
            for m, g in zip(manifest.input.shape[1:], graph_in.shape[1:], strict=True)
        ]
        known = [d for d in dims if isinstance(d, int)]
        if len(known) == len(dims):
            session.warmup([model.fixed_batch or 1, *known])
        else:
            log.info("model %s: dynamic input dims %s; warm-up skipped", manifest.id, manifest.input.shape)
    return session


@functools.lru_cache(maxsize=1)
def gpu_description() -> str:
    """GPU name and memory from nvidia-smi (once per process); empty when there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    query = ["--query-gpu=name,memory.total", "--format=csv,noheader"]
    try:
        out = subprocess.run([smi, *query], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return "; ".join(line.strip() for line in out.stdout.splitlines() if line.strip())
