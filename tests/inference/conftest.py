"""Fixtures for the inference tests: tiny ONNX models built with onnx.helper, manifests, model folders."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from node.types import ImageHeader

DATA = Path(__file__).parent / "data"

#: 1x1 conv weights of the CAM model: label 0 looks at channel 0, label 1 at channel 1 (minus channel 2).
CAM_WEIGHTS = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]], dtype=np.float32)


def make_cam_model(
    size: int = 32,
    pool: int = 4,
    channels: int = 3,
    input_name: str = "image",
    input_shape: list | None = None,
) -> bytes:
    """x (N, 3, size, size) -> AveragePool(pool) -> 1x1 conv (2 labels) = cam (N, 2, size/pool, size/pool)
    -> GlobalAveragePool -> Flatten = logits (N, 2). A global-average-pool + linear head."""
    shape = input_shape or ["N", channels, size, size]
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])
    cam = helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 2, size // pool, size // pool])
    w = numpy_helper.from_array(CAM_WEIGHTS[:, :channels].reshape(2, channels, 1, 1), "w")
    nodes = [
        helper.make_node(
            "AveragePool", [input_name], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]
        ),
        helper.make_node("Conv", ["pooled", "w"], ["cam"]),
        helper.make_node("GlobalAveragePool", ["cam"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(nodes, "cam_model", [x], [logits, cam], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cam_model_reference(x: np.ndarray, pool: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference for make_cam_model: (logits, cam)."""
    n, c, h, w = x.shape
    pooled = x.reshape(n, c, h // pool, pool, w // pool, pool).mean(axis=(3, 5))
    cam = np.einsum("kc,nchw->nkhw", CAM_WEIGHTS[:, :c], pooled)
    return cam.mean(axis=(2, 3)), cam


def make_rank3_model(input_name: str = "image") -> bytes:
    """A model whose input has rank 3 (N, 32, 32): for the wrong-rank refusal."""
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 32])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", [input_name], ["logits"], axes=[2], keepdims=0)], "rank3", [x], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 9
    return model.SerializeToString()


EXAMPLE_MANIFEST_YAML = """\
manifest_version: 1
id: cxr-demo
name: Chest radiograph demo classifier
version: 0.1.0
description: Two findings on frontal chest radiographs (synthetic phantoms).
research_use_only: true
intended_use: Research only; not for diagnostic use. Frontal CR/DX chest images of adults.
provenance:
  training_script: training/cxr/train.py
  data: 20 000 synthetic chest phantoms (node.synth), 80/10/10 split
  seed: 1234
  created: 2026-11-01
  metrics: {auroc_nodule: 0.91, auroc_effusion: 0.88}
  framework: torch 2.13
model:
  file: model.onnx
  sha256: "0000000000000000000000000000000000000000000000000000000000000000"
input:
  name: image
  shape: [null, 3, 32, 32]
  dtype: float32
  layout: NCHW
preprocessing:
  - {op: modality_lut}
  - {op: window, source: header, fallback: minmax}
  - {op: invert_monochrome1}
  - {op: clahe, clip_limit: 2.0, tile_grid: [4, 4]}
  - {op: letterbox, size: [32, 32], pad_value: 0, interpolation: area}
  - {op: replicate_channels, channels: 3}
  - {op: normalize, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], max_pixel_value: 255}
outputs:
  probabilities: logits
  activation: sigmoid
  cam: cam
kind: multi_label
labels:
  - name: nodule
    index: 0
    code: {value: "27925004", scheme_designator: SCT, meaning: Nodule}
    threshold: 0.5
    triage: true
  - name: effusion
    index: 1
    code: {value: "60046008", scheme_designator: SCT, meaning: Pleural effusion}
    threshold: 0.6
    triage: false
heatmap: {method: cam, normalize: relu_max}
aggregation: {level: image, method: max, keep_top_slices: 1}
routing:
  modalities: [CR, DX]
  body_parts: [CHEST]
"""


def example_manifest_dict() -> dict:
    return yaml.safe_load(EXAMPLE_MANIFEST_YAML)


@pytest.fixture
def manifest_dict() -> dict:
    return example_manifest_dict()


@pytest.fixture
def cam_model_bytes() -> bytes:
    return make_cam_model()


@pytest.fixture
def make_model_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write ``<tmp>/onnx/<id>/{model.onnx, manifest.yaml}``; the sha256 is filled in unless given."""

    def make(
        model_id: str = "cxr-demo",
        onnx_bytes: bytes | None = None,
        edit: Callable[[dict], None] | None = None,
        sha256: str | None = None,
    ) -> Path:
        data = example_manifest_dict()
        data["id"] = model_id
        blob = onnx_bytes if onnx_bytes is not None else make_cam_model()
        folder = tmp_path / "onnx" / model_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.onnx").write_bytes(blob)
        data["model"]["sha256"] = sha256 or hashlib.sha256(blob).hexdigest()
        if edit is not None:
            edit(data)
        (folder / "manifest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        return folder

    return make


def make_header(**kw) -> ImageHeader:
    """A 12-bit unsigned MONOCHROME2 CT header; keyword arguments override fields."""
    base = dict(
        sop_instance_uid="1.2.3",
        series_instance_uid="1.2",
        study_instance_uid="1",
        sop_class_uid="1.2.840",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CT",
        rows=2,
        cols=2,
        number_of_frames=1,
        samples_per_pixel=1,
        photometric_interpretation="MONOCHROME2",
        stored_photometric_interpretation="MONOCHROME2",
        bits_allocated=16,
        bits_stored=12,
        pixel_representation=0,
    )
    base.update(kw)
    return ImageHeader(**base)
