"""A compact CNN with a linear class head over a feature map, and its ONNX export with an in-graph CAM.

The head is a 1x1 linear map of the last feature map ``f`` (N, K, h, w) to per-location class
evidence ``W f + b`` (N, C, h, w), pooled to logits: by the mean (global average pool, the classic
CAM network) or by a smooth maximum (log-sum-exp pooling, ``(1/r) log mean exp(r s)``), which makes
the evidence concentrate on the lesion instead of spreading over the whole organ. Either way the
gradient of a logit with respect to ``f`` summed over locations is ``W_c``, so Grad-CAM's channel
weights are ``W_c / (h w)`` and Grad-CAM equals the exported CAM ``W_c f`` up to scale (one forward
pass, no gradients at serving time). A multi-class model can make its normal class a "null" class
whose logit is a learned constant: the finding maps then carry the whole decision, which keeps
structures common to every class (spine, vessels) out of them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import torch
from torch import nn

Pool = Literal["avg", "lse"]


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CamNet(nn.Module):
    """conv(w0) -> pool -> [conv, conv](w1) -> pool -> [conv, conv](w2) -> pool -> [conv, conv](w3)
    -> linear head per location -> pooled logits. Feature maps are 1/8 of the input;
    CAM_c = sum_k W_ck * feature_k."""

    def __init__(
        self,
        n_out: int,
        widths: tuple[int, ...] = (8, 16, 32, 64),
        in_ch: int = 1,
        pool: Pool = "avg",
        lse_r: float = 4.0,
        null_class: int | None = None,
    ) -> None:
        super().__init__()
        w0, w1, w2, w3 = widths
        layers: list[nn.Module] = [*_conv(in_ch, w0), nn.MaxPool2d(2)]
        layers += [*_conv(w0, w1), *_conv(w1, w1), nn.MaxPool2d(2)]
        layers += [*_conv(w1, w2), *_conv(w2, w2), nn.MaxPool2d(2)]
        layers += [*_conv(w2, w3), *_conv(w3, w3)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(w3, n_out)
        self.pool = pool
        self.lse_r = float(lse_r)
        # the null (normal) class, if any, has no evidence map: its logit is a learned constant, so
        # every other class's map alone decides against it (and its CAM is exported as zeros)
        keep = torch.ones(n_out)
        if null_class is not None:
            keep[null_class] = 0.0
        self.register_buffer("keep", keep)

    def _pool(self, evidence: torch.Tensor) -> torch.Tensor:
        flat = evidence.flatten(2)  # (N, C, h*w)
        if self.pool == "avg":
            return flat.mean(dim=2)
        r = self.lse_r
        return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r

    def forward_cam(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), CAM (N, C, h, w) = W f without the bias)."""
        f = self.features(x)
        keep = self.keep
        cam = torch.einsum("ck,nkhw->nchw", self.head.weight, f) * keep[None, :, None, None]
        pooled = self._pool(cam + self.head.bias[None, :, None, None])
        logits = pooled * keep + self.head.bias * (1.0 - keep)
        return logits, cam

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C)."""
        return self.forward_cam(x)[0]


class _Export(nn.Module):
    def __init__(self, net: CamNet, with_cam: bool) -> None:
        super().__init__()
        self.net = net
        self.with_cam = with_cam

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if self.with_cam:
            return self.net.forward_cam(x)
        return self.net(x)


def export_onnx(net: CamNet, path: Path, input_hw: tuple[int, int], with_cam: bool, in_ch: int = 1) -> None:
    """Export (batch axis dynamic, opset 17): outputs ``logits`` (N, C) [and ``cam`` (N, C, h, w)]."""
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros(1, in_ch, *input_hw)
    outputs = ["logits", "cam"] if with_cam else ["logits"]
    axes = {"image": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}
    torch.onnx.export(
        _Export(net, with_cam),
        (dummy,),
        str(path),
        input_names=["image"],
        output_names=outputs,
        dynamic_axes=axes,
        opset_version=17,
        dynamo=False,
        do_constant_folding=True,
    )


# ------------------------------------------------------------------------------------------------
# Segmentation


def _double(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_conv(cin, cout), *_conv(cout, cout))


class UNet(nn.Module):
    """A small 2-D U-Net: ``len(widths)`` levels (two 3x3 conv + BatchNorm + ReLU each), max-pool
    down, bilinear up-sampling and skip concatenation, a 1x1 head to per-pixel class logits at the
    input resolution (N, n_out, H, W). H and W must be divisible by ``2 ** (len(widths) - 1)``."""

    def __init__(self, n_out: int, widths: tuple[int, ...] = (8, 16, 32), in_ch: int = 1) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = in_ch
        for w in widths:
            self.down.append(_double(cin, w))
            cin = w
        self.up = nn.ModuleList(
            _double(widths[i + 1] + widths[i], widths[i]) for i in reversed(range(len(widths) - 1))
        )
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(widths[0], n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits (N, n_out, H, W)."""
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def export_unet_onnx(net: UNet, path: Path, input_hw: tuple[int, int]) -> None:
    """Export a U-Net (batch axis dynamic, opset 17): input ``image``, output ``logits`` (N, C, H, W)."""
    net.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        net,
        (torch.zeros(1, 1, *input_hw),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
        do_constant_folding=True,
    )
