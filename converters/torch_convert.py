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
    """The modules of a GAP + linear head: the pool (whose input is the feature map) and the linear."""

    pool: nn.Module
    linear: nn.Linear
    pool_name: str
    linear_name: str


def find_cam_head(net: nn.Module, pool_name: str | None = None, linear_name: str | None = None) -> CamHead:
    """The last ``AdaptiveAvgPool2d(1)`` and the last ``nn.Linear`` (or the named modules)."""
    modules = dict(net.named_modules())

    def named(name: str) -> nn.Module:
        if name not in modules:
            raise ConversionError(f"no submodule {name!r}; modules: {', '.join(list(modules)[1:12])} ...")
        return modules[name]

    if pool_name is None:
        pools = [
            n
            for n, m in modules.items()
            if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1))
        ]
        if not pools:
            raise ConversionError(
                "--cam needs a global-average-pool + linear head: no AdaptiveAvgPool2d(1) module found "
                "(a functional pool cannot be hooked; name the pool module with --cam-pool)"
            )
        pool_name = pools[-1]
    if linear_name is None:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConversionError("--cam needs a global-average-pool + linear head: no nn.Linear found")
        linear_name = linears[-1]
    linear = named(linear_name)
    if not isinstance(linear, nn.Linear):
        raise ConversionError(f"{linear_name!r} is a {type(linear).__name__}, not nn.Linear")
    return CamHead(named(pool_name), linear, pool_name, linear_name)


class WithCam(nn.Module):
    """Returns (logits, cam): cam[n, k] = sum_c W[k, c] f[n, c] over the pooled feature map f."""

    def __init__(self, net: nn.Module, head: CamHead) -> None:
        super().__init__()
        self.net = net
        self.head = head
        self._features: list[torch.Tensor] = []
        head.pool.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple) -> None:
        self._features.append(args[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, cam)."""
        self._features.clear()
        logits = self.net(x)
        if not self._features:
            raise ConversionError(
                f"--cam: the pool {self.head.pool_name!r} is never called in forward(); the head is "
                "not global-average-pool + linear"
            )
        feats = self._features[-1]
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
    rebuilt = cam.mean(dim=(2, 3)) + (bias if bias is not None else 0)
    err = float((rebuilt - logits).abs().max())
    scale = float(logits.abs().max()) + 1e-6
    if err > tol * max(scale, 1.0):
        raise ConversionError(
            f"--cam: the head is not global-average-pool + linear ({wrapped.head.pool_name!r} -> "
            f"{wrapped.head.linear_name!r}): mean(CAM) + bias differs from the logits by {err:.3g}"
        )


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
    opset: int = 17,
) -> tuple[nn.Module, list[str]]:
    """Export ``net`` (eval mode) to ``out_path``; return the exported wrapper and its output names."""
    net = net.eval()
    dummy = torch.randn(2, *[int(d) for d in input_shape])
    names = [output_name]
    module: nn.Module
    if cam:
        if isinstance(net, torch.jit.ScriptModule):
            raise ConversionError(
                "--cam is not supported for TorchScript input; give module:factory + weights"
            )
        # a new wrapper module is in training mode, and eval() is recursive: without it BatchNorm
        # uses batch statistics and Dropout drops, in the parity reference and in the identity check
        module = WithCam(net, find_cam_head(net, cam_pool, cam_linear)).eval()
        verify_cam_identity(module, dummy)
        names.append("cam")
    elif isinstance(net, torch.jit.ScriptModule):
        module = net  # a traced/scripted module is exported as is (it must return one tensor)
    else:
        module = _Single(net).eval()  # see WithCam above: the wrapper would put BatchNorm in training
    try:
        with torch.no_grad():
            out = module(dummy)
    except Exception as exc:
        raise ConversionError(
            f"the model fails on an input of shape {tuple(dummy.shape)}: {type(exc).__name__}: {exc}"
        ) from exc
    first = out[0] if isinstance(out, tuple) else out
    if not isinstance(first, torch.Tensor) or first.ndim != 2:
        raise ConversionError(
            f"the model must return (batch, classes) scores; it returned "
            f"{tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__}"
        )
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
    return module, names


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
