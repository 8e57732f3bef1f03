"""Keras (.keras / .h5) -> ONNX through the torch backend: parity, CAM, node run, clear failures."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.helpers import need_module

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = need_module("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - depends on the environment
    pytest.skip("Keras is not on the torch backend", allow_module_level=True)

from converters.cli import convert_keras  # noqa: E402
from converters.common import ConversionError  # noqa: E402
from node.inference.registry import load_model  # noqa: E402
from node.inference.runtime import CPU, RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import Stopwatch, analyse  # noqa: E402
from node.synth import generate_study  # noqa: E402
from tests.byom.conftest import fill_manifest  # noqa: E402


@keras.saving.register_keras_serializable(package="byom_tests")
class Doubler(keras.layers.Layer):
    """A custom layer (registered here, unknown to a fresh process)."""

    def call(self, x):  # noqa: ANN001, ANN201
        return x * 2.0


def small_classifier(custom: bool = False, activation: str = "softmax") -> keras.Model:
    """Conv -> pool -> conv -> GAP -> Dense, NHWC 48x48x1, three classes."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((48, 48, 1), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    if custom:
        x = Doubler()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(3, activation=activation, name="head")(x)
    return keras.Model(inp, out)


def test_keras_convert_with_cam_runs_in_node(tmp_path: Path) -> None:
    src = tmp_path / "clf.keras"
    small_classifier().save(src)
    out = tmp_path / "kclf"
    result = convert_keras(out_dir=out, model_file=src, cam=True, fp16=True, echo=lambda s: None)
    assert result.ok, [line for p in result.parity for line in p.lines()]
    assert result.output_names == ["scores", "cam"]
    assert result.parity[0].max_abs < 1e-4
    text = (out / "manifest.yaml").read_text()
    assert "layout: NHWC" in text and "kind: multi_class" in text and "activation: none" in text

    fill_manifest(out, labels=["normal", "finding_a", "finding_b"])
    import yaml

    data = yaml.safe_load((out / "manifest.yaml").read_text())
    data["labels"][0]["normal"] = True
    data["labels"][0]["triage"] = False
    data["heatmap"] = {"method": "cam", "normalize": "relu_max"}
    (out / "manifest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    model = load_model(out)
    assert model.manifest.input.layout == "NHWC"
    session = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    truth = generate_study("cxr", tmp_path / "study", seed=4, write_masks=False, scale=0.1)
    res, _ = analyse(
        model,
        session,
        [tmp_path / "study" / i.file for i in truth.instances],
        level="image",
        uid_seed="k",
        watch=Stopwatch(deadline=time.monotonic() + 60),
    )
    probs = [f.probability for f in res.findings]
    assert len(probs) == 3 and abs(sum(probs) - 1.0) < 1e-4  # softmax applied in the graph
    assert res.images[0].heatmaps


def test_keras_h5_and_sigmoid(tmp_path: Path) -> None:
    src = tmp_path / "clf.h5"
    small_classifier(activation="sigmoid").save(src)
    result = convert_keras(out_dir=tmp_path / "h5", model_file=src, phantom=None, echo=lambda s: None)
    assert result.ok
    assert "kind: multi_label" in (tmp_path / "h5" / "manifest.yaml").read_text()


def test_unsupported_layer_fails_clearly(tmp_path: Path) -> None:
    src = tmp_path / "custom.keras"
    small_classifier(custom=True).save(src)
    # a fresh process would not know the layer: simulate by unregistering it
    registry = keras.saving.get_custom_objects()
    name = next(k for k in registry if k.endswith("Doubler"))
    saved = registry.pop(name)
    try:
        with pytest.raises(ConversionError, match="cannot load Keras model .*custom layer"):
            convert_keras(out_dir=tmp_path / "x", model_file=src, echo=lambda s: None)
    finally:
        registry[name] = saved
    with pytest.raises(ConversionError, match="does not exist"):
        convert_keras(out_dir=tmp_path / "y", model_file=tmp_path / "missing.keras")


def test_cam_needs_gap_dense_head(tmp_path: Path) -> None:
    inp = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(4, 3)(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2)(x)
    src = tmp_path / "flat.keras"
    keras.Model(inp, out).save(src)
    with pytest.raises(ConversionError, match="GlobalAveragePooling2D -> Dense"):
        convert_keras(out_dir=tmp_path / "f", model_file=src, cam=True, phantom=None)
    # without --cam it converts fine
    assert convert_keras(out_dir=tmp_path / "g", model_file=src, phantom=None, echo=lambda s: None).ok
