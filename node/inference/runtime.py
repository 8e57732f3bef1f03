"""ONNX Runtime sessions: one per model, created once, warmed up, safe to share between worker threads.

Execution providers come from configuration in order of preference; unavailable ones are dropped.
The onnxruntime-gpu wheel lists CUDA/TensorRT as available even on a machine without a GPU (or
without the CUDA libraries); ONNX Runtime then silently falls back, so the provider that is really
active is read from ``session.get_providers()`` after creation and logged.

Device inputs (issue 16, GPU end to end): ``ModelSession.run`` takes numpy arrays and device arrays
(anything with ``__cuda_array_interface__``, e.g. CuPy from node/inference/gpu_prepare.py). On the
CUDA provider a device array is bound in place through IO binding (no host copy); on the CPU
provider it is copied to the host (logged at debug, once per model). The binding code is one path
parametrised by the device ("cuda" or "cpu"), so ``RuntimeConfig.io_binding_on_cpu`` runs it on
the CPU provider too (the tests). A manifest's ``runtime`` section may allow a CUDA graph (replayed
from persistent device buffers) and FP16 (node/inference/fp16.py, kept after a parity check); each
applies only on CUDA, and every refusal is logged once per model with its reason.
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
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import numpy as np
import onnxruntime as ort

from node.errors import InferenceError
from node.inference import fp16
from node.inference.device_arrays import array_module, is_device_array, to_host
from node.inference.manifest import RuntimeSpec
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
    io_binding: bool = True  # used only when CUDA is the active provider (or io_binding_on_cpu)
    # bind inputs/outputs on the CPU provider too (bind_input on the host buffer): the CUDA
    # path's binding code exercised without a GPU (tests); no speed gain on the CPU
    io_binding_on_cpu: bool = False
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


#: what ModelSession.run needs of a device array's library (CuPy has them; PyTorch does not)
_ARRAY_FUNCTIONS = ("ascontiguousarray", "zeros", "concatenate")


def _sync_producer(x: Any) -> None:
    """Wait for the work that wrote device array ``x`` (its library's current stream): ONNX
    Runtime reads it on its own stream, which does not wait for the producer's."""
    cuda = getattr(array_module(x), "cuda", None)
    current = getattr(cuda, "get_current_stream", None)
    if callable(current):
        current().synchronize()


def _device_ptr(x: Any) -> int:
    return int(x.__cuda_array_interface__["data"][0])


@dataclass
class _PersistentIO:
    """A CUDA graph's fixed buffers: one input and the session's outputs, bound once."""

    shape: tuple[int, ...]
    input: ort.OrtValue
    outputs: list[ort.OrtValue]
    binding: Any  # ort.IOBinding


class ModelSession:
    """A created, warmed-up ONNX Runtime session for one model.

    ``run`` may be called from several threads at once: ONNX Runtime's ``InferenceSession.run``
    is thread-safe, and an IO binding is made per call. A CUDA-graph session (``persistent_io``)
    owns fixed input/output buffers: its runs take a lock.

    ``io_binding``: bind on the CUDA provider (host inputs copied by ONNX Runtime, outputs copied
    back); ``binding_on_cpu``: the same binding on the CPU provider. ``persistent_io``: one fixed
    input and output buffer per session (needs a fixed batch), each chunk copied into the input
    (device to device, or from the host) and the binding reused: what a CUDA graph requires; the
    session must have been created with ``enable_cuda_graph`` for a graph to be captured.
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
        binding_on_cpu: bool = False,
        persistent_io: bool = False,
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
        on_cuda = self.active_provider == CUDA
        #: where bound inputs and outputs live: "cuda" on the CUDA provider, else "cpu"
        self.binding_device = "cuda" if on_cuda else "cpu"
        self.uses_io_binding = io_binding and (on_cuda or binding_on_cpu)
        self.uses_persistent_io = persistent_io and self.uses_io_binding and fixed_batch is not None
        self._device_id = device_id
        self._lock = threading.Lock()
        self._persistent: _PersistentIO | None = None
        self._logged: set[str] = set()

    def _log_once(self, key: str, level: int, message: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, message, *args)

    def run(self, batch: Any, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run a batch (N, ...) in chunks of at most ``max_batch``; outputs concatenated along N.

        ``batch`` is a numpy array or a device array (``__cuda_array_interface__``); a device
        array stays on the device on the CUDA provider and is copied to the host on the CPU one.
        Outputs are numpy arrays."""
        names = tuple(outputs) if outputs is not None else self.output_names
        on_device = is_device_array(batch)
        if on_device and self.binding_device != "cuda":
            self._log_once(
                "host-copy",
                logging.DEBUG,
                "model %s: device input on the %s provider: copied to the host",
                self.name,
                self.active_provider,
            )
            batch, on_device = to_host(batch), False
        xp: ModuleType = np
        if on_device and not all(hasattr(array_module(batch), f) for f in _ARRAY_FUNCTIONS):
            self._log_once(
                "no-array-functions",
                logging.INFO,
                "model %s: device arrays of %s lack %s: copied to the host",
                self.name,
                array_module(batch).__name__,
                "/".join(_ARRAY_FUNCTIONS),
            )
            batch, on_device = to_host(batch), False
        if on_device:
            xp = array_module(batch)
            gpu = getattr(getattr(batch, "device", None), "id", None)
            if isinstance(gpu, int) and gpu != self._device_id:
                raise InferenceError(
                    f"model {self.name}: input on GPU {gpu}, the session runs on GPU {self._device_id}"
                )
        x = xp.ascontiguousarray(batch, dtype=self.input_dtype)
        if x.ndim < 1 or x.shape[0] == 0:
            raise InferenceError(f"model {self.name}: empty batch (shape {tuple(x.shape)})")
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, x.shape[0], self.max_batch):
            chunk = x[start : start + self.max_batch]
            n = chunk.shape[0]
            if self.fixed_batch is not None and n < self.fixed_batch:
                pad = xp.zeros((self.fixed_batch - n, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = xp.concatenate([chunk, pad])
            result = self._run_chunk(chunk, names, on_device)
            for name, value in zip(names, result, strict=True):
                parts[name].append(np.asarray(value)[:n])
        return {name: np.concatenate(vals) for name, vals in parts.items()}

    def _run_chunk(self, chunk: Any, names: tuple[str, ...], on_device: bool) -> list[np.ndarray]:
        try:
            if self.uses_persistent_io and set(names) <= set(self.output_names):
                return self._run_persistent(chunk, names, on_device)
            if self.uses_io_binding or on_device:
                return self._run_bound(chunk, names, on_device)
            return list(self._session.run(list(names), {self.input_name: chunk}))
        except InferenceError:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types: re-raise typed
            raise InferenceError(
                f"model {self.name}: run failed on a batch of shape {tuple(chunk.shape)} "
                f"({self.active_provider}): {exc}"
            ) from exc

    def _bind_input(self, binding: Any, chunk: Any, on_device: bool) -> None:
        """Bind a C-contiguous chunk of the input dtype without copying it (a host array on the
        CUDA provider: ONNX Runtime copies it to the device)."""
        shape = [int(d) for d in chunk.shape]
        if on_device:
            _sync_producer(chunk)
            binding.bind_input(
                self.input_name, "cuda", self._device_id, self.input_dtype.type, shape, _device_ptr(chunk)
            )
        elif self.binding_device == "cpu":
            binding.bind_input(self.input_name, "cpu", 0, self.input_dtype.type, shape, chunk.ctypes.data)
        else:
            binding.bind_cpu_input(self.input_name, chunk)

    def _no_graph_run(self) -> ort.RunOptions | None:
        """Run options that keep a run out of the CUDA graph (ONNX Runtime's ``gpu_graph_id`` -1)."""
        if not (self.uses_persistent_io and self.binding_device == "cuda"):
            return None
        options = ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", "-1")
        return options

    def _run_bound(self, chunk: Any, names: tuple[str, ...], on_device: bool) -> list[np.ndarray]:
        binding = self._session.io_binding()
        self._bind_input(binding, chunk, on_device)
        for name in names:
            binding.bind_output(name, self.binding_device, self._device_id)
        self._session.run_with_iobinding(binding, self._no_graph_run())
        return list(binding.copy_outputs_to_cpu())

    def _persistent_io(self, chunk: Any, on_device: bool) -> _PersistentIO:
        """The fixed buffers, made on the first run: output shapes from one run outside the graph."""
        shape = tuple(int(d) for d in chunk.shape)
        if self._persistent is not None:
            if self._persistent.shape != shape:
                raise InferenceError(
                    f"model {self.name}: a CUDA-graph session runs shape {self._persistent.shape} only "
                    f"(found {shape})"
                )
            return self._persistent
        probe = self._run_bound(chunk, self.output_names, on_device)
        device, dev_id = self.binding_device, self._device_id
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.input_dtype.type, device, dev_id)
        outs = [
            ort.OrtValue.ortvalue_from_shape_and_type(list(p.shape), p.dtype.type, device, dev_id)
            for p in probe
        ]
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(self.input_name, value)
        for name, out in zip(self.output_names, outs, strict=True):
            binding.bind_ortvalue_output(name, out)
        self._persistent = _PersistentIO(shape, value, outs, binding)
        return self._persistent

    def _copy_into(self, target: ort.OrtValue, chunk: Any, on_device: bool) -> None:
        """Copy a chunk into the fixed input: device to device with the array's own library, from
        the host with ``update_inplace``."""
        if on_device:
            runtime = getattr(getattr(array_module(chunk), "cuda", None), "runtime", None)
            memcpy = getattr(runtime, "memcpy", None)
            kind = getattr(runtime, "memcpyDeviceToDevice", None)
            if callable(memcpy) and kind is not None:
                _sync_producer(chunk)
                memcpy(target.data_ptr(), _device_ptr(chunk), int(chunk.nbytes), kind)
                return
            self._log_once(
                "d2d",
                logging.INFO,
                "model %s: no device-to-device copy in %s: CUDA-graph input copied through the host",
                self.name,
                type(chunk).__module__,
            )
            chunk = to_host(chunk)
        target.update_inplace(np.ascontiguousarray(chunk, dtype=self.input_dtype))

    def _run_persistent(self, chunk: Any, names: tuple[str, ...], on_device: bool) -> list[np.ndarray]:
        with self._lock:
            io = self._persistent_io(chunk, on_device)
            self._copy_into(io.input, chunk, on_device)
            self._session.run_with_iobinding(io.binding)
            values = dict(zip(self.output_names, io.binding.copy_outputs_to_cpu(), strict=True))
        return [values[name] for name in names]

    def warmup(self, shape: Sequence[int]) -> None:
        """Run one zero batch of ``shape`` (allocates arenas, builds TensorRT engines); a
        CUDA-graph session runs it three times so that the graph is captured here."""
        zeros = np.zeros(tuple(shape), dtype=self.input_dtype)
        for _ in range(3 if self.uses_persistent_io else 1):
            self.run(zeros)
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
    model: str | Path | bytes,
    config: RuntimeConfig,
    name: str = "model",
    *,
    extra_options: Mapping[str, Mapping[str, str]] | None = None,
    cpu_fallback: bool = True,
) -> ort.InferenceSession:
    """Create an InferenceSession with the configured providers, falling back to CPU if creation fails.

    ``extra_options`` are added to the configured provider options (e.g. ``enable_cuda_graph`` for
    CUDA); ``cpu_fallback=False`` raises InferenceError instead of retrying on the CPU provider."""
    providers = select_providers(config.providers)
    extra = extra_options or {}
    options = [{**config.provider_options.get(p, {}), **extra.get(p, {})} for p in providers]
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(
            source, sess_options=_session_options(config), providers=providers, provider_options=options
        )
    except Exception as exc:  # onnxruntime raises its own exception types: re-raise typed
        if providers == [CPU] or not cpu_fallback:
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


