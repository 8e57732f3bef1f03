"""PyTorch classifiers (``module:factory`` + weights, or TorchScript) to ONNX.

With ``cam=True`` the exported graph gains a ``cam`` output (N, classes, h, w): the class activation
map ``W_c . f`` of the feature map ``f`` entering the global-average pool, for heads that are
global-average-pool + linear (ResNet, DenseNet, MobileNet, EfficientNet and the like). The identity
``mean_hw(cam) + b == logits`` is verified before export, so a head that is not GAP + linear is
refused instead of yielding wrong maps.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.common import ConversionError

try:
    import torch
    from torch import nn
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ConversionError("PyTorch is not installed: pip install -e '.[convert]'") from exc


def load_factory(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Build a module from ``package.module:factory`` (the current directory is importable)."""
    if ":" not in spec:
        raise ConversionError(f"--model must be 'module:factory' (e.g. mynet.models:build), got {spec!r}")
    module_name, attr = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConversionError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConversionError(f"{module_name!r} has no attribute {attr!r}")
    try:
        net = factory(**(kwargs or {}))
    except Exception as exc:
        raise ConversionError(f"{spec}() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise ConversionError(f"{spec}() returned {type(net).__name__}, not a torch.nn.Module")
    return net


def load_weights(net: nn.Module, weights: Path) -> None:
    """Load a state dict (plain, or under 'state_dict'/'model'; 'module.' prefixes stripped), strictly."""
    try:
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConversionError(f"weights file {weights} does not exist") from exc
    except Exception as exc:
        raise ConversionError(
            f"cannot read weights file {weights} as a PyTorch state dict: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"weights file {weights} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(
                "shape mismatch "
                + ", ".join(
                    f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5]
                )
            )
        raise ConversionError(f"weights file {weights} does not match the model: " + "; ".join(parts))
    net.load_state_dict(state, strict=True)


def load_torchscript(path: Path) -> nn.Module:
    """A TorchScript module from ``torch.jit.save``."""
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ConversionError(f"cannot load TorchScript file {path}: {type(exc).__name__}: {exc}") from exc


@dataclass
class CamHead:
    """Where the feature map of a GAP + linear head is taken, and the linear.

    ``source`` is ``"pool_input"`` (the input of the pool module ``feature_name``: ResNet's
    ``avgpool``, MONAI's ``class_layers.pool``, EfficientNet's ``_avg_pooling``) or
    ``"module_output"`` (the output of ``feature_name``, for networks whose pool is functional:
    torchvision DenseNet's ``features``, followed by ``F.relu``, hence ``relu``).
    """

    linear: nn.Linear
    linear_name: str
    feature_module: nn.Module
    feature_name: str
    source: str = "pool_input"
    relu: bool = False

    @property
    def pool_name(self) -> str:
        """The module the feature map is taken at (kept for messages)."""
        return self.feature_name


def _is_gap(module: nn.Module) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


def _probe_feature_outputs(net: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(name, output) of every module returning a 4-D tensor, in the order their forward ends."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in net.named_modules():
        if not name:
            continue

        def keep(_m: nn.Module, _a: tuple, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                seen.append((name, out.clone()))  # as returned, before any in-place ReLU

        handles.append(module.register_forward_hook(keep))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _rebuilds_logits(feats: torch.Tensor, linear: nn.Linear, logits: torch.Tensor, tol: float) -> bool:
    if feats.shape[1] != linear.in_features or logits.ndim != 2 or logits.shape[1] != linear.out_features:
        return False
    with torch.no_grad():
        bias = linear.bias if linear.bias is not None else 0
        rebuilt = torch.einsum("kc,nc->nk", linear.weight, feats.mean(dim=(2, 3))) + bias
    return float((rebuilt - logits).abs().max()) <= tol * max(float(logits.abs().max()), 1.0)


def _search_feature_module(
    net: nn.Module, linear: nn.Linear, x: torch.Tensor, only: str | None = None, last: int = 8
) -> tuple[str, bool] | None:
    """The last module whose output (or its ReLU) averaged and fed to ``linear`` gives the logits."""
    with torch.no_grad():
        logits = net(x)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    candidates = _probe_feature_outputs(net, x)
    if only is not None:
        candidates = [(n, o) for n, o in candidates if n == only]
    for name, out in reversed(candidates[-last:] if only is None else candidates):
        for relu in (False, True):
            feats = torch.relu(out) if relu else out
            if _rebuilds_logits(feats, linear, logits, 1e-3):
                return name, relu
    return None


def find_cam_head(
    net: nn.Module,
    pool_name: str | None = None,
    linear_name: str | None = None,
    *,
    features_name: str | None = None,
    probe: torch.Tensor | None = None,
) -> CamHead:
    """The GAP + linear head of ``net``.

    The feature map is the input of the named pool (``pool_name``), else of the last
    ``AdaptiveAvgPool2d(1)`` module (ResNet, MONAI DenseNet/EfficientNet, MobileNet); a network
    without one (a functional pool, e.g. torchvision DenseNet: ``features`` -> ReLU -> pool ->
    ``classifier``) is probed with ``probe``: the last module (or ``features_name``) whose output,
    or its ReLU, averaged and fed to the linear gives the logits. The linear is ``linear_name``,
    else the last ``nn.Linear``.
    """
    modules = dict(net.named_modules())

    def named(name: str) -> nn.Module:
        if name not in modules:
            raise ConversionError(f"no submodule {name!r}; modules: {', '.join(list(modules)[1:12])} ...")
        return modules[name]

    if linear_name is None:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConversionError("--cam needs a global-average-pool + linear head: no nn.Linear found")
        linear_name = linears[-1]
    linear = named(linear_name)
    if not isinstance(linear, nn.Linear):
        raise ConversionError(f"{linear_name!r} is a {type(linear).__name__}, not nn.Linear")
    if pool_name is not None:
        return CamHead(linear, linear_name, named(pool_name), pool_name)
    pools = [n for n, m in modules.items() if _is_gap(m)]
    if pools and features_name is None:
        return CamHead(linear, linear_name, modules[pools[-1]], pools[-1])
    if features_name is not None:
        named(features_name)
    if probe is not None:
        found = _search_feature_module(net, linear, probe, features_name)
        if found is not None:
            name, relu = found
            return CamHead(linear, linear_name, modules[name], name, "module_output", relu)
    if features_name is not None:
        raise ConversionError(
            f"--cam: the output of {features_name!r} (or its ReLU), averaged and fed to "
            f"{linear_name!r}, does not give the logits: the head is not global-average-pool + linear"
        )
    raise ConversionError(
        "--cam needs a global-average-pool + linear head: no AdaptiveAvgPool2d(1) module found, and no "
        "module whose output (or its ReLU), averaged and fed to the last nn.Linear, gives the logits "
        "(name the pool with --cam-pool or the feature module with --cam-features)"
    )


class WithCam(nn.Module):
    """Returns (logits, cam): cam[n, k] = sum_c W[k, c] f[n, c] over the pooled feature map f."""

    def __init__(self, net: nn.Module, head: CamHead) -> None:
        super().__init__()
        self.net = net
        self.head = head
        self._features: list[torch.Tensor] = []
        if head.source == "module_output":
            head.feature_module.register_forward_hook(self._keep_output)
        else:
            head.feature_module.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        self._features.append(args[0])

    def _keep_output(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        self._features.append(out.clone())  # before an in-place op (DenseNet's relu) changes it

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, cam)."""
        self._features.clear()
        logits = self.net(x)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if not self._features:
            raise ConversionError(
                f"--cam: the pool {self.head.pool_name!r} is never called in forward(); the head is "
                "not global-average-pool + linear"
            )
        feats = self._features[-1]
        if self.head.relu:
            feats = torch.relu(feats)
        cam = torch.einsum("kc,nchw->nkhw", self.head.linear.weight, feats)
        return logits, cam


def verify_cam_identity(wrapped: WithCam, x: torch.Tensor, tol: float = 1e-3) -> None:
    """Refuse heads where mean_hw(cam) + bias is not the logits (not GAP + linear)."""
    with torch.no_grad():
        logits, cam = wrapped(x)
    if logits.ndim != 2 or cam.shape[1] != logits.shape[1]:
        raise ConversionError(
            f"--cam: logits {tuple(logits.shape)} and linear {wrapped.head.linear_name!r} "
            f"({wrapped.head.linear.out_features} outputs) do not match"
        )
    bias = wrapped.head.linear.bias
    rebuilt = cam.mean(dim=(2, 3)) + (bias.detach() if bias is not None else 0)
    err = float((rebuilt - logits).abs().max())
    scale = float(logits.abs().max()) + 1e-6
    if err > tol * max(scale, 1.0):
        raise ConversionError(
            f"--cam: the head is not global-average-pool + linear ({wrapped.head.pool_name!r} -> "
            f"{wrapped.head.linear_name!r}): mean(CAM) + bias differs from the logits by {err:.3g}"
        )


class SwapXY(nn.Module):
    """Feeds ``net`` its input with the last two axes swapped, and swaps them back in a CAM output.

    MONAI's image readers (``LoadImage``: PydicomReader, ITKReader, PILReader) return arrays indexed
    (x, y) = (column, row); the node prepares images (row, column). A network trained on MONAI's
    arrays gets them in its own order from this wrapper, inside the exported graph.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``net(x)`` with x's last two axes swapped."""
        return self.net(x.transpose(-1, -2))


class _SwapCam(nn.Module):
    def __init__(self, inner: WithCam) -> None:
        super().__init__()
        self.inner = inner
        self.head = inner.head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, cam = self.inner(x.transpose(-1, -2))
        return logits, cam.transpose(-1, -2)


_3D_LAYERS = (
    nn.Conv3d,
    nn.ConvTranspose3d,
    nn.BatchNorm3d,
    nn.InstanceNorm3d,
    nn.MaxPool3d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool3d,
)


def _first_3d_layer(net: nn.Module) -> tuple[str, nn.Module] | None:
    if isinstance(net, torch.jit.ScriptModule):
        return None
    for name, module in net.named_modules():
        if isinstance(module, _3D_LAYERS):
            return name, module
    return None


def refuse_3d(net: nn.Module, segmentation: bool = False) -> None:
    """Refuse a volumetric network given a 2-D input shape (C,H,W): it needs C,D,H,W."""
    found = _first_3d_layer(net)
    if found is None:
        return
    name, module = found
    if segmentation:
        raise ConversionError(
            f"this is a 3-D network ({type(module).__name__} at {name!r}) and --input-shape is one 2-D "
            "image (C,H,W): give the network's volume input as C,D,H,W (e.g. 1,32,64,64) for a 3-D "
            "(sliding-window) segmentation model"
        )
    raise ConversionError(
        f"this is a 3-D network ({type(module).__name__} at {name!r}) and --input-shape is one 2-D "
        "image (C,H,W): give the network's volume input as C,D,H,W (e.g. 1,32,64,64) for a volume "
        "classifier (the series' slices stacked and resampled to D)"
    )


class SwapXYOut(nn.Module):
    """:class:`SwapXY` for a per-pixel output: the input's last two axes swapped before ``net``
    and the output's swapped back, so that the output is (row, column) like the node's input."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``net(x^T)^T`` over the last two axes."""
        out = self.net(x.transpose(-1, -2))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.transpose(-1, -2)


class _Single(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return out


def export_torch(
    net: nn.Module,
    out_path: Path,
    input_shape: Sequence[int],
    *,
    input_name: str = "image",
    output_name: str = "logits",
    cam: bool = False,
    cam_pool: str | None = None,
    cam_linear: str | None = None,
    cam_features: str | None = None,
    swap_xy: bool = False,
    opset: int = 17,
    segmentation: bool = False,
) -> tuple[nn.Module, list[str]]:
    """Export ``net`` (eval mode) to ``out_path``; return the exported wrapper and its output names.

    ``swap_xy``: the graph swaps the input's last two axes before ``net`` (and back in the CAM or
    a per-pixel output), for networks trained on MONAI's (x, y)-indexed arrays (see :class:`SwapXY`).
    ``segmentation``: the output is per pixel, (batch, classes, h, w) for an input C,H,W, or per
    voxel, (batch, classes, D, H, W) at the input's size for a volume input C,D,H,W; no CAM.
    """
    if segmentation:
        return _export_segmentation(net, out_path, input_shape, input_name, output_name, swap_xy, opset)
    if len(input_shape) == 4:  # a volume classifier (NCDHW): the series as one input
        if cam:
            raise ConversionError("a volume classifier (input C,D,H,W) has no CAM output yet; drop --cam")
    elif len(input_shape) == 3:
        refuse_3d(net)
    else:
        raise ConversionError(
            f"--input-shape {','.join(str(d) for d in input_shape)}: give C,H,W (an image) or C,D,H,W "
            "(a volume)"
        )
    net = net.eval()
    dummy = torch.randn(2, *[int(d) for d in input_shape])
    names = [output_name]
    module: nn.Module
    if cam:
        if isinstance(net, torch.jit.ScriptModule):
            raise ConversionError(
                "--cam is not supported for TorchScript input; give module:factory + weights"
            )
        probe = dummy.transpose(-1, -2) if swap_xy else dummy
        try:
            head = find_cam_head(net, cam_pool, cam_linear, features_name=cam_features, probe=probe)
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(
                f"the model fails on an input of shape {tuple(probe.shape)}: {type(exc).__name__}: {exc}"
            ) from exc
        # a new wrapper module is in training mode, and eval() is recursive: without it BatchNorm
        # uses batch statistics and Dropout drops, in the parity reference and in the identity check
        with_cam = WithCam(net, head).eval()
        verify_cam_identity(with_cam, probe)
        module = _SwapCam(with_cam).eval() if swap_xy else with_cam
        names.append("cam")
    elif isinstance(net, torch.jit.ScriptModule) and not swap_xy:
        module = net  # a traced/scripted module is exported as is (it must return one tensor)
    else:
        # see WithCam above: the wrapper would put BatchNorm in training
        module = _Single(SwapXY(net) if swap_xy else net).eval()
    try:
        with torch.no_grad():
            out = module(dummy)
    except Exception as exc:
        raise ConversionError(
            f"the model fails on an input of shape {tuple(dummy.shape)}: {type(exc).__name__}: {exc}"
        ) from exc
    first = out[0] if isinstance(out, tuple) else out
    if isinstance(first, torch.Tensor) and first.ndim >= 4:
        raise ConversionError(
            f"the model returns per-pixel scores {tuple(first.shape)} (batch, classes, H, W): a "
            "segmentation network (UNet, SegResNet, ...): convert it with --kind segmentation "
            "(and --labels, --background-index / --activation); a classifier returns (batch, classes)"
        )
    if not isinstance(first, torch.Tensor) or first.ndim != 2:
        raise ConversionError(
            f"the model must return (batch, classes) scores; it returned "
            f"{tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__}"
        )
    _onnx_export(module, dummy, out_path, input_name, names, opset)
    return module, names


def _onnx_export(
    module: nn.Module, dummy: torch.Tensor, out_path: Path, input_name: str, names: list[str], opset: int
) -> None:
    """torch.onnx.export with a dynamic batch axis on the input and every output (module left in eval)."""
    axes = {input_name: {0: "batch"}, **{n: {0: "batch"} for n in names}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's and the legacy exporter's chatter
            torch.onnx.export(
                module,
                (dummy,),
                str(out_path),
                input_names=[input_name],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
        module.eval()  # torch.onnx.export restores the mode it found; the reference must stay in eval
    except Exception as exc:
        raise ConversionError(
            f"ONNX export failed (an operator or layer ONNX opset {opset} does not support?): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc


def _export_segmentation(
    net: nn.Module,
    out_path: Path,
    input_shape: Sequence[int],
    input_name: str,
    output_name: str,
    swap_xy: bool,
    opset: int,
) -> tuple[nn.Module, list[str]]:
    """Export a per-pixel (2-D, C,H,W) or per-voxel (3-D, C,D,H,W) network; see :func:`export_torch`."""
    spatial = len(input_shape) - 1
    if spatial not in (2, 3):
        raise ConversionError(f"--input-shape needs C,H,W or C,D,H,W, got {list(input_shape)}")
    if spatial == 2:
        refuse_3d(net, segmentation=True)
    elif swap_xy:
        raise ConversionError("3-D networks trained on MONAI's (x, y, z) arrays are not supported")
    net = net.eval()
    module: nn.Module
    if isinstance(net, torch.jit.ScriptModule) and not swap_xy:
        module = net
    else:
        module = (SwapXYOut(net) if swap_xy else _Single(net)).eval()
    dummy = torch.randn(2, *[int(d) for d in input_shape])
    try:
        with torch.no_grad():
            out = module(dummy)
    except Exception as exc:
        hint = ""
        if spatial == 3 and _first_3d_layer(net) is None:
            hint = " (a 2-D network given a volume input C,D,H,W? give C,H,W)"
        raise ConversionError(
            f"the model fails on an input of shape {tuple(dummy.shape)}{hint}: {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ConversionError(
            f"the model must return a tensor of per-pixel scores, it returned {type(out).__name__}"
        )
    want = 2 + spatial
    if out.ndim == 2:
        raise ConversionError(
            f"the model returns {tuple(out.shape)} (batch, classes): a classifier, not a segmentation "
            "network; convert it without --kind segmentation"
        )
    if out.ndim != want:
        raise ConversionError(
            f"a {'3' if spatial == 3 else '2'}-D segmentation network must return (batch, classes, "
            f"{'D, ' if spatial == 3 else ''}H, W) scores; it returned {tuple(out.shape)}"
        )
    if spatial == 3 and tuple(out.shape[2:]) != tuple(dummy.shape[2:]):
        raise ConversionError(
            f"the model's output {tuple(out.shape)} is not at its input's size {tuple(dummy.shape)}: the "
            "node stitches sliding-window outputs voxel by voxel, so a 3-D model must output per voxel"
        )
    _onnx_export(module, dummy, out_path, input_name, [output_name], opset)
    return module, [output_name]


def reference_fn(module: nn.Module):  # noqa: ANN201 - callable
    """numpy -> list of numpy outputs of the exported wrapper (the parity reference)."""

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(x))
        outs = out if isinstance(out, tuple) else (out,)
        return [o.detach().cpu().numpy() for o in outs]

    return run


def detect_activation(net: nn.Module) -> tuple[str | None, str | None]:
    """(activation, kind) when the model ends in Sigmoid/Softmax; (None, None) when unknown."""
    last = None
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Sigmoid, nn.Softmax, nn.LogSoftmax)):
            last = m
    if isinstance(last, nn.Sigmoid):
        return "none", "multi_label"
    if isinstance(last, nn.Softmax):
        return "none", "multi_class"
    return None, None


def detect_pixel_activation(module: nn.Module, input_shape: Sequence[int]) -> str | None:
    """'none' when the last module a per-pixel network runs is a Sigmoid or Softmax (the graph
    applies it); None when unknown (the output is logits, or a scripted module)."""
    if isinstance(module, torch.jit.ScriptModule):
        return None
    order: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda m, _a, _o: order.append(m))
        for m in module.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            module(torch.randn(1, *[int(d) for d in input_shape]))
    finally:
        for h in handles:
            h.remove()
    if order and isinstance(order[-1], (nn.Sigmoid, nn.Softmax)):
        return "none"
    return None
