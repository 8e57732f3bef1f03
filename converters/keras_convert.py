"""Keras 3 classifiers (``.keras`` / ``.h5``) to ONNX.

Keras runs on its PyTorch backend here (``KERAS_BACKEND=torch``, set before Keras is imported): a
Keras model is then a ``torch.nn.Module`` and is exported by ``torch.onnx`` like any PyTorch model,
so no TensorFlow is needed. Keras layouts are channels-last: the ONNX input is NHWC.

With ``cam=True`` the last ``GlobalAveragePooling2D`` -> ``Dense`` head gains a ``cam`` output
(N, classes, h, w) = the Dense kernel applied at every location of the pooled feature map.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters.common import ConversionError

os.environ.setdefault("KERAS_BACKEND", "torch")


def _keras() -> Any:
    try:
        import keras
    except ModuleNotFoundError as exc:
        raise ConversionError("Keras is not installed: pip install -e '.[convert]'") from exc
    if keras.backend.backend() != "torch":
        raise ConversionError(
            f"Keras runs on the {keras.backend.backend()!r} backend; the converter needs KERAS_BACKEND=torch "
            "(set it before Python starts, or unset it)"
        )
    return keras


def load_keras(path: Path, custom_objects: dict[str, Any] | None = None) -> Any:
    """Load a ``.keras`` or ``.h5`` model (not compiled)."""
    keras = _keras()
    if not path.is_file():
        raise ConversionError(f"Keras model file {path} does not exist")
    if path.suffix.lower() not in (".keras", ".h5", ".hdf5"):
        raise ConversionError(f"{path}: expected a .keras or .h5 file")
    try:
        return keras.models.load_model(str(path), compile=False, custom_objects=custom_objects)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise ConversionError(
            f"cannot load Keras model {path} (an unsupported or custom layer? pass its module with "
            f"--custom-objects): {type(exc).__name__}: {' '.join(text[:3])}"
        ) from exc


def input_shape(model: Any, override: Sequence[int] | None = None) -> tuple[int, int, int]:
    """(H, W, C) of the model's single image input."""
    if len(model.inputs) != 1:
        raise ConversionError(f"the model has {len(model.inputs)} inputs; the node feeds one image")
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4:
        raise ConversionError(f"the model input must be an image batch (N, H, W, C); it is {shape}")
    if override is not None:
        return tuple(int(d) for d in override)  # type: ignore[return-value]
    if any(d is None for d in shape[1:]):
        raise ConversionError(f"the model input {shape} has free dims: give --input-shape H,W,C")
    return int(shape[1]), int(shape[2]), int(shape[3])


def add_cam(model: Any) -> tuple[Any, str]:
    """A functional model returning [scores, cam] for a GlobalAveragePooling2D -> Dense head."""
    keras = _keras()
    layers = getattr(model, "layers", [])
    gaps = [layer for layer in layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)]
    denses = [layer for layer in layers if isinstance(layer, keras.layers.Dense)]
    if not gaps or not denses:
        raise ConversionError(
            "--cam needs a GlobalAveragePooling2D -> Dense head; this model has "
            f"{len(gaps)} GlobalAveragePooling2D and {len(denses)} Dense layers"
        )
    gap, dense = gaps[-1], denses[-1]
    if gap.data_format != "channels_last":
        raise ConversionError("--cam supports channels_last models only")
    if len(model.outputs) != 1:
        raise ConversionError(f"--cam needs a single-output model (found {len(model.outputs)} outputs)")
    feats = gap.input
    cam = keras.ops.einsum("nhwc,ck->nkhw", feats, dense.kernel)
    wrapped = keras.Model(model.inputs, [model.outputs[0], cam])
    return wrapped, dense.name


def verify_cam_identity(model: Any, wrapped: Any, dense_name: str, x: np.ndarray, tol: float = 1e-3) -> None:
    """Refuse heads where activation(mean_hw(cam) + bias) is not the model's output."""
    keras = _keras()
    dense = model.get_layer(dense_name)
    scores, cam = (np.asarray(keras.ops.convert_to_numpy(t)) for t in wrapped(x))
    pre = cam.mean(axis=(2, 3)) + (
        np.asarray(keras.ops.convert_to_numpy(dense.bias)) if dense.use_bias else 0
    )
    rebuilt = np.asarray(keras.ops.convert_to_numpy(dense.activation(keras.ops.convert_to_tensor(pre))))
    if rebuilt.shape != scores.shape:
        raise ConversionError(f"--cam: Dense {dense_name!r} gives {rebuilt.shape}, the model {scores.shape}")
    err = float(np.abs(rebuilt - scores).max())
    if err > tol * max(float(np.abs(scores).max()), 1.0):
        raise ConversionError(
            f"--cam: the head is not GlobalAveragePooling2D -> Dense (output {dense_name!r}): the CAM "
            f"rebuilds the scores only to {err:.3g}"
        )


def detect_activation(model: Any) -> tuple[str | None, str | None]:
    """(activation, kind) from the last Dense/Activation layer: sigmoid -> multi_label, softmax ->
    multi_class (the graph applies it: 'none'); linear -> unknown (None, None)."""
    keras = _keras()
    last = None
    for layer in getattr(model, "layers", []):
        if isinstance(layer, (keras.layers.Dense, keras.layers.Activation, keras.layers.Softmax)):
            last = layer
    if last is None:
        return None, None
    if isinstance(last, keras.layers.Softmax):
        return "none", "multi_class"
    name = getattr(getattr(last, "activation", None), "__name__", "")
    if name == "sigmoid":
        return "none", "multi_label"
    if name == "softmax":
        return "none", "multi_class"
    return None, None


def export_keras(
    model: Any,
    out_path: Path,
    hwc: Sequence[int],
    *,
    input_name: str = "image",
    output_name: str = "scores",
    cam: bool = False,
    opset: int = 17,
) -> tuple[Any, list[str]]:
    """Export through torch.onnx; return the exported Keras model and its output names."""
    import torch

    names = [output_name]
    dummy = np.random.default_rng(0).standard_normal((2, *hwc)).astype(np.float32)
    exported = model
    if cam:
        exported, dense_name = add_cam(model)
        verify_cam_identity(model, exported, dense_name, dummy)
        names.append("cam")
    try:
        out = exported(dummy)
    except Exception as exc:
        raise ConversionError(f"the model fails on an input of shape {dummy.shape}: {exc}") from exc
    first = out[0] if isinstance(out, (list, tuple)) else out
    if len(first.shape) != 2:
        raise ConversionError(
            f"the model must return (batch, classes) scores; it returned {tuple(first.shape)}"
        )

    class _Wrap(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> Any:
            o = self.inner(x)
            return tuple(o) if isinstance(o, (list, tuple)) else o

    axes = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's chatter
            torch.onnx.export(
                _Wrap(exported),
                (torch.from_numpy(dummy),),
                str(out_path),
                input_names=[input_name],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:
        raise ConversionError(
            f"ONNX export failed (a layer ONNX opset {opset} does not support?): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    return exported, names


def reference_fn(model: Any):  # noqa: ANN201 - callable
    """numpy -> list of numpy outputs of the Keras model (the parity reference)."""
    keras = _keras()

    def run(x: np.ndarray) -> list[np.ndarray]:
        out = model(x)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [np.asarray(keras.ops.convert_to_numpy(o)) for o in outs]

    return run
