"""The model registry: loads ``<root>/<id>/manifest.yaml`` (root is usually ``models/onnx``) at start-up.

For each model: validate the manifest, check the ONNX file's sha256, open the graph and compare its
input/output names, ranks, dtypes and fixed non-batch dims with the manifest. A bad model is refused
with a ManifestError naming the model and the field; ``load_registry(strict=False)`` keeps the good
ones and reports the refused ones, ``strict=True`` refuses to start.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import onnxruntime as ort

from node.errors import ManifestError
from node.files import sha256_file
from node.inference.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.yaml"

#: ONNX Runtime type strings -> numpy dtype names.
ORT_DTYPES: Mapping[str, str] = MappingProxyType(
    {
        "tensor(float)": "float32",
        "tensor(float16)": "float16",
        "tensor(double)": "float64",
        "tensor(uint8)": "uint8",
        "tensor(int8)": "int8",
        "tensor(int32)": "int32",
        "tensor(int64)": "int64",
        "tensor(bool)": "bool",
    }
)
_FLOAT_OUTPUTS = ("float32", "float16", "float64")


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, shape (ints, symbolic names or None), numpy dtype name."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str


@dataclass(frozen=True)
class LoadedModel:
    """A model whose manifest and graph agree."""

    manifest: Manifest
    directory: Path
    onnx_path: Path
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @property
    def id(self) -> str:
        """The model id (also its folder name)."""
        return self.manifest.id

    @property
    def fixed_batch(self) -> int | None:
        """The graph's batch size when it is fixed (not dynamic), else None."""
        spec = next(i for i in self.inputs if i.name == self.manifest.input.name)
        b = spec.shape[0]
        return b if isinstance(b, int) and b > 0 else None


@dataclass(frozen=True)
class Registry:
    """The loaded models by id, and the refused ones (folder name -> reason)."""

    models: Mapping[str, LoadedModel] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)

    def get(self, model_id: str) -> LoadedModel:
        """The loaded model ``model_id``; ManifestError when unknown or refused."""
        try:
            return self.models[model_id]
        except KeyError:
            reason = self.refused.get(model_id)
            if reason:
                raise ManifestError(f"model {model_id!r} was refused at start-up: {reason}") from None
            raise ManifestError(f"no model {model_id!r} (loaded: {sorted(self.models)})") from None


def graph_signature(onnx_path: Path) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Inputs and outputs of an ONNX graph, read through a CPU ONNX Runtime session (no optimisation)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types: re-raise typed
        raise ManifestError(f"{onnx_path}: ONNX Runtime cannot open the model: {exc}") from exc

    def info(args: Sequence[ort.NodeArg]) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(a.name, tuple(a.shape), ORT_DTYPES.get(a.type, a.type)) for a in args)

    return info(sess.get_inputs()), info(sess.get_outputs())