def _input_shape(model: LoadedModel) -> tuple[list[int] | None, list[int | str | None]]:
    """The model input's (C, H, W...) when every dim is known (manifest or graph), else None;
    and the dims as found (for the log)."""
    manifest = model.manifest
    graph_in = next(i for i in model.inputs if i.name == manifest.input.name)
    dims = [
        m if isinstance(m, int) else g
        for m, g in zip(manifest.input.shape[1:], graph_in.shape[1:], strict=True)
    ]
    known = [d for d in dims if isinstance(d, int)]
    return (known if len(known) == len(dims) else None), dims


def _model_session(
    session: ort.InferenceSession, model: LoadedModel, config: RuntimeConfig, *, persistent_io: bool = False
) -> ModelSession:
    manifest = model.manifest
    outputs = [manifest.outputs.probabilities]
    if manifest.outputs.cam is not None:
        outputs.append(manifest.outputs.cam)
    return ModelSession(
        session,
        name=manifest.id,
        input_name=manifest.input.name,
        output_names=outputs,
        max_batch=config.max_batch,
        input_dtype=manifest.input.dtype,
        fixed_batch=model.fixed_batch,
        io_binding=config.io_binding,
        device_id=config.device_id,
        binding_on_cpu=config.io_binding_on_cpu,
        persistent_io=persistent_io,
    )


