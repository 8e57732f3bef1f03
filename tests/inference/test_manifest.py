"""The manifest schema: the YAML example validates; broken manifests are refused naming the field."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml

from node.errors import ManifestError
from node.inference.manifest import (
    CamHeatmap,
    LetterboxStep,
    Manifest,
    WindowStep,
    load_manifest,
    parse_manifest,
)
from node.inference.preprocess import WINDOW_PRESETS

from .conftest import EXAMPLE_MANIFEST_YAML

SRC = "models/onnx/cxr/manifest.yaml"


def refused(data: dict) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, SRC)
    return str(info.value)


def test_example_validates(tmp_path):
    path = tmp_path / "manifest.yaml"
    path.write_text(EXAMPLE_MANIFEST_YAML)
    m = load_manifest(path)
    assert isinstance(m, Manifest)
    assert m.id == "cxr-demo" and m.research_use_only is True
    assert m.provenance.created == dt.date(2026, 11, 1)
    assert m.input.channels == 3 and m.input.spatial == (32, 32)
    assert isinstance(m.preprocessing[4], LetterboxStep) and m.preprocessing[4].size == (32, 32)
    assert isinstance(m.preprocessing[1], WindowStep)
    assert isinstance(m.heatmap, CamHeatmap)
    assert [lb.name for lb in m.labels] == ["nodule", "effusion"]
    assert m.labels[0].code.scheme_designator == "SCT"
    assert m.n_outputs == 2
    assert m.routing.modalities == ["CR", "DX"]


def test_defaults(manifest_dict):
    for key in ("heatmap", "aggregation", "routing", "research_use_only"):
        del manifest_dict[key]
    m = parse_manifest(manifest_dict)
    assert m.research_use_only is True
    assert m.heatmap.method == "none"
    assert (m.aggregation.level, m.aggregation.method, m.aggregation.keep_top_slices) == ("image", "max", 1)


def test_bad_threshold_message(manifest_dict):
    manifest_dict["labels"][0]["threshold"] = 1.5
    assert refused(manifest_dict) == (
        "models/onnx/cxr/manifest.yaml: labels.0.threshold: "
        "Input should be less than or equal to 1 (found 1.5)"
    )


def test_unknown_op(manifest_dict):
    manifest_dict["preprocessing"][2] = {"op": "sharpen", "amount": 2}
    msg = refused(manifest_dict)
    assert msg.startswith(f"{SRC}: preprocessing.2: Input tag 'sharpen' found using 'op' does not match")


def test_bad_step_parameter(manifest_dict):
    manifest_dict["preprocessing"][3]["clip_limit"] = -1
    assert refused(manifest_dict) == (
        f"{SRC}: preprocessing.3.clahe.clip_limit: Input should be greater than 0 (found -1)"
    )


def test_missing_field(manifest_dict):
    del manifest_dict["labels"][1]["code"]
    assert refused(manifest_dict) == f"{SRC}: labels.1.code: Field required"


def test_missing_top_level_field(manifest_dict):
    del manifest_dict["model"]
    assert refused(manifest_dict) == f"{SRC}: model: Field required"


def test_extra_field_forbidden(manifest_dict):
    manifest_dict["labels"][0]["colour"] = "red"
    assert refused(manifest_dict) == f"{SRC}: labels.0.colour: Extra inputs are not permitted (found 'red')"


def test_bad_sha_format(manifest_dict):
    manifest_dict["model"]["sha256"] = "abc"
    assert refused(manifest_dict).startswith(f"{SRC}: model.sha256: String should match pattern")


def test_several_errors_one_line_each(manifest_dict):
    manifest_dict["labels"][0]["threshold"] = -0.1
    manifest_dict["input"]["dtype"] = "int7"
    lines = refused(manifest_dict).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{SRC}: input.dtype: Input should be 'float32', 'float16' or 'uint8'")
    assert lines[1].startswith(f"{SRC}: labels.0.threshold: Input should be greater than or equal to 0")


def test_unknown_scheme(manifest_dict):
    manifest_dict["labels"][0]["code"]["scheme_designator"] = "LOINC"
    assert (
        "labels.0.code.scheme_designator: Input should be 'SCT', 'DCM', 'RADLEX' or '99PACSNODE'"
        in refused(manifest_dict)
    )


def test_batch_dim_must_be_dynamic(manifest_dict):
    manifest_dict["input"]["shape"] = [4, 3, 32, 32]
    assert refused(manifest_dict) == (
        f"{SRC}: input.shape.0: the batch dimension must be dynamic (null or a name) (found 4)"
    )
    manifest_dict["input"]["shape"] = ["batch", 3, 32]
    assert "input.shape: List should have at least 4 items" in refused(manifest_dict)


def test_cross_field_checks(manifest_dict):
    d = yaml.safe_load(yaml.safe_dump(manifest_dict))
    d["outputs"]["cam"] = None
    assert refused(d) == f"{SRC}: outputs.cam: required when heatmap.method is 'cam'"

    d = yaml.safe_load(yaml.safe_dump(manifest_dict))
    d["labels"][1]["index"] = 0
    assert refused(d) == f"{SRC}: labels.1.index: duplicate of labels.0 (found 0)"

    d = yaml.safe_load(yaml.safe_dump(manifest_dict))
    d["outputs"]["activation"] = "softmax"
    assert (
        refused(d)
        == f"{SRC}: outputs.activation: a multi_label model uses sigmoid (or none) (found 'softmax')"
    )

    d = yaml.safe_load(yaml.safe_dump(manifest_dict))
    d["aggregation"] = {"level": "series", "method": "top_k_mean"}
    assert refused(d) == f"{SRC}: aggregation.k: required when method is 'top_k_mean'"


def test_multi_class_needs_one_normal(manifest_dict):
    manifest_dict["kind"] = "multi_class"
    manifest_dict["outputs"]["activation"] = "softmax"
    assert (
        refused(manifest_dict)
        == f"{SRC}: labels: a multi_class model needs exactly one normal label (found 0)"
    )
    manifest_dict["labels"][1]["normal"] = True
    m = parse_manifest(manifest_dict)
    assert m.kind == "multi_class" and m.labels[1].normal


def test_window_step_fields(manifest_dict):
    manifest_dict["preprocessing"][1] = {"op": "window", "source": "preset", "preset": "spleen"}
    assert refused(manifest_dict).startswith(
        f"{SRC}: preprocessing.1.window.preset: unknown window preset; known: abdomen, bone, brain"
    )
    manifest_dict["preprocessing"][1] = {"op": "window", "source": "explicit", "width": 400}
    assert (
        refused(manifest_dict) == f"{SRC}: preprocessing.1.window.center: required when source is 'explicit'"
    )
    manifest_dict["preprocessing"][1] = {"op": "window", "source": "preset", "preset": "liver"}
    assert parse_manifest(manifest_dict).preprocessing[1].preset == "liver"


def test_to_8bit_needs_bounds(manifest_dict):
    manifest_dict["preprocessing"][1] = {"op": "to_8bit", "method": "mix", "low": 100}
    assert refused(manifest_dict) == f"{SRC}: preprocessing.1.to_8bit.high: required for method 'mix'"


def test_patch_size_must_match_input(manifest_dict):
    manifest_dict["heatmap"] = {"method": "patch", "patch_size": [16, 16], "stride": [8, 8]}
    assert refused(manifest_dict) == (
        f"{SRC}: heatmap.patch_size: must equal the input's spatial size (32, 32) (found [16, 16])"
    )
    manifest_dict["heatmap"]["patch_size"] = [32, 32]
    assert parse_manifest(manifest_dict).heatmap.batch_size == 32


def test_strict_bool(manifest_dict):
    manifest_dict["labels"][0]["triage"] = "yes please"
    assert "labels.0.triage: Input should be a valid boolean" in refused(manifest_dict)


def test_yaml_errors(tmp_path):
    p = tmp_path / "manifest.yaml"
    p.write_text("id: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ManifestError, match="\\(top level\\): expected a mapping \\(found list\\)"):
        load_manifest(p)
    with pytest.raises(ManifestError, match="manifest .*missing.yaml does not exist"):
        load_manifest(tmp_path / "missing.yaml")


def test_presets_table_is_complete():
    assert {"liver", "abdomen", "brain", "lung", "bone", "mediastinum"} <= set(WINDOW_PRESETS)
    assert all(w >= 1 for _, w in WINDOW_PRESETS.values())


def test_the_manifest_does_not_import_the_preprocessing_it_describes() -> None:
    """The vocabulary (window presets, colour and greyscale ops) is the manifest's; preprocess
    imports it, not the other way round (no import circle)."""
    import subprocess
    import sys

    probe = "import sys, node.inference.manifest; print('node.inference.preprocess' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from node.inference import manifest, preprocess

    assert preprocess.WINDOW_PRESETS is manifest.WINDOW_PRESETS
