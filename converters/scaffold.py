"""Write a manifest scaffold for a converted model: what the graph tells is filled in, the rest is
marked TODO (the node refuses the manifest, naming the field, until each TODO is replaced)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import yaml

from node.files import sha256_file

TODO = "TODO"


def _dump(data: object) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)


def scaffold_manifest(
    *,
    model_id: str,
    onnx_path: Path,
    input_name: str,
    input_shape: Sequence[int | None],
    layout: str,
    probabilities: str,
    n_outputs: int,
    cam: str | None,
    activation: str | None,
    kind: str | None,
    framework: str,
    source: str,
    metrics: dict[str, float],
    labels: list[dict] | None = None,
    segmentation: dict | None = None,
) -> str:
    """The scaffold's YAML text (with TODO comments). ``labels``: the label entries when the user
    named them (else TODO per output); ``segmentation``: the ``segmentation`` section of a
    ``kind: segmentation`` model (heatmap none, series aggregation)."""
    if layout == "NHWC":
        h, w, channels = input_shape[1], input_shape[2], input_shape[3]
    else:  # NCHW, NCDHW
        h, w, channels = input_shape[-2], input_shape[-1], input_shape[1]
    labels = labels or [
        {
            "name": f"{TODO}_label_{i}",
            "index": i,
            "code": {"value": TODO, "scheme_designator": TODO, "meaning": TODO},
            "threshold": 0.5,
            "triage": False,
        }
        for i in range(n_outputs)
    ]
    preprocessing: list[dict] = [
        {"op": "modality_lut"},
        {"op": "window", "source": "header", "fallback": "minmax"},
        {"op": "invert_monochrome1"},
        {"op": "letterbox", "size": [h, w], "pad_value": 0.0, "interpolation": "area"}
        if segmentation is None
        else {"op": "resize", "size": [h, w], "interpolation": "area"},
        {"op": "normalize", "mean": [TODO], "std": [TODO], "max_pixel_value": 255.0},
    ]
    if channels and channels > 1:
        preprocessing.append({"op": "replicate_channels", "channels": channels})
    sections = {
        "head": {
            "manifest_version": 1,
            "id": model_id,
            "name": f"{TODO}: human-readable model name",
            "version": "0.1.0",
            "description": f"{TODO}: what the model finds, on which images",
            "research_use_only": True,
            "intended_use": f"{TODO}: intended use (modality, body part, population)",
        },
        "provenance": {
            "provenance": {
                "training_script": f"{TODO}: how the model was trained",
                "data": f"{TODO}: training data description",
                "seed": 0,
                "created": dt.date.today().isoformat(),
                "metrics": {k: float(v) for k, v in metrics.items()},
                "framework": framework,
            }
        },
        "model": {"model": {"file": onnx_path.name, "sha256": sha256_file(onnx_path)}},
        "input": {
            "input": {
                "name": input_name,
                "shape": [None, *[int(d) for d in input_shape[1:]]],
                "dtype": "float32",
                "layout": layout,
            }
        },
        "preprocessing": {"preprocessing": preprocessing},
        "outputs": {
            "outputs": {
                "probabilities": probabilities,
                "activation": activation or TODO,
                **({"cam": cam} if cam else {}),
            },
            "kind": kind or TODO,
        },
        "labels": {"labels": labels},
        "rest": {
            "heatmap": {"method": "cam", "normalize": "relu_max"}
            if cam
            else {"method": "none"}
            if segmentation is not None or layout == "NCDHW"
            else {
                "method": "occlusion",
                "window": [max(1, (h or 32) // 8)] * 2,
                "stride": [max(1, (h or 32) // 16)] * 2,
            },
            "aggregation": {"level": "series", "method": "max", "keep_top_slices": 1}
            if segmentation is None and layout == "NCDHW"  # a volume classifier: one call per series
            else {"level": "image", "method": "max", "keep_top_slices": 1}
            if segmentation is None
            else {"level": "series", "method": "max", "keep_top_slices": 3},
            **({"segmentation": segmentation} if segmentation is not None else {}),
            "routing": {"modalities": [TODO], "body_parts": [TODO]},
        },
    }
    comments = {
        "head": f"# Manifest scaffold written by `pacs-node convert` from {source}.\n"
        "# Replace every TODO; the node refuses this manifest (naming the field) until then.\n"
        "# Schema: node/inference/manifest.py; examples: models/onnx/*/manifest.yaml.\n",
        "provenance": "\n# metrics: parity figures of the conversion; add your validation figures.\n",
        "model": "\n# From the converted file; update sha256 if you replace model.onnx.\n",
        "input": "\n# From the graph (batch axis dynamic).\n",
        "preprocessing": "\n# TODO: the steps your model was trained with, in order\n"
        "# (windowing, 8-bit conversion, resize/letterbox, normalisation); the defaults are a start.\n",
        "outputs": "\n# activation: 'none' when the graph already applies sigmoid/softmax.\n"
        "# kind: multi_label (independent findings, sigmoid) or multi_class (softmax, one normal label).\n",
        "labels": "\n# TODO: one entry per output index: name, code (SCT / RADLEX / DCM / 99PACSNODE),\n"
        "# operating threshold, whether a positive raises triage; a multi_class model marks\n"
        "# its normal class with normal: true.\n",
        "rest": "\n# heatmap: cam with a CAM output in the graph, else occlusion (patch: patch models).\n"
        "# aggregation: image / series (CT, MR slices) / study; routing: modalities, body parts.\n"
        if segmentation is None
        else "\n# heatmap none: a segmentation model shows its masks. segmentation: docs/segmentation.md\n"
        "# (background_index for softmax argmax, min_area_px / min_volume_voxels, the 3-D window).\n",
    }
    if segmentation is not None:
        comments["outputs"] = (
            "\n# The per-pixel output: activation softmax (argmax over the channels, with a background\n"
            "# channel) or sigmoid (a threshold per channel); 'none' when the graph applies it.\n"
        )
        comments["labels"] = (
            "\n# One entry per segment (not the background): name, code = segmented property type,\n"
            "# category = property category (SNOMED CT), per-pixel threshold, triage when present.\n"
        )
    text = "".join(comments[k] + _dump(v) for k, v in sections.items())
    return text


def write_manifest_scaffold(out_dir: Path, **kwargs: object) -> Path:
    """Write ``out_dir/manifest.yaml`` (see :func:`scaffold_manifest`)."""
    path = out_dir / "manifest.yaml"
    path.write_text(scaffold_manifest(**kwargs), encoding="utf-8")  # type: ignore[arg-type]
    return path