def fp16_variant(
    model: LoadedModel, config: RuntimeConfig, reference: ModelSession, spec: RuntimeSpec
) -> bytes | None:
    """The FP16 model's bytes when it runs and matches ``reference`` (the FP32 session) within
    ``spec.fp16_tolerance`` on the fixed-seed check batch; else None, with a warning naming the
    reason (the difference, the conversion's or the session's error). Runs on whatever provider
    ``config`` gives (the node calls it on CUDA only; the tests on the CPU)."""
    manifest = model.manifest
    dims, found = _input_shape(model)
    if dims is None:
        log.warning(
            "model %s: FP16 refused, keeping FP32: input dims %s are not all known", manifest.id, found
        )
        return None
    batch = fp16.check_batch([model.fixed_batch or 1, *dims])
    try:
        data = fp16.convert_to_fp16(model.onnx_path)
        candidate = _model_session(
            open_session(data, config, manifest.id, cpu_fallback=False), model, replace(config, warmup=False)
        )
    except InferenceError as exc:
        log.warning("model %s: FP16 refused, keeping FP32: %s", manifest.id, exc)
        return None
    decision = fp16.decide_fp16(
        reference,
        candidate,
        batch,
        manifest.outputs.probabilities,
        activation=manifest.outputs.activation,
        tolerance=spec.fp16_tolerance,
    )
    if not decision.use:
        log.warning("model %s: FP16 refused, keeping FP32: %s", manifest.id, decision.reason)
        return None
    log.info("model %s: running FP16 (%s)", manifest.id, decision.reason)
    return data


