"""The registry: sha256, graph-vs-manifest checks, strict and lenient loading."""

from __future__ import annotations

import pytest

from node.errors import ManifestError
from node.inference.registry import load_model, load_registry

from .conftest import make_cam_model, make_rank3_model


def test_good_model_loads(make_model_dir):
    folder = make_model_dir()
    model = load_model(folder)
    assert model.id == "cxr-demo"
    assert model.fixed_batch is None
    assert [i.name for i in model.inputs] == ["image"]
    assert {o.name for o in model.outputs} == {"logits", "cam"}
    assert model.inputs[0].dtype == "float32"


def refusal(folder) -> str:
    with pytest.raises(ManifestError) as info:
        load_model(folder)
    return str(info.value)


def test_sha_mismatch(make_model_dir):
    msg = refusal(make_model_dir(sha256="ab" * 32))
    assert "model 'cxr-demo'" in msg
    assert "model.sha256: does not match model.onnx (manifest abababababab..., file " in msg


def test_input_name_the_graph_lacks(make_model_dir):
    msg = refusal(make_model_dir(onnx_bytes=make_cam_model(input_name="pixels")))
    assert "model 'cxr-demo'" in msg
    assert "input.name: 'image' is not an input of the graph (inputs: ['pixels'])" in msg


def test_wrong_rank(make_model_dir):
    msg = refusal(make_model_dir(onnx_bytes=make_rank3_model()))
    assert "input.shape: rank 4 in the manifest, 3 in the graph [?, 32, 32]" in msg


def test_wrong_spatial_dim(make_model_dir):
    def edit(d):
        d["input"]["shape"] = [None, 3, 64, 64]
        d["preprocessing"][4]["size"] = [64, 64]

    msg = refusal(make_model_dir(edit=edit))
    assert "input.shape.2: 64 in the manifest, 32 in the graph [?, 3, 32, 32]" in msg
    assert "input.shape.3: 64 in the manifest, 32 in the graph" in msg


def test_wrong_dtype_and_missing_outputs(make_model_dir):
    def edit(d):
        d["input"]["dtype"] = "uint8"
        d["outputs"]["probabilities"] = "probs"
        d["outputs"]["cam"] = "maps"

    msg = refusal(make_model_dir(edit=edit))
    assert "input.dtype: uint8 in the manifest, float32 in the graph" in msg
    assert "outputs.probabilities: 'probs' is not an output of the graph (outputs: ['cam', 'logits'])" in msg
    assert "outputs.cam: 'maps' is not an output of the graph" in msg


def test_label_index_beyond_outputs(make_model_dir):
    def edit(d):
        d["labels"][1]["index"] = 5

    assert "labels: label indices need 6 outputs; the graph has 2" in refusal(make_model_dir(edit=edit))


def test_cam_output_rank_is_checked(make_model_dir):
    def edit(d):
        d["outputs"]["cam"] = "logits"

    assert "outputs.cam: expected rank 4 (batch, labels, h, w), the graph has [?, 2]" in refusal(
        make_model_dir(edit=edit)
    )


def test_id_must_match_folder(make_model_dir):
    def edit(d):
        d["id"] = "other"

    assert "id: 'other' does not match the folder name 'cxr-demo'" in refusal(make_model_dir(edit=edit))


def test_bad_manifest_names_file_and_field(make_model_dir):
    def edit(d):
        d["labels"][0]["threshold"] = 1.5

    folder = make_model_dir(edit=edit)
    assert (
        f"{folder / 'manifest.yaml'}: labels.0.threshold: Input should be less than or equal to 1 (found 1.5)"
        in (refusal(folder))
    )


def test_unreadable_onnx(make_model_dir):
    folder = make_model_dir(onnx_bytes=b"not an onnx graph")
    assert "ONNX Runtime cannot open the model" in refusal(folder)


def test_lenient_loads_the_good_and_reports_the_bad(make_model_dir, tmp_path, caplog):
    make_model_dir("good")
    make_model_dir("bad", sha256="00" * 32)
    (tmp_path / "onnx" / "empty").mkdir()
    registry = load_registry(tmp_path / "onnx")
    assert list(registry.models) == ["good"]
    assert set(registry.refused) == {"bad", "empty"}
    assert "model.sha256" in registry.refused["bad"]
    assert "manifest.yaml is missing" in registry.refused["empty"]
    assert registry.get("good").id == "good"
    with pytest.raises(ManifestError, match="model 'bad' was refused at start-up"):
        registry.get("bad")
    with pytest.raises(ManifestError, match="no model 'nope'"):
        registry.get("nope")
    assert "refused model bad" in caplog.text


def test_strict_refuses_to_start(make_model_dir, tmp_path):
    make_model_dir("good")
    make_model_dir("bad", onnx_bytes=make_cam_model(input_name="x"))
    with pytest.raises(ManifestError, match="model 'bad'.*input.name"):
        load_registry(tmp_path / "onnx", strict=True)


def test_missing_root(tmp_path):
    assert not load_registry(tmp_path / "nothing").models
    with pytest.raises(ManifestError, match="does not exist"):
        load_registry(tmp_path / "nothing", strict=True)
