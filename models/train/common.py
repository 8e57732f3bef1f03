"""Shared helpers for the reference models: model specs, phantom data through the node's own
preprocessing and manifest writing (the CNN and its export are in ``net.py``, the
node-path evaluation in ``evaluate.py``).

Every tensor a model sees in training is produced by ``node.inference.preprocess.run_steps`` with
the manifest's own steps, so training preprocessing equals serving preprocessing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from node.files import sha256_file
from node.inference.manifest import Manifest, parse_manifest
from node.inference.preprocess import run_steps
from node.synth import RenderedImage, RenderedStudy, render_study
from node.types import ImageHeader, ModelInput

REPO = Path(__file__).resolve().parents[2]
ONNX_ROOT = REPO / "models" / "onnx"
TRAIN_SEED = 20261123

RESEARCH = "Research use only, not for diagnosis."
SYNTHETIC = "Research model trained on synthetic phantoms only; not validated on patient data."


def _code(value: str, scheme: str, meaning: str) -> dict[str, str]:
    return {"value": value, "scheme_designator": scheme, "meaning": meaning}


NORMAL_CODE = _code("17621005", "SCT", "Normal")


@dataclass(frozen=True)
class Spec:
    """Everything model-specific: phantom kind and options, manifest parts, architecture sizes."""

    id: str
    kind: str  # phantom kind
    name: str
    description: str
    intended_use: str
    input_hw: tuple[int, int]
    steps: list[dict[str, Any]]
    multi_label: bool
    labels: list[dict[str, Any]]  # name, code, threshold, triage, normal
    heatmap: dict[str, Any]
    aggregation: dict[str, Any]
    routing: dict[str, Any]
    render_options: dict[str, Any] = field(default_factory=dict)
    widths: tuple[int, ...] = (8, 16, 32, 64)
    pool: str = "lse"  # CamNet head pooling: "lse" (smooth max, localises) or "avg"
    null_normal: bool = False  # the normal class's logit is a learned constant (no evidence map)
    channels: int = 1  # model input channels (3: RGB photographs)

    @property
    def label_names(self) -> list[str]:
        return [lb["name"] for lb in self.labels]

    @property
    def n_out(self) -> int:
        return len(self.labels)

    @property
    def model_dir(self) -> Path:
        return ONNX_ROOT / self.id


_NORM = {"op": "normalize", "mean": [0.5], "std": [0.25], "max_pixel_value": 255.0}

#: Phantom kinds that are single 8-bit RGB photographs (one image per study, one label each).
PHOTO_KINDS = frozenset({"fundus", "derm", "smear"})

SPECS: dict[str, Spec] = {
    "cxr": Spec(
        id="cxr",
        kind="cxr",
        name="Chest radiograph TB / pneumonia reference classifier",
        description="Multi-label tuberculosis and pneumonia on frontal chest CR/DX (synthetic phantoms), "
        "with an in-graph class activation map.",
        intended_use=f"{RESEARCH} Frontal CR/DX chest radiographs; demonstrates the node's CAM path.",
        input_hw=(128, 128),
        steps=[
            {"op": "modality_lut"},
            {"op": "window", "source": "header", "fallback": "minmax"},
            {"op": "invert_monochrome1"},
            {"op": "letterbox", "size": [128, 128], "pad_value": 0.0, "interpolation": "area"},
            _NORM,
        ],
        multi_label=True,
        labels=[
            {"name": "tuberculosis", "code": _code("56717001", "SCT", "Tuberculosis"), "triage": True},
            {"name": "pneumonia", "code": _code("233604007", "SCT", "Pneumonia"), "triage": True},
        ],
        heatmap={"method": "cam", "normalize": "relu_max"},
        aggregation={"level": "image", "method": "max", "keep_top_slices": 1},
        routing={"modalities": ["CR", "DX"], "body_parts": ["CHEST"]},
        render_options={"scale": 0.15},
    ),
    "mammo": Spec(
        id="mammo",
        kind="mammo",
        name="Mammography mass / calcification patch classifier",
        description="Patch classifier (normal / benign / malignant) applied over the downscaled full "
        "image; image score is the maximum over patches, study score the maximum over the four views.",
        intended_use=f"{RESEARCH} 2-D screening mammograms (CC/MLO); demonstrates the node's patch path.",
        input_hw=(64, 64),
        steps=[
            {"op": "modality_lut"},
            {"op": "window", "source": "header", "fallback": "minmax"},
            {"op": "invert_monochrome1"},
            {"op": "resize", "size": [416, 320], "interpolation": "area"},
            _NORM,
        ],
        multi_label=False,
        labels=[
            {"name": "normal", "code": NORMAL_CODE, "normal": True},
            {"name": "benign", "code": _code("3898006", "SCT", "Neoplasm, benign")},
            {
                "name": "malignant",
                "code": _code("254837009", "SCT", "Malignant neoplasm of breast"),
                "triage": True,
            },
        ],
        heatmap={"method": "patch", "patch_size": [64, 64], "stride": [16, 16], "batch_size": 64},
        aggregation={"level": "study", "method": "max", "keep_top_slices": 1},
        routing={"modalities": ["MG"], "body_parts": ["BREAST"]},
        render_options={"scale": 0.125},
        widths=(16, 32, 48, 64),
        pool="avg",
    ),
    "ct-liver": Spec(
        id="ct-liver",
        kind="ct",
        name="CT liver lesion slice classifier",
        description="Axial contrast CT slice classifier (normal / benign / malignant liver lesion) with "
        "a contrast-enhanced liver window (C80/W200 HU); series score aggregated over slices; in-graph CAM.",
        intended_use=f"{RESEARCH} Axial abdominal CT series (portal venous phase).",
        input_hw=(128, 128),
        steps=[
            {"op": "modality_lut"},
            # contrast-enhanced liver window: the "liver" preset (C30/W150, for unenhanced CT) clips
            # enhancing liver (~100 HU) and hyper-enhancing masses (150-185 HU) to white
            {"op": "window", "source": "explicit", "center": 80.0, "width": 200.0},
            {"op": "resize", "size": [128, 128], "interpolation": "area"},
            _NORM,
        ],
        multi_label=False,
        labels=[
            {"name": "normal", "code": NORMAL_CODE, "normal": True},
            {"name": "benign", "code": _code("85057007", "SCT", "Cyst of liver")},
            {
                "name": "malignant",
                "code": _code("93870000", "SCT", "Malignant neoplasm of liver"),
                "triage": True,
            },
        ],
        heatmap={"method": "cam", "normalize": "relu_max"},
        aggregation={"level": "series", "method": "top_k_mean", "k": 2, "keep_top_slices": 3},
        routing={"modalities": ["CT"], "body_parts": ["ABDOMEN", "LIVER"]},
        render_options={"slices": 40, "size": 128},
    ),
    "mr-brain": Spec(
        id="mr-brain",
        kind="mr",
        name="MR brain tumour slice classifier",
        description="Axial brain MR slice classifier (normal / tumour) for T2, FLAIR or post-contrast T1; "
        "series score aggregated over slices; in-graph CAM.",
        intended_use=f"{RESEARCH} Axial brain MR series.",
        input_hw=(128, 128),
        steps=[
            {"op": "modality_lut"},
            {"op": "window", "source": "header", "fallback": "minmax"},
            {"op": "resize", "size": [128, 128], "interpolation": "area"},
            _NORM,
        ],
        multi_label=False,
        labels=[
            {"name": "normal", "code": NORMAL_CODE, "normal": True},
            {
                "name": "tumour",
                "code": _code("126952004", "SCT", "Neoplasm of brain"),
                "triage": True,
            },
        ],
        heatmap={"method": "cam", "normalize": "relu_max"},
        aggregation={"level": "series", "method": "top_k_mean", "k": 2, "keep_top_slices": 3},
        routing={"modalities": ["MR"], "body_parts": ["BRAIN", "HEAD"]},
        render_options={"slices": 24, "size": 128},
    ),
    "fundus-dr": Spec(
        id="fundus-dr",
        kind="fundus",
        name="Colour fundus referable diabetic retinopathy reference classifier",
        description="Colour fundus photograph classifier (normal / referable diabetic retinopathy: "
        "microaneurysms, haemorrhages, hard exudates) after a circular field-of-view crop and "
        "illumination correction, with an in-graph class activation map.",
        intended_use=f"{RESEARCH} 45-degree colour fundus photographs (OP); demonstrates the node's "
        "colour path.",
        input_hw=(128, 128),
        steps=[
            {"op": "circular_crop", "threshold": 0.1, "margin": 0.0},
            {"op": "illumination_correction", "sigma_fraction": 0.1},
            {"op": "resize", "size": [128, 128], "interpolation": "area"},
            {"op": "normalize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "max_pixel_value": 255.0},
        ],
        multi_label=False,
        labels=[
            {"name": "normal", "code": NORMAL_CODE, "normal": True},
            {
                "name": "referable_dr",
                "code": _code("4855003", "SCT", "Diabetic retinopathy"),
                "triage": True,
            },
        ],
        heatmap={"method": "cam", "normalize": "relu_max"},
        aggregation={"level": "image", "method": "max", "keep_top_slices": 1},
        routing={"modalities": ["OP"], "body_parts": ["EYE"]},
        render_options={"size": 256},
        null_normal=True,
        channels=3,
    ),
    "derm-lesion": Spec(
        id="derm-lesion",
        kind="derm",
        name="Dermoscopy melanoma / naevus reference classifier",
        description="Dermoscopic photograph classifier (melanocytic naevus / melanoma: asymmetry, "
        "irregular border, colour variegation) with an in-graph class activation map.",
        intended_use=f"{RESEARCH} Dermoscopic photographs of one pigmented skin lesion (XC, VL "
        "Photographic); demonstrates the node's colour path.",
        input_hw=(128, 128),
        steps=[
            {"op": "resize", "size": [128, 128], "interpolation": "area"},
            {
                "op": "normalize",
                "mean": [0.7, 0.55, 0.48],
                "std": [0.18, 0.18, 0.18],
                "max_pixel_value": 255.0,
            },
        ],
        multi_label=False,
        labels=[
            {"name": "naevus", "code": _code("400096001", "SCT", "Melanocytic naevus"), "normal": True},
            {"name": "melanoma", "code": _code("1162635006", "SCT", "Malignant melanoma"), "triage": True},
        ],
        heatmap={"method": "cam", "normalize": "relu_max"},
        aggregation={"level": "image", "method": "max", "keep_top_slices": 1},
        routing={"modalities": ["XC"], "body_parts": ["SKIN"]},
        render_options={"size": 256},
        null_normal=True,
        channels=3,
    ),
    "smear-malaria": Spec(
        id="smear-malaria",
        kind="smear",
        name="Blood smear Plasmodium (ring form) reference classifier",
        description="Thin blood smear microscopy field classifier (normal / Plasmodium ring forms in "
        "red cells) with an in-graph class activation map.",
        intended_use=f"{RESEARCH} Single-frame light microscopy fields of Giemsa-stained thin blood "
        "smears (GM, VL Microscopic); demonstrates the node's colour path.",
        input_hw=(128, 128),
        steps=[
            {"op": "resize", "size": [128, 128], "interpolation": "area"},
            {
                "op": "normalize",
                "mean": [0.85, 0.7, 0.72],
                "std": [0.12, 0.16, 0.15],
                "max_pixel_value": 255.0,
            },
        ],
        multi_label=False,
        labels=[
            {"name": "normal", "code": NORMAL_CODE, "normal": True},
            {"name": "plasmodium", "code": _code("61462000", "SCT", "Malaria"), "triage": True},
        ],
        heatmap={"method": "cam", "normalize": "relu_max"},
        aggregation={"level": "image", "method": "max", "keep_top_slices": 1},
        routing={"modalities": ["GM", "SM"], "body_parts": ["BLOOD"]},
        render_options={"size": 256},
        null_normal=True,
        channels=3,
    ),
}


# ------------------------------------------------------------------------------------------------
# Manifest


def manifest_dict(
    spec: Spec,
    sha256: str = "0" * 64,
    metrics: dict[str, float] | None = None,
    data: str = "",
    seed: int = 0,
    *,
    thresholds: dict[str, float] | None = None,
    training_script: str | None = None,
    created: str | None = None,
    heatmap: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of ``spec`` as plain data (validated by ``manifest``).

    ``thresholds`` overrides the operating threshold per label name (default 0.5); ``heatmap``
    overrides the spec's heatmap section (e.g. a finer patch stride chosen after training).
    """
    thresholds = thresholds or {}
    labels = []
    for i, lb in enumerate(spec.labels):
        item: dict[str, Any] = {
            "name": lb["name"],
            "index": i,
            "code": lb["code"],
            "threshold": round(float(thresholds.get(lb["name"], lb.get("threshold", 0.5))), 4),
            "triage": bool(lb.get("triage", False)),
        }
        if lb.get("normal"):
            item["normal"] = True
        labels.append(item)
    return {
        "manifest_version": 1,
        "id": spec.id,
        "name": spec.name,
        "version": "1.0.0",
        "description": f"{spec.description} {SYNTHETIC}",
        "research_use_only": True,
        "intended_use": spec.intended_use,
        "provenance": {
            "training_script": training_script or f"models/train/train.py --model {spec.id}",
            "data": data or f"synthetic {spec.kind} phantoms from node.synth",
            "seed": int(seed),
            "created": created or dt.date.today().isoformat(),
            "metrics": {k: round(float(v), 4) for k, v in (metrics or {}).items()},
            "framework": "torch 2.13 (CPU) -> ONNX opset 17",
        },
        "model": {"file": "model.onnx", "sha256": sha256},
        "input": {
            "name": "image",
            "shape": [None, spec.channels, *spec.input_hw],
            "dtype": "float32",
            "layout": "NCHW",
        },
        "preprocessing": spec.steps,
        "outputs": {
            "probabilities": "logits",
            "activation": "sigmoid" if spec.multi_label else "softmax",
            **({"cam": "cam"} if spec.heatmap["method"] == "cam" else {}),
        },
        "kind": "multi_label" if spec.multi_label else "multi_class",
        "labels": labels,
        "heatmap": heatmap or spec.heatmap,
        "aggregation": spec.aggregation,
        "routing": spec.routing,
    }


