"""The manifest schema of 3-D segmentation models (``segmentation.dimensions: 3``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.errors import ManifestError
from node.inference.manifest import parse_manifest

LIVER = Path(__file__).resolve().parents[2] / "models" / "onnx" / "ct-liver-seg" / "manifest.yaml"


def _base_2d() -> dict[str, Any]:
    return yaml.safe_load(LIVER.read_text(encoding="utf-8"))


def _base_3d() -> dict[str, Any]:
    data = _base_2d()
    data["input"] = {"name": "image", "shape": [None, 1, None, None, None], "layout": "NCDHW"}
    seg = data["segmentation"]
    seg.pop("min_area_px")
    seg.update({"dimensions": 3, "roi_size": [16, 64, 64], "min_volume_voxels": 20, "batch_size": 2})
    return data


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data, "m.yaml")
    return str(exc.value)


def test_3d_manifest_parses_with_defaults() -> None:
    m = parse_manifest(_base_3d(), "m.yaml")
    spec = m.segmentation
    assert spec is not None and spec.dimensions == 3
    assert spec.overlap == 0.25 and spec.blend == "gaussian" and spec.output == "binary"
    assert m.roi_size == (16, 64, 64)
    assert m.input.is_volume and m.input.channels == 1 and m.input.slice_layout == "NCHW"
    assert m.input.spatial == (None, None) and m.input.spatial3d == (None, None, None)


def test_roi_defaults_to_fixed_input_dims() -> None:
    data = _base_3d()
    data["input"]["shape"] = [None, 1, 32, 128, 128]
    del data["segmentation"]["roi_size"]
    m = parse_manifest(data, "m.yaml")
    assert m.roi_size == (32, 128, 128)
    assert m.input.spatial == (128, 128)


def test_2d_manifest_unchanged() -> None:
    m = parse_manifest(_base_2d(), "m.yaml")
    assert m.segmentation is not None and m.segmentation.dimensions == 2 and m.roi_size is None
    assert m.segmentation.output == "binary"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["segmentation"].pop("roi_size"), "segmentation.roi_size: required when a spatial input"),
        (
            lambda d: (
                d["input"].update(shape=[None, 1, 32, None, None])
                or d["segmentation"].update(roi_size=[16, 64, 64])
            ),
            "segmentation.roi_size.0: must equal the input's fixed dimension input.shape.2 (32) (found 16)",
        ),
        (lambda d: d["input"].update(layout="NCHW"), "input.shape: layout NCHW needs 4 dimensions"),
        (
            lambda d: d["input"].update(shape=[None, 1, 64, 64]),
            "input.shape: layout NCDHW needs 5 dimensions",
        ),
        (lambda d: d["input"].update(shape=[None, None, 16, 64, 64]), "input.shape.1: the channel dimension"),
        (
            lambda d: d["segmentation"].update(overlap=1.0),
            "segmentation.overlap: Input should be less than 1",
        ),
        (
            lambda d: d["segmentation"].update(blend="linear"),
            "segmentation.blend: Input should be 'gaussian'",
        ),
        (lambda d: d["segmentation"].update(output="soft"), "segmentation.output: Input should be 'binary'"),
        (lambda d: d["segmentation"].update(min_area_px=5), "segmentation.min_area_px: a 3-D model removes"),
        (
            lambda d: d["segmentation"].update(roi_size=[16, 0, 64]),
            "segmentation.roi_size.1: Input should be greater",
        ),
    ],
)
def test_3d_problems(edit: Any, expected: str) -> None:
    data = _base_3d()
    edit(data)
    assert expected in _error(data)


@pytest.mark.parametrize(
    ("field", "value"),
    [("roi_size", [8, 8, 8]), ("overlap", 0.5), ("blend", "constant"), ("min_volume_voxels", 3)],
)
def test_3d_fields_refused_in_2d(field: str, value: Any) -> None:
    data = _base_2d()
    data["segmentation"][field] = value
    assert f"segmentation.{field}: only a 3-D model (dimensions: 3) has this field" in _error(data)


def test_2d_model_cannot_take_a_volume() -> None:
    data = _base_3d()
    data["segmentation"] = {
        k: v for k, v in data["segmentation"].items() if k not in ("roi_size", "min_volume_voxels")
    }
    data["segmentation"]["dimensions"] = 2
    assert "input.layout: NCDHW is for 3-D segmentation models" in _error(data)
    data = copy.deepcopy(_base_2d())
    data["segmentation"]["dimensions"] = 3
    del data["segmentation"]["min_area_px"]
    assert "input.layout: a 3-D segmentation model (dimensions: 3) takes NCDHW" in _error(data)


def test_fractional_2d_allowed() -> None:
    data = _base_2d()
    data["segmentation"]["output"] = "fractional"
    assert parse_manifest(data, "m.yaml").segmentation.output == "fractional"  # type: ignore[union-attr]
