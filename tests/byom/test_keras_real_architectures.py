"""Keras applications' DenseNet121 (a functional model with 120 BatchNorm layers and concatenations)
through ``convert keras`` with the CAM output, then the registry and the node. ``weights=None``:
built here, nothing downloaded.

(EfficientNetB0 from keras.applications converts too, but with random weights its activations
vanish through the blocks: its outputs agree to 1e-5 whatever the input, so a parity check on them
would prove nothing. MONAI's EfficientNetBN covers that family in test_real_architectures.py.)"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import need_module

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = need_module("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - depends on the environment
    pytest.skip("Keras is not on the torch backend", allow_module_level=True)

from converters.cli import convert_keras  # noqa: E402
from converters.common import ort_session  # noqa: E402
from node.inference.registry import load_model  # noqa: E402
from node.inference.runtime import CPU, RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import Stopwatch, analyse  # noqa: E402
from node.synth import generate_study  # noqa: E402
from tests.byom.conftest import fill_manifest  # noqa: E402


def application(name: str, seed: int = 0) -> keras.Model:
    """A keras.applications network (random weights), 64x64x3, two sigmoid outputs, with BatchNorm
    statistics away from their initial values (so inference and training mode differ)."""
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(64, 64, 3), classes=2, classifier_activation="sigmoid"
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = int(layer.moving_mean.shape[0])
            layer.moving_mean.assign(rng.uniform(-0.2, 0.2, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c).astype("float32"))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.6, 1.2, c).astype("float32"))
        if isinstance(layer, keras.layers.Dense):
            layer.kernel.assign(np.asarray(keras.ops.convert_to_numpy(layer.kernel)) * 20.0)
    return model


@pytest.mark.slow
def test_keras_densenet121_converts_with_cam_and_runs(tmp_path: Path) -> None:
    name, cam = "DenseNet121", True
    model = application(name)
    src = tmp_path / f"{name}.keras"
    model.save(src)
    out = tmp_path / name.lower()
    lines: list[str] = []
    result = convert_keras(out_dir=out, model_file=src, cam=cam, echo=lines.append)
    assert result.ok, "\n".join(lines)
    assert result.output_names == (["scores", "cam"] if cam else ["scores"])

    x = np.random.default_rng(1).random((2, 64, 64, 3)).astype(np.float32)
    want = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
    got = ort_session(out / "model.onnx").run(None, {"image": x})
    assert np.ptp(want) > 1e-3  # outputs that differ, so parity means something
    np.testing.assert_allclose(got[0], want, atol=1e-4)
    if cam:
        assert got[1].shape == (2, 2, 2, 2)  # (N, classes, 64/32, 64/32)

    extra = {} if cam else {"heatmap": {"method": "none"}}
    fill_manifest(out, labels=["finding_a", "finding_b"], **extra)
    loaded = load_model(out)
    session = create_session(loaded, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    study = tmp_path / "study"
    truth = generate_study("cxr", study, seed=4, write_masks=False, scale=0.1)
    analysis, _ = analyse(
        loaded,
        session,
        [study / i.file for i in truth.instances],
        level="image",
        uid_seed="k",
        watch=Stopwatch(deadline=time.monotonic() + 120),
    )
    assert [f.label for f in analysis.findings] == ["finding_a", "finding_b"]
    assert all(0.0 <= f.probability <= 1.0 for f in analysis.findings)
    assert {h.method for h in analysis.images[0].heatmaps} == ({"cam"} if cam else set())
