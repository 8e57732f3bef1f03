"""FP16 variants of FP32 ONNX models, kept only when they agree with FP32 (issue 16, GPU end to end).

A model whose manifest allows it (``runtime.fp16: true``) is converted when its session is created
on the CUDA provider: :func:`convert_to_fp16` turns the FP32 graph's initializers and arithmetic into
float16 with onnxconverter-common (``keep_io_types=True``: the graph's inputs and outputs stay
float32, so preprocessing and postprocessing do not change), and :func:`decide_fp16` runs the FP32
and the FP16 sessions on one fixed-seed batch (:func:`check_batch`) and keeps FP16 only when the
largest absolute difference of the probabilities (after the manifest's activation) is at most the
manifest's ``runtime.fp16_tolerance``. Otherwise the node keeps FP32, with a warning that names the
difference.

onnxconverter-common is an optional dependency (the ``gpu`` extra); without it the conversion raises
:class:`Fp16Unavailable` and the node keeps FP32.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from node.errors import InferenceError
from node.inference.postprocess import sigmoid, softmax

log = logging.getLogger(__name__)

#: suffix of the renamed tensor behind a graph output that other nodes also read (see _isolate_outputs)
_INNER = "__pacs_node_fp16_inner"


class Fp16Unavailable(InferenceError):
    """The FP16 conversion cannot run here (onnx or onnxconverter-common not installed)."""


class RunsOutputs(Protocol):
    """What the parity check needs of a session (a ModelSession)."""

    def run(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The named outputs of ``batch``."""
        ...


@dataclass(frozen=True)
class Fp16Decision:
    """The outcome of the parity check: ``use`` FP16 or not, the measured ``difference`` (None
    when the FP16 session could not run) and a ``reason`` for the log."""

    use: bool
    difference: float | None
    reason: str


def _import(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Fp16Unavailable(
            f"FP16 conversion needs {module.split('.')[0]} (pip install 'pacs-node[gpu]'): {exc}"
        ) from exc


def _isolate_outputs(model: Any) -> Any:
    """Give every graph output that other nodes also read its own Identity node.

    With ``keep_io_types=True`` the converter casts a graph output back to float32 under the
    output's own name; a node that read that tensor then gets float32 beside float16 inputs and
    the graph is invalid ("Type parameter (T) of Optype (Add) bound to different types": the
    bundled models' CAM output feeds the pooled logits). Readers are moved to a renamed tensor and
    an Identity produces the output from it. The FP32 graph computes the same values."""
    helper = _import("onnx.helper")
    graph = model.graph
    outputs = {o.name for o in graph.output}
    read = {name for node in graph.node for name in node.input}
    for name in sorted(outputs & read):
        inner = name + _INNER
        for node in graph.node:
            for i, out in enumerate(node.output):
                if out == name:
                    node.output[i] = inner
            for i, inp in enumerate(node.input):
                if inp == name:
                    node.input[i] = inner
        graph.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}{_INNER}_identity"))
    return model


def convert_to_fp16(model: str | Path | bytes) -> bytes:
    """The serialized FP16 variant of the FP32 ONNX ``model`` (a path or its bytes); inputs and
    outputs stay float32. Raises :class:`Fp16Unavailable` without the converter, InferenceError
    when the conversion fails."""
    onnx = _import("onnx")
    float16 = _import("onnxconverter_common.float16")
    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        with warnings.catch_warnings(record=True) as caught:  # one warning per value it moves
            warnings.simplefilter("always")
            converted = float16.convert_float_to_float16(_isolate_outputs(proto), keep_io_types=True)
        data: bytes = converted.SerializeToString()
    except Exception as exc:  # onnx and the converter raise many types: re-raise typed
        raise InferenceError(f"FP16 conversion failed: {type(exc).__name__}: {exc}") from exc
    if caught:
        log.info(
            "FP16 conversion moved %d weight values into float16's range (clamped or truncated)", len(caught)
        )
    return data


def check_batch(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The deterministic float32 batch the parity check runs: standard normal values (a normalised
    image's range; the zero warm-up batch would hide most arithmetic) from ``seed``."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def _activated(raw: np.ndarray, activation: Literal["none", "sigmoid", "softmax"]) -> np.ndarray:
    if activation == "sigmoid":
        return sigmoid(raw)
    if activation == "softmax":  # the class axis: 1 for (N, K) and for (N, C, h, w) alike
        return softmax(raw, axis=1)
    return np.asarray(raw, dtype=np.float32)


def parity_difference(
    reference: RunsOutputs,
    candidate: RunsOutputs,
    batch: np.ndarray,
    output: str,
    activation: Literal["none", "sigmoid", "softmax"] = "none",
) -> float:
    """Largest absolute difference of ``output`` after ``activation`` between the two sessions on
    ``batch`` (inf when the shapes differ or the candidate gives NaN/inf)."""
    ref = _activated(reference.run(batch, [output])[output], activation)
    got = _activated(candidate.run(batch, [output])[output], activation)
    if ref.shape != got.shape or not np.isfinite(got).all():
        return float("inf")
    return float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)), initial=0.0))


def decide_fp16(
    reference: RunsOutputs,
    candidate: RunsOutputs,
    batch: np.ndarray,
    output: str,
    *,
    activation: Literal["none", "sigmoid", "softmax"] = "none",
    tolerance: float = 1e-2,
) -> Fp16Decision:
    """Whether the FP16 ``candidate`` may replace the FP32 ``reference``: its probabilities on
    ``batch`` within ``tolerance`` of FP32's. A candidate that fails to run is refused (with its
    error as the reason), never raised."""
    try:
        diff = parity_difference(reference, candidate, batch, output, activation)
    except InferenceError as exc:
        return Fp16Decision(False, None, f"the FP16 model does not run ({exc})")
    if diff <= tolerance:
        return Fp16Decision(True, diff, f"max |FP16 - FP32| of {output} = {diff:.3g} <= {tolerance:g}")
    return Fp16Decision(False, diff, f"max |FP16 - FP32| of {output} = {diff:.3g} > tolerance {tolerance:g}")
