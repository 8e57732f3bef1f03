"""3-D segmentation test models, built at test time (nothing committed):

- :func:`liver_seg_3d`: the bundled 2-D ``ct-liver-seg`` wrapped into an ``NCDHW`` graph (the
  volume's slices run through the 2-D net and stacked back), so the 3-D path's masks can be checked
  against the phantom truth and the 2-D path;
- :func:`monai_unet_3d`: MONAI's UNet with ``spatial_dims=3`` (random weights, fully
  convolutional, dynamic spatial axes) exported by torch, for the mechanics and MONAI agreement.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import yaml

from node.files import sha256_file

REPO = Path(__file__).resolve().parents[2]
LIVER_DIR = REPO / "models" / "onnx" / "ct-liver-seg"


def _write(folder: Path, manifest: dict[str, Any]) -> Path:
    manifest["model"] = {"file": "model.onnx", "sha256": sha256_file(folder / "model.onnx")}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return folder


def liver_manifest_3d(**segmentation: Any) -> dict[str, Any]:
    """The ct-liver-seg manifest as a 3-D model (``ct-liver-seg-3d``); ``segmentation`` overrides."""
    data = yaml.safe_load((LIVER_DIR / "manifest.yaml").read_text(encoding="utf-8"))
    data = copy.deepcopy(data)
    data["id"] = "ct-liver-seg-3d"
    data["name"] = "CT liver lesion segmentation (3-D test wrapper)"
    data["input"] = {
        "name": "image",
        "shape": [None, 1, None, 128, 128],
        "dtype": "float32",
        "layout": "NCDHW",
    }
    seg = data["segmentation"]
    seg.pop("min_area_px", None)
    seg.update(
        {
            "dimensions": 3,
            "roi_size": [8, 128, 128],
            "overlap": 0.25,
            "blend": "gaussian",
            "batch_size": 2,
            "min_volume_voxels": 30,
            "series_description": "AI liver lesion seg 3-D",
        }
    )
    seg.update(segmentation)
    return data


def liver_seg_3d(folder: Path, **segmentation: Any) -> Path:
    """A model folder whose graph takes (N, 1, D, 128, 128) and returns (N, 3, D, 128, 128): every
    slice through the bundled 2-D net."""
    import onnx
    from onnx import helper

    folder.mkdir(parents=True, exist_ok=True)
    model2d = onnx.load(str(LIVER_DIR / "model.onnx"))
    graph = model2d.graph
    (inp,) = [i for i in graph.input if i.name == "image"]
    (out,) = [o for o in graph.output if o.name == "logits"]
    for node in graph.node:
        node.input[:] = ["image2d" if n == "image" else n for n in node.input]
        node.output[:] = ["logits2d" if n == "logits" else n for n in node.output]
    pre = [
        helper.make_node("Transpose", ["image"], ["image_ndchw"], perm=[0, 2, 1, 3, 4]),
        helper.make_node(
            "Constant", [], ["slice_shape"], value=helper.make_tensor("s", 7, [4], [-1, 1, 128, 128])
        ),
        helper.make_node("Reshape", ["image_ndchw", "slice_shape"], ["image2d"]),
        helper.make_node("Shape", ["image"], ["nd"], start=0, end=1),
        helper.make_node("Shape", ["image"], ["dd"], start=2, end=3),
        helper.make_node("Constant", [], ["tail"], value=helper.make_tensor("t", 7, [3], [3, 128, 128])),
        helper.make_node("Concat", ["nd", "dd", "tail"], ["out_shape"], axis=0),
    ]
    post = [
        helper.make_node("Reshape", ["logits2d", "out_shape"], ["logits_ndchw"]),
        helper.make_node("Transpose", ["logits_ndchw"], ["logits"], perm=[0, 2, 1, 3, 4]),
    ]
    nodes = pre + list(graph.node) + post
    del graph.node[:]
    graph.node.extend(nodes)
    new_in = helper.make_tensor_value_info(
        "image", inp.type.tensor_type.elem_type, ["batch", 1, "depth", 128, 128]
    )
    new_out = helper.make_tensor_value_info(
        "logits", out.type.tensor_type.elem_type, ["batch", 3, "depth", 128, 128]
    )
    graph.input.remove(inp)
    graph.input.insert(0, new_in)
    graph.output.remove(out)
    graph.output.insert(0, new_out)
    del graph.value_info[:]
    onnx.checker.check_model(model2d)
    onnx.save(model2d, str(folder / "model.onnx"))
    return _write(folder, liver_manifest_3d(**segmentation))


def monai_unet_3d(
    folder: Path,
    *,
    channels: tuple[int, ...] = (4, 8, 16),
    roi: tuple[int, int, int] = (16, 32, 32),
    size: int = 64,
    seed: int = 0,
    model_id: str = "monai-unet-3d",
    **segmentation: Any,
) -> tuple[Path, Any]:
    """A MONAI UNet (spatial_dims=3, 3 output channels, softmax) model folder with dynamic spatial
    axes and ``roi_size`` ``roi``; slices resized to ``size``. Returns (folder, the torch module)."""
    import torch
    from monai.networks.nets import UNet

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=3,
        channels=channels,
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
    ).eval()
    dummy = torch.zeros((1, 1, *roi))
    axes = {"image": {0: "batch", 2: "d", 3: "h", 4: "w"}, "logits": {0: "batch", 2: "d", 3: "h", 4: "w"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's chatter
        torch.onnx.export(
            net,
            (dummy,),
            str(folder / "model.onnx"),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    data = liver_manifest_3d(roi_size=list(roi), **segmentation)
    data["id"] = model_id
    data["name"] = "MONAI UNet 3-D (random weights, test)"
    data["input"]["shape"] = [None, 1, None, None, None]
    for step in data["preprocessing"]:
        if step["op"] == "resize":
            step["size"] = [size, size]
    return _write(folder, data), net
