"""Write a Triton model repository from the node's models (``pacs-node models export-triton OUT``).

For each loaded model ``<id>``::

    OUT/<id>/config.pbtxt    platform onnxruntime_onnx, max_batch_size, dynamic batching,
                             the manifest's input and the graph's outputs (names, data types, dims)
    OUT/<id>/1/model.onnx    the model file (verified against the manifest's sha256 by the registry)

``max_batch_size`` is the node's ``models.max_batch`` (or ``--max-batch``) for a graph with a
dynamic batch dimension, and 0 for a graph whose batch is fixed (its dims then include the batch).
Dims come from the manifest where it fixes them and from the graph otherwise; a dimension that
neither fixes is -1 (variable). The config is text protobuf (``inference.ModelConfig``).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from node.errors import ConfigError
from node.inference.registry import LoadedModel, TensorInfo

log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"
#: numpy dtype name -> Triton model-config data type.
DATA_TYPES = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}
InstanceKind = Literal["auto", "gpu", "cpu"]


@dataclass(frozen=True)
class ExportedModel:
    """One model written to the repository."""

    model_id: str
    config_path: Path
    onnx_path: Path
    max_batch_size: int


def _dims(values: Sequence[int | str | None]) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in values]


def _data_type(info: TensorInfo, model_id: str) -> str:
    try:
        return DATA_TYPES[info.dtype]
    except KeyError:
        raise ConfigError(
            f"model {model_id}: tensor {info.name!r} has dtype {info.dtype}, which Triton lacks"
        ) from None


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def model_config(
    model: LoadedModel,
    *,
    max_batch: int = 16,
    queue_delay_us: int = 1000,
    instance_kind: InstanceKind = "auto",
    instance_count: int = 1,
) -> str:
    """The ``config.pbtxt`` text for one model."""
    if max_batch < 1:
        raise ConfigError(f"max_batch must be >= 1 (found {max_batch})")
    manifest = model.manifest
    graph_in = next(i for i in model.inputs if i.name == manifest.input.name)
    fixed = model.fixed_batch is not None
    # manifest dims where it fixes them (it is checked against the graph), the graph's otherwise
    in_shape = [
        m if isinstance(m, int) else g for m, g in zip(manifest.input.shape, graph_in.shape, strict=True)
    ]
    if fixed:
        in_shape[0] = model.fixed_batch
    wanted = [manifest.outputs.probabilities] + ([manifest.outputs.cam] if manifest.outputs.cam else [])
    by_name = {o.name: o for o in model.outputs}
    outputs = [by_name[n] for n in wanted if n in by_name]
    lines = [
        f"name: {_quote(manifest.id)}",
        f"platform: {_quote(PLATFORM)}",
        f"max_batch_size: {0 if fixed else max_batch}",
        "input [",
        "  {",
        f"    name: {_quote(graph_in.name)}",
        f"    data_type: {_data_type(graph_in, manifest.id)}",
        f"    dims: [ {', '.join(str(d) for d in _dims(in_shape if fixed else in_shape[1:]))} ]",
        "  }",
        "]",
        "output [",
    ]
    for k, out in enumerate(outputs):
        shape = out.shape if fixed else out.shape[1:]
        lines += [
            "  {",
            f"    name: {_quote(out.name)}",
            f"    data_type: {_data_type(out, manifest.id)}",
            f"    dims: [ {', '.join(str(d) for d in _dims(shape))} ]",
            "  }" + ("," if k < len(outputs) - 1 else ""),
        ]
    lines.append("]")
    if not fixed:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {queue_delay_us}", "}"]
    if instance_kind != "auto":
        kind = "KIND_GPU" if instance_kind == "gpu" else "KIND_CPU"
        lines += ["instance_group [", "  {", f"    kind: {kind}", f"    count: {instance_count}", "  }", "]"]
    lines += [
        "parameters {",
        '  key: "pacs_node_model_version"',
        f"  value: {{ string_value: {_quote(manifest.version)} }}",
        "}",
        "parameters {",
        '  key: "pacs_node_model_sha256"',
        f"  value: {{ string_value: {_quote(manifest.model.sha256)} }}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def export_repository(
    models: Iterable[LoadedModel],
    out: Path,
    *,
    max_batch: int = 16,
    queue_delay_us: int = 1000,
    instance_kind: InstanceKind = "auto",
    instance_count: int = 1,
    overwrite: bool = False,
) -> list[ExportedModel]:
    """Write ``out/<id>/config.pbtxt`` and ``out/<id>/1/model.onnx`` for each model.

    A model folder that already exists is refused (ConfigError) unless ``overwrite``; then its
    config and version 1 are replaced and anything else in it is left alone."""
    exported = []
    out.mkdir(parents=True, exist_ok=True)
    for model in models:
        folder = out / model.id
        if folder.exists() and not overwrite:
            raise ConfigError(f"{folder} exists (use --overwrite to replace it)")
        text = model_config(
            model,
            max_batch=max_batch,
            queue_delay_us=queue_delay_us,
            instance_kind=instance_kind,
            instance_count=instance_count,
        )
        version = folder / "1"
        version.mkdir(parents=True, exist_ok=True)
        onnx_path = version / "model.onnx"
        tmp = onnx_path.with_suffix(".onnx.tmp")
        shutil.copyfile(model.onnx_path, tmp)
        tmp.replace(onnx_path)
        config_path = folder / "config.pbtxt"
        config_path.write_text(text)
        fixed = model.fixed_batch is not None
        exported.append(ExportedModel(model.id, config_path, onnx_path, 0 if fixed else max_batch))
        log.info("model %s exported to %s", model.id, folder)
    return exported
