"""FP16 variants (node/inference/fp16.py, issue 16): the conversion keeps float32 inputs and outputs
and makes the weights float16; ONNX Runtime's CPU provider runs the converted bundled models and a
BatchNorm/Dropout CNN within the default tolerance of FP32, so the parity check runs here; a model
whose weights overflow float16 is refused with a warning naming the difference; a missing converter
or a candidate that fails to run keeps FP32. The manifest's ``runtime`` section is strict. On a GPU:
the ``gpu``-marked test (CUDA session with ``runtime.fp16``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from node.errors import InferenceError, ManifestError
from node.inference import fp16
from node.inference.manifest import RuntimeSpec, parse_manifest
from node.inference.registry import load_model, load_registry
from node.inference.runtime import (
    CPU,
    CUDA,
    ModelSession,
    RuntimeConfig,
    create_session,
    fp16_variant,
    open_session,
)
from tests.inference.conftest import example_manifest_dict

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxconverter_common")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG = RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1, warmup=False)
BUNDLED = [
    "cxr",
    "ct-liver",
    "ct-liver-seg",
    "derm-lesion",
    "fundus-dr",
    "mammo",
    "mr-brain",
    "smear-malaria",
]


@pytest.fixture(scope="module")
def registry():  # noqa: ANN201
    return load_registry(REPO / "models" / "onnx")


def _float_kinds(data: bytes) -> tuple[set[int], set[int], list[int]]:
    model = onnx.load_from_string(data)
    io = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
    inits = {i.data_type for i in model.graph.initializer if i.data_type in floats}
    return io, inits, [i.data_type for i in model.graph.initializer]


@pytest.mark.parametrize("model_id", BUNDLED)
def test_bundled_model_converts_keeps_float32_io_and_passes_parity_on_cpu(registry, model_id, caplog) -> None:  # noqa: ANN001
    model = registry.get(model_id)
    data = fp16.convert_to_fp16(model.onnx_path)
    io, inits, _ = _float_kinds(data)
    assert io == {TensorProto.FLOAT}
    assert inits == {TensorProto.FLOAT16}
    reference = create_session(model, CONFIG)
    with caplog.at_level(logging.INFO, logger="node.inference.runtime"):
        chosen = fp16_variant(model, CONFIG, reference, RuntimeSpec(fp16=True))
    assert chosen is not None, [r.getMessage() for r in caplog.records]
    kept = [r.getMessage() for r in caplog.records if "running FP16" in r.getMessage()]
    assert len(kept) == 1 and "<= 0.01" in kept[0]
    # the converted model's outputs: float32, shapes as FP32's, probabilities within the tolerance
    candidate = ModelSession(
        open_session(chosen, CONFIG, model_id),
        name=model_id,
        input_name=model.manifest.input.name,
        output_names=reference.output_names,
        max_batch=4,
    )
    x = fp16.check_batch((2, *reference_dims(model)), seed=3)
    got, want = candidate.run(x), reference.run(x)
    for name in want:
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
    diff = fp16.parity_difference(
        reference, candidate, x, model.manifest.outputs.probabilities, model.manifest.outputs.activation
    )
    assert 0 < diff <= 1e-2  # not bit-identical: it did run in float16


def reference_dims(model) -> list[int]:  # noqa: ANN001
    graph_in = next(i for i in model.inputs if i.name == model.manifest.input.name)
    return [
        m if isinstance(m, int) else g
        for m, g in zip(model.manifest.input.shape[1:], graph_in.shape[1:], strict=True)
    ]


def test_cam_output_read_by_the_graph_gets_its_own_identity(registry) -> None:  # noqa: ANN001
    """The bundled cxr graph reads its own 'cam' output (the pooled logits); converted naively
    (no isolation) the graph is invalid on ONNX Runtime; with it the converter's output casts
    are the only producers of the graph outputs."""
    import onnxruntime as ort
    from onnxconverter_common import float16

    model = registry.get("cxr")
    naive = float16.convert_float_to_float16(onnx.load(str(model.onnx_path)), keep_io_types=True)
    with pytest.raises(Exception, match="bound to different types"):
        ort.InferenceSession(naive.SerializeToString(), providers=[CPU])
    converted = onnx.load_from_string(fp16.convert_to_fp16(model.onnx_path))
    outputs = {o.name for o in converted.graph.output}
    read = {i for n in converted.graph.node for i in n.input}
    assert not outputs & read


# ------------------------------------------------------------------------------------------------
# A BatchNorm/Dropout CNN and a model whose weights overflow float16


def _cnn(path: Path) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(16)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 2),
    ).eval()  # fmt: skip
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    torch.onnx.export(
        net, (torch.zeros(1, 1, 32, 32),), str(path), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, dynamo=False,
    )  # fmt: skip


def _session(source: Path | bytes) -> ModelSession:
    return ModelSession(
        open_session(source, CONFIG, "t"), name="t", input_name="image", output_names=["logits"], max_batch=8
    )


def test_bn_dropout_cnn_fp16_parity_on_cpu(tmp_path: Path) -> None:
    path = tmp_path / "cnn.onnx"
    _cnn(path)
    reference, candidate = _session(path), _session(fp16.convert_to_fp16(path))
    batch = fp16.check_batch((4, 1, 32, 32))
    decision = fp16.decide_fp16(reference, candidate, batch, "logits", activation="softmax", tolerance=1e-2)
    assert decision.use and decision.difference is not None and 0 < decision.difference <= 1e-2
    strict = fp16.decide_fp16(reference, candidate, batch, "logits", activation="softmax", tolerance=1e-9)
    assert not strict.use and "> tolerance" in strict.reason


def _overflow_model() -> bytes:
    """(N, 3, 32, 32) -> channel means -> x @ W * 1e-6 with W = 1e6: float16 clamps W to 65504."""
    w = numpy_helper.from_array(np.full((3, 2), 1e6, dtype=np.float32), "w")
    scale = numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "scale")
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["h"]),
        helper.make_node("Mul", ["h", "scale"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "overflow",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        initializer=[w, scale, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _no_cam(data: dict) -> None:
    data["outputs"].pop("cam")
    data["heatmap"] = {"method": "none"}
    data["outputs"]["activation"] = "none"
    data["runtime"] = {"fp16": True, "fp16_tolerance": 0.05}


def test_overflowing_weights_fail_parity_and_keep_fp32_with_the_difference(make_model_dir, caplog) -> None:  # noqa: ANN001
    model = load_model(make_model_dir("overflow", onnx_bytes=_overflow_model(), edit=_no_cam))
    reference = create_session(model, CONFIG)
    with caplog.at_level(logging.INFO, logger="node.inference"):
        chosen = fp16_variant(model, CONFIG, reference, model.manifest.runtime)
    assert chosen is None
    refusals = [r for r in caplog.records if "FP16 refused" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    message = refusals[0].getMessage()
    assert "> tolerance 0.05" in message and "max |FP16 - FP32| of logits" in message
    assert any("clamped" in r.getMessage() for r in caplog.records)  # the converter's range warning
    # the FP32 answer is what the node keeps: x @ W * 1e-6 = 3 * mean(x)
    x = np.ones((1, 3, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(reference.run(x)["logits"], [[3.0, 3.0]], rtol=1e-5)
    assert abs(_session(fp16.convert_to_fp16(model.onnx_path)).run(x)["logits"][0, 0] - 3.0) > 2


def test_missing_converter_keeps_fp32_with_a_warning(registry, monkeypatch, caplog) -> None:  # noqa: ANN001
    monkeypatch.setitem(sys.modules, "onnxconverter_common.float16", None)  # import raises ImportError
    model = registry.get("cxr")
    with pytest.raises(fp16.Fp16Unavailable, match="pacs-node\\[gpu\\]"):
        fp16.convert_to_fp16(model.onnx_path)
    with caplog.at_level(logging.WARNING, logger="node.inference.runtime"):
        assert fp16_variant(model, CONFIG, create_session(model, CONFIG), RuntimeSpec(fp16=True)) is None
    assert any("FP16 refused, keeping FP32" in r.getMessage() for r in caplog.records)


def test_a_candidate_that_cannot_run_is_refused_not_raised() -> None:
    class Fails:
        def run(self, batch, outputs=None):  # noqa: ANN001, ANN201
            raise InferenceError("model t: run failed (no float16 kernel)")

    class Constant:
        def run(self, batch, outputs=None):  # noqa: ANN001, ANN201
            return {"logits": np.zeros((len(batch), 2), dtype=np.float32)}

    decision = fp16.decide_fp16(Constant(), Fails(), np.zeros((1, 3)), "logits")
    assert not decision.use and decision.difference is None and "no float16 kernel" in decision.reason


def test_nan_from_the_candidate_is_never_within_tolerance() -> None:
    class Value:
        def __init__(self, v: float) -> None:
            self.v = v

        def run(self, batch, outputs=None):  # noqa: ANN001, ANN201
            return {"logits": np.full((len(batch), 2), self.v, dtype=np.float32)}

    assert fp16.parity_difference(Value(0.0), Value(float("nan")), np.zeros((2, 3)), "logits") == float("inf")
    assert not fp16.decide_fp16(Value(0.0), Value(float("nan")), np.zeros((2, 3)), "logits", tolerance=1).use


def test_check_batch_is_deterministic_and_not_zero() -> None:
    a, b = fp16.check_batch((2, 1, 8, 8)), fp16.check_batch((2, 1, 8, 8))
    assert a.dtype == np.float32 and np.array_equal(a, b) and np.abs(a).min() > 0
    assert not np.array_equal(a, fp16.check_batch((2, 1, 8, 8), seed=1))


# ------------------------------------------------------------------------------------------------
# The manifest's runtime section


def test_runtime_section_absent_is_none_and_defaults_are_off() -> None:
    assert parse_manifest(example_manifest_dict()).runtime is None
    data = example_manifest_dict()
    data["runtime"] = {}
    spec = parse_manifest(data).runtime
    assert spec == RuntimeSpec() and not spec.cuda_graph and not spec.fp16 and spec.fp16_tolerance == 1e-2


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"cuda_graphs": True}, "runtime.cuda_graphs"),
        ({"fp16": "yes"}, "runtime.fp16"),
        ({"fp16_tolerance": 0}, "runtime.fp16_tolerance"),
        ({"fp16_tolerance": 2}, "runtime.fp16_tolerance"),
    ],
)
def test_runtime_section_is_strict(section: dict, field: str) -> None:
    data = example_manifest_dict()
    data["runtime"] = section
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        parse_manifest(data)


# ------------------------------------------------------------------------------------------------
# On a GPU (skipped without one)


@pytest.mark.gpu
@pytest.mark.parametrize("model_id", ["cxr", "ct-liver-seg", "mammo"])
def test_gpu_fp16_session_within_tolerance_of_fp32(tmp_path: Path, registry, model_id, caplog) -> None:  # noqa: ANN001
    import shutil

    import yaml

    src = registry.get(model_id).onnx_path.parent
    folder = tmp_path / model_id
    shutil.copytree(src, folder)
    data = yaml.safe_load((folder / "manifest.yaml").read_text())
    data["runtime"] = {"fp16": True}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    model, plain_model = load_model(folder), registry.get(model_id)
    config = RuntimeConfig(providers=(CUDA, CPU))
    plain = create_session(plain_model, config)
    if plain.active_provider != CUDA:
        pytest.skip(f"CUDA provider not active here ({plain.active_provider})")
    with caplog.at_level(logging.INFO, logger="node.inference.runtime"):
        half = create_session(model, config)
    assert any("running FP16" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    x = fp16.check_batch((3, *reference_dims(model)), seed=5)
    output = model.manifest.outputs.probabilities
    assert fp16.parity_difference(plain, half, x, output, model.manifest.outputs.activation) <= 1e-2