def manifest(spec: Spec) -> Manifest:
    """The validated manifest (placeholder sha) whose steps the data pipeline runs."""
    return parse_manifest(manifest_dict(spec), f"spec {spec.id}")


def write_manifest(
    spec: Spec,
    metrics: dict[str, float],
    data: str,
    seed: int,
    **overrides: Any,
) -> Path:
    """Write ``manifest.yaml`` beside the exported model with its sha256 (validated first).

    ``overrides`` go to :func:`manifest_dict` (thresholds, training_script, created, heatmap).
    """
    onnx_path = spec.model_dir / "model.onnx"
    data_dict = manifest_dict(spec, sha256_file(onnx_path), metrics, data, seed, **overrides)
    parse_manifest(data_dict, f"{spec.id} manifest")
    out = spec.model_dir / "manifest.yaml"
    header = (
        f"# {spec.name}.\n# {RESEARCH} {SYNTHETIC}\n"
        "# Written by models/train/train.py and models/train/evaluate.py; see MODEL_CARD.md.\n"
    )
    out.write_text(header + yaml.safe_dump(data_dict, sort_keys=False, width=100), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------------
# Phantoms through the node's preprocessing


def header_for(image: RenderedImage, modality: str, uid: str = "1.2.3.4") -> ImageHeader:
    """The ImageHeader the node's decoder would produce for a rendered image (training path)."""
    rows, cols = image.pixels.shape[:2]
    colour = image.pixels.ndim == 3
    return ImageHeader(
        sop_instance_uid=uid,
        series_instance_uid=uid + ".1",
        study_instance_uid=uid + ".2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=modality,
        rows=int(rows),
        cols=int(cols),
        number_of_frames=1,
        samples_per_pixel=3 if colour else 1,
        photometric_interpretation=image.photometric,
        stored_photometric_interpretation=image.photometric,
        bits_allocated=8 if colour else 16,
        bits_stored=int(image.bits_stored),
        pixel_representation=1 if image.signed else 0,
        rescale_slope=float(image.rescale_slope),
        rescale_intercept=float(image.rescale_intercept),
        window_center=float(image.window_center),
        window_width=float(image.window_width),
        pixel_spacing=tuple(float(v) for v in image.pixel_spacing),
    )


_MODALITY = {"cxr": "DX", "mammo": "MG", "ct": "CT", "mr": "MR", "fundus": "OP", "derm": "XC", "smear": "GM"}


def preprocess(spec: Spec, man: Manifest, image: RenderedImage, check_size: bool = True) -> ModelInput:
    """Run the manifest's steps on one rendered image exactly as the node does at serving time."""
    modality = image.attributes.get("modality", _MODALITY[spec.kind])
    return run_steps(
        image.pixels,
        header_for(image, modality),
        man.preprocessing,
        layout="NCHW",
        dtype="float32",
        expected_hw=man.input.spatial if check_size else None,
        expected_channels=man.input.channels,
    )


def render(spec: Spec, seed: int, label: Any = None) -> RenderedStudy:
    """Render one training phantom study in memory with the spec's render options."""
    return render_study(spec.kind, seed, label, **spec.render_options)


def study_seeds(base: int, n: int) -> Iterator[int]:
    """``n`` study seeds drawn from a base seed (the same base always gives the same seeds)."""
    rng = np.random.default_rng(base)
    yield from (int(s) for s in rng.integers(1, 2**31 - 1, size=n))


def image_target(spec: Spec, image: RenderedImage) -> np.ndarray | int:
    """Per-image ground truth: multi-hot vector (multi-label) or class index (multi-class).

    A slice/view is positive when it shows lesion pixels (its boxes); the class is its lesion label.
    """
    names = spec.label_names
    present = {b.label for b in image.boxes} if image.boxes else set()
    if spec.multi_label:
        return np.array([1.0 if n in present else 0.0 for n in names], dtype=np.float32)
    if not present:
        return 0
    # the most severe label present (last in label order)
    return max(names.index(n) for n in present if n in names)


def lesion_area(image: RenderedImage) -> int:
    """Number of lesion pixels (stored-pixel grid) on one image."""
    return int(np.count_nonzero(image.mask))


def box_in_model(box: Any, geom: Any) -> tuple[float, float, float, float]:
    """A stored-pixel box (x0, y0, x1, y1; end exclusive) in model-input pixel edges (y0, x0, y1, x1)."""
    y0 = box.y0 * geom.scale_y + geom.offset_y
    y1 = box.y1 * geom.scale_y + geom.offset_y
    x0 = box.x0 * geom.scale_x + geom.offset_x
    x1 = box.x1 * geom.scale_x + geom.offset_x
    return y0, x0, y1, x1