def _dims_text(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + "]"


def check_signature(
    manifest: Manifest, inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]
) -> list[tuple[str, str]]:
    """Compare the graph's inputs/outputs with the manifest; return (field, problem) pairs."""
    problems: list[tuple[str, str]] = []
    spec = manifest.input
    by_name = {i.name: i for i in inputs}
    graph_in = by_name.get(spec.name)
    if graph_in is None:
        problems.append(
            ("input.name", f"{spec.name!r} is not an input of the graph (inputs: {sorted(by_name)})")
        )
    else:
        others = [i.name for i in inputs if i.name != spec.name]
        if others:
            problems.append(("input.name", f"the graph has other inputs the node cannot feed: {others}"))
        if len(graph_in.shape) != len(spec.shape):
            problems.append(
                (
                    "input.shape",
                    f"rank {len(spec.shape)} in the manifest, {len(graph_in.shape)} in the graph "
                    f"{_dims_text(graph_in.shape)}",
                )
            )
        else:
            for axis, (m, g) in enumerate(zip(spec.shape, graph_in.shape, strict=True)):
                if axis > 0 and isinstance(m, int) and isinstance(g, int) and m != g:
                    problems.append(
                        (
                            f"input.shape.{axis}",
                            f"{m} in the manifest, {g} in the graph {_dims_text(graph_in.shape)}",
                        )
                    )
        if graph_in.dtype != spec.dtype:
            problems.append(("input.dtype", f"{spec.dtype} in the manifest, {graph_in.dtype} in the graph"))

    outs = {o.name: o for o in outputs}
    n = manifest.n_outputs
    probs = outs.get(manifest.outputs.probabilities)
    if probs is None:
        problems.append(
            (
                "outputs.probabilities",
                f"{manifest.outputs.probabilities!r} is not an output of the graph (outputs: {sorted(outs)})",
            )
        )
    elif manifest.kind == "segmentation":
        rank, axes = (5, "d, h, w") if manifest.input.is_volume else (4, "h, w")
        if len(probs.shape) != rank:
            problems.append(
                (
                    "outputs.probabilities",
                    f"a segmentation model's output is per pixel: expected rank {rank} (batch, classes, "
                    f"{axes}), the graph has {_dims_text(probs.shape)}",
                )
            )
        elif isinstance(probs.shape[1], int) and probs.shape[1] < n:
            problems.append(("labels", f"label indices need {n} channels; the graph has {probs.shape[1]}"))
        if probs.dtype not in _FLOAT_OUTPUTS:
            problems.append(("outputs.probabilities", f"dtype {probs.dtype} is not floating point"))
    else:
        if len(probs.shape) != 2:
            problems.append(
                (
                    "outputs.probabilities",
                    f"expected rank 2 (batch, labels), the graph has {_dims_text(probs.shape)}",
                )
            )
        elif isinstance(probs.shape[1], int):
            width = probs.shape[1]
            if width < n:
                problems.append(("labels", f"label indices need {n} outputs; the graph has {width}"))
            elif manifest.kind == "multi_class" and width != len(manifest.labels):
                problems.append(
                    (
                        "labels",
                        f"a multi_class model needs one label per class ({width}); "
                        f"found {len(manifest.labels)}",
                    )
                )
        if probs.dtype not in _FLOAT_OUTPUTS:
            problems.append(("outputs.probabilities", f"dtype {probs.dtype} is not floating point"))
    cam_name = manifest.outputs.cam
    if cam_name is not None:
        cam = outs.get(cam_name)
        if cam is None:
            problems.append(
                ("outputs.cam", f"{cam_name!r} is not an output of the graph (outputs: {sorted(outs)})")
            )
        else:
            if len(cam.shape) != 4:
                problems.append(
                    (
                        "outputs.cam",
                        f"expected rank 4 (batch, labels, h, w), the graph has {_dims_text(cam.shape)}",
                    )
                )
            elif isinstance(cam.shape[1], int) and cam.shape[1] < n:
                problems.append(("outputs.cam", f"label indices need {n} maps; the graph has {cam.shape[1]}"))
            if cam.dtype not in _FLOAT_OUTPUTS:
                problems.append(("outputs.cam", f"dtype {cam.dtype} is not floating point"))
    return problems


def load_model(model_dir: str | Path) -> LoadedModel:
    """Validate one model folder (manifest, sha256, graph); ManifestError naming the model and field."""
    model_dir = Path(model_dir)
    manifest_path = model_dir / MANIFEST_NAME
    where = f"model {model_dir.name!r} ({manifest_path})"
    if not manifest_path.is_file():
        raise ManifestError(f"{where}: {MANIFEST_NAME} is missing")
    manifest = load_manifest(manifest_path)
    if manifest.id != model_dir.name:
        raise ManifestError(f"{where}: id: {manifest.id!r} does not match the folder name {model_dir.name!r}")
    onnx_path = model_dir / manifest.model.file
    if not onnx_path.is_file():
        raise ManifestError(f"{where}: model.file: {manifest.model.file} does not exist")
    digest = sha256_file(onnx_path)
    if digest != manifest.model.sha256:
        raise ManifestError(
            f"{where}: model.sha256: does not match {manifest.model.file} "
            f"(manifest {manifest.model.sha256[:12]}..., file {digest[:12]}...)"
        )
    inputs, outputs = graph_signature(onnx_path)
    problems = check_signature(manifest, inputs, outputs)
    if problems:
        raise ManifestError("\n".join(f"{where}: {f}: {p}" for f, p in problems))
    log.info("model %s %s loaded from %s", manifest.id, manifest.version, onnx_path)
    return LoadedModel(manifest, model_dir, onnx_path, inputs, outputs)


def load_registry(root: str | Path, *, strict: bool = False) -> Registry:
    """Load every ``<root>/<id>/manifest.yaml``.

    ``strict=False``: refused models are logged and listed in ``Registry.refused``; the good ones load.
    ``strict=True``: any refusal raises one ManifestError listing every problem.
    """
    root = Path(root)
    if not root.is_dir():
        msg = f"model directory {root} does not exist"
        if strict:
            raise ManifestError(msg)
        log.warning("%s; no models loaded", msg)
        return Registry()
    models: dict[str, LoadedModel] = {}
    refused: dict[str, str] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        try:
            loaded = load_model(model_dir)
        except ManifestError as exc:
            refused[model_dir.name] = str(exc)
            log.error("refused model %s: %s", model_dir.name, exc)
            continue
        models[loaded.id] = loaded
    if strict and refused:
        raise ManifestError("\n".join(refused.values()))
    log.info("registry: %d model(s) loaded, %d refused", len(models), len(refused))
    return Registry(MappingProxyType(models), MappingProxyType(refused))