def _cuda_graph_refusal(model: LoadedModel, config: RuntimeConfig) -> str | None:
    """Why the model cannot run in a CUDA graph (None: it can be tried)."""
    dims, found = _input_shape(model)
    if model.fixed_batch is None:
        return "the graph's batch dim is dynamic (a CUDA graph needs a fixed batch size)"
    if dims is None:
        return f"input dims {found} are not all fixed"
    if not config.io_binding:
        return "io_binding is off in the runtime settings"
    return None


#: largest difference of the probabilities between a CUDA-graph replay and the same model run
#: without the graph (same kernels; cuDNN may pick other algorithms in another session). A replay
#: that read stale buffers differs by far more
GRAPH_TOLERANCE = 1e-3


def verify_replay(
    session: ModelSession, reference: ModelSession, model: LoadedModel, tolerance: float
) -> str | None:
    """Why ``session`` (persistent buffers) cannot be trusted, or None: two zero batches (the
    buffers made, the CUDA graph captured), then the fixed-seed check batch, whose probabilities
    must match ``reference``'s within ``tolerance`` (a replay that read stale buffers would not)."""
    dims, found = _input_shape(model)
    if dims is None:
        return f"input dims {found} are not all fixed"
    shape = [model.fixed_batch or 1, *dims]
    manifest = model.manifest
    try:
        zeros = np.zeros(shape, dtype=session.input_dtype)
        session.run(zeros)
        session.run(zeros)
        batch = fp16.check_batch(shape, seed=1)
        diff = fp16.parity_difference(
            reference, session, batch, manifest.outputs.probabilities, manifest.outputs.activation
        )
    except InferenceError as exc:
        return f"the capture or replay failed ({exc})"
    if diff > tolerance:
        return f"its replay differs from the session without it by {diff:.3g} (> {tolerance:g})"
    return None


def _cuda_graph_session(
    model: LoadedModel, config: RuntimeConfig, source: str | bytes, reference: ModelSession, tolerance: float
) -> ModelSession | None:
    """A session of ``source`` created with ``enable_cuda_graph`` (persistent buffers), captured
    and checked against ``reference`` (:func:`verify_replay`); or None with a log saying why not
    (a dynamic shape, ONNX Runtime refusing the graph, a replay that differs)."""
    name = model.manifest.id
    if (refusal := _cuda_graph_refusal(model, config)) is not None:
        log.info("model %s: no CUDA graph: %s", name, refusal)
        return None
    options = {CUDA: {"enable_cuda_graph": "1"}}
    try:
        graph = open_session(source, config, name, extra_options=options, cpu_fallback=False)
    except InferenceError as exc:  # e.g. a node that ONNX Runtime places on the CPU
        log.info("model %s: no CUDA graph: %s", name, exc)
        return None
    if graph.get_providers()[0] != CUDA:
        log.info("model %s: no CUDA graph: the session fell back to %s", name, graph.get_providers()[0])
        return None
    session = _model_session(graph, model, config, persistent_io=True)
    if (problem := verify_replay(session, reference, model, tolerance)) is not None:
        log.warning("model %s: no CUDA graph: %s", name, problem)
        return None
    log.info("model %s: CUDA graph on (input shape fixed, replay checked)", name)
    return session


def create_session(model: LoadedModel, config: RuntimeConfig) -> ModelSession:
    """One warmed-up session for a registry model (all outputs the manifest names are fetched).

    With the manifest's ``runtime`` section, on the CUDA provider: FP16 when it passes the parity
    check (:func:`fp16_variant`), a CUDA graph when the input shape is fully static and ONNX
    Runtime accepts it. Each option that cannot apply is logged once, with the reason."""
    manifest = model.manifest
    spec = manifest.runtime or RuntimeSpec()
    session = _model_session(open_session(model.onnx_path, config, manifest.id), model, config)
    wanted = [name for name, on in (("fp16", spec.fp16), ("cuda_graph", spec.cuda_graph)) if on]
    if wanted and session.active_provider != CUDA:
        log.info(
            "model %s: runtime %s not used: they need the CUDA provider (active: %s)",
            manifest.id,
            ", ".join(wanted),
            session.active_provider,
        )
    elif wanted:
        data = fp16_variant(model, config, session, spec) if spec.fp16 else None
        source: str | bytes = str(model.onnx_path) if data is None else data
        graph = None
        if spec.cuda_graph:  # checked against FP32 (FP16's own tolerance when FP16 was kept)
            tolerance = GRAPH_TOLERANCE if data is None else spec.fp16_tolerance
            graph = _cuda_graph_session(model, config, source, session, tolerance)
        if graph is not None:
            session = graph
        elif data is not None:
            session = _model_session(open_session(data, config, manifest.id), model, config)
    if config.warmup:
        dims, _ = _input_shape(model)
        if dims is not None:
            session.warmup([model.fixed_batch or 1, *dims])
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
