"""``convert monai-bundle``: bundles made with MONAI's own bundle tools (``monai.bundle.init_bundle``
writes configs/metadata.json, configs/inference.json and models/model.pt), converted, accepted by
the registry, run end to end by the node on a CT phantom, and compared with MONAI itself running
the bundle's own preprocessing and network on the same DICOM files."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import need_module

torch = need_module("torch")
need_module("monai")
need_module("onnx")

from monai.bundle import ConfigParser, init_bundle  # noqa: E402

from converters.cli import convert_monai_bundle  # noqa: E402
from converters.common import ConversionError  # noqa: E402
from node.inference.registry import load_model  # noqa: E402
from node.inference.runtime import CPU, RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import Stopwatch, analyse  # noqa: E402
from node.synth import generate_study  # noqa: E402
from tests.byom.archs import trained_looking  # noqa: E402

NETWORK = {
    "_target_": "DenseNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 2,
    "init_features": 8,
    "growth_rate": 8,
    "block_config": [2, 2],
}
METADATA = {
    "name": "CT lesion classifier (test bundle)",
    "version": "0.1.0",
    "task": "Liver lesion present on a CT slice",
    "description": "A bundle made in the tests with random weights.",
    "authors": "tests",
    "data_source": "none: random weights",
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "format": "hounsfield",
                "modality": "CT",
                "num_channels": 1,
                "spatial_shape": [64, 32],
                "dtype": "float32",
                "value_range": [-1, 3],
                "is_patch_data": False,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "probabilities",
                "format": "classes",
                "num_channels": 2,
                "spatial_shape": [2],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_onehot": False,
                "channel_def": {"0": "Liver lesion", "1": "Calcification"},
            }
        },
    },
}
TRANSFORMS = [
    {"_target_": "LoadImaged", "keys": "@image_key", "reader": "PydicomReader", "image_only": True},
    {"_target_": "EnsureChannelFirstd", "keys": "@image_key", "channel_dim": "no_channel"},
    {
        "_target_": "ScaleIntensityRanged",
        "keys": "@image_key",
        "a_min": -200,
        "a_max": 300,
        "b_min": 0.0,
        "b_max": 1.0,
        "clip": True,
    },
    # 512 x 512 -> (x 64, y 32): integer factors, where MONAI's and OpenCV's area resizes agree
    {"_target_": "Resized", "keys": "@image_key", "spatial_size": [64, 32], "mode": "area"},
    {"_target_": "NormalizeIntensityd", "keys": "@image_key", "subtrahend": 0.25, "divisor": 0.5},
    {"_target_": "CastToTyped", "keys": "@image_key", "dtype": "$torch.float32"},
    {"_target_": "EnsureTyped", "keys": "@image_key"},
]
INFERENCE = {
    "imports": ["$import torch"],
    "bundle_root": ".",
    "device": "$torch.device('cpu')",
    "image_key": "image",
    "network_def": NETWORK,
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": TRANSFORMS},
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}],
    },
}


def make_bundle(
    root: Path, *, inference: dict | None = None, metadata: dict | None = None, seed: int = 3
) -> Path:
    """A bundle written by MONAI's init_bundle, with the network's (trained-looking) weights."""
    inference = inference or INFERENCE
    parser = ConfigParser(copy.deepcopy(inference))
    torch.manual_seed(seed)
    net = trained_looking(parser.get_parsed_content("network_def"), seed)
    with torch.no_grad():  # a confident head: outputs that differ between slices (and orientations)
        for m in net.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(40.0)
    init_bundle(root, network=net, metadata_str=metadata or METADATA, inference_str=inference)
    return root


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A CT phantom series (512 x 512, a few slices)."""
    out = tmp_path_factory.mktemp("ct")
    truth = generate_study("ct", out, seed=2, write_masks=False, slices=4)
    return [out / i.file for i in truth.instances]


def monai_reference(bundle: Path, files: list[Path]) -> np.ndarray:
    """MONAI itself: the bundle's preprocessing and network (its weights), sigmoid, per file."""
    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    pre = parser.get_parsed_content("preprocessing")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    rows = []
    with torch.no_grad():
        for f in files:
            image = pre({"image": str(f)})["image"]
            assert tuple(image.shape) == (1, 64, 32)  # MONAI's (channel, x, y)
            rows.append(torch.sigmoid(net(image.as_tensor()[None]))[0].numpy())
    return np.stack(rows)


def test_bundle_converts_and_runs_like_monai(tmp_path: Path, ct_series: list[Path]) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    out = tmp_path / "models" / "ct-bundle"
    lines: list[str] = []
    result = convert_monai_bundle(bundle_dir=bundle, out_dir=out, cam=True, echo=lines.append)
    assert result.ok, "\n".join(lines)
    assert any("ScaleIntensityRanged" in line and "window + normalize" in line for line in lines)

    model = load_model(out)  # accepted as written: nothing to fill in
    m = model.manifest
    assert [step.op for step in m.preprocessing] == [
        "modality_lut",
        "window",
        "normalize",
        "resize",
        "normalize",
    ]
    assert tuple(m.input.shape) == (None, 1, 32, 64)  # rows (MONAI's y), columns (MONAI's x)
    assert [lb.name for lb in m.labels] == ["liver_lesion", "calcification"]
    assert m.labels[0].code.meaning == "Liver lesion"
    assert (m.kind, m.outputs.activation, m.outputs.cam) == ("multi_label", "sigmoid", "cam")
    assert m.routing.modalities == ["CT"] and m.aggregation.level == "series"
    assert m.version == "0.1.0" and m.research_use_only

    session = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    analysis, _ = analyse(
        model,
        session,
        ct_series,
        level="series",
        uid_seed="b",
        watch=Stopwatch(deadline=time.monotonic() + 60),
    )
    want = monai_reference(bundle, ct_series)
    assert np.ptp(want, axis=0).max() > 1e-3  # the slices differ, so a per-slice mix-up would show
    got = {f.label: f.probability for f in analysis.findings}
    np.testing.assert_allclose([got["liver_lesion"], got["calcification"]], want.max(axis=0), atol=2e-5)
    by_uid = {img.sop_instance_uid: img for img in analysis.images}
    import pydicom

    checked = 0
    for f, row in zip(ct_series, want, strict=True):
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        if uid in by_uid:
            np.testing.assert_allclose([s.probability for s in by_uid[uid].scores], row, atol=2e-5)
            checked += 1
    assert checked >= 1
    heat = analysis.images[0].heatmaps
    assert heat and heat[0].method == "cam"


def _with_transforms(transforms: list[dict]) -> dict:
    inference = copy.deepcopy(INFERENCE)
    inference["preprocessing"]["transforms"] = transforms
    return inference


def test_unmappable_transforms_are_named(tmp_path: Path) -> None:
    transforms = copy.deepcopy(TRANSFORMS)
    transforms.insert(2, {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RA"})
    transforms.insert(3, {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [0.8, 0.8]})
    transforms[5] = {"_target_": "NormalizeIntensityd", "keys": "@image_key"}  # per-image z-score
    bundle = make_bundle(tmp_path / "b", inference=_with_transforms(transforms))
    with pytest.raises(ConversionError) as err:
        convert_monai_bundle(bundle_dir=bundle, out_dir=tmp_path / "out", echo=lambda s: None)
    text = str(err.value)
    assert "Orientationd (preprocessing transform 2): needs an op reorienting" in text
    assert "Spacingd (preprocessing transform 3): needs an op resampling to a pixel spacing" in text
    assert "NormalizeIntensityd (preprocessing transform 5)" in text and "z-score" in text
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_3d_bundles_are_refused_and_per_pixel_networks_become_segmentation(tmp_path: Path) -> None:
    meta3d = copy.deepcopy(METADATA)
    meta3d["network_data_format"]["inputs"]["image"]["spatial_shape"] = [96, 96, 64]
    inf3d = copy.deepcopy(INFERENCE)
    inf3d["network_def"] = {**NETWORK, "spatial_dims": 3}
    bundle = make_bundle(tmp_path / "b3", inference=inf3d, metadata=meta3d)
    with pytest.raises(ConversionError, match=r"3-D bundle.*convert torch --kind segmentation"):
        convert_monai_bundle(bundle_dir=bundle, out_dir=tmp_path / "o3", echo=lambda s: None)

    # a UNet in a bundle whose metadata still says 'probabilities': found by its per-pixel output
    seg = copy.deepcopy(INFERENCE)
    seg["network_def"] = {
        "_target_": "UNet",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": 2,
        "channels": [8, 16],
        "strides": [2],
    }
    bundle = make_bundle(tmp_path / "bs", inference=seg)
    result = convert_monai_bundle(bundle_dir=bundle, out_dir=tmp_path / "os", echo=lambda s: None)
    assert result.ok
    m = load_model(tmp_path / "os").manifest
    assert (m.kind, m.outputs.activation) == ("segmentation", "sigmoid")  # Activationsd sigmoid
    assert [lb.name for lb in m.labels] == ["liver_lesion", "calcification"]


def test_cli_softmax_bundle_without_clip(tmp_path: Path) -> None:
    """A softmax bundle through ``pacs-node convert monai-bundle``; the normal class is found by
    name; an unclipped ScaleIntensityRange becomes one normalize step that reproduces it."""
    from typer.testing import CliRunner

    from node.cli import app
    from node.inference.preprocess import run_steps
    from node.types import ImageHeader

    transforms = copy.deepcopy(TRANSFORMS)
    transforms[2]["clip"] = False
    inference = _with_transforms(transforms)
    inference["postprocessing"]["transforms"] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True}
    ]
    meta = copy.deepcopy(METADATA)
    meta["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "Normal", "1": "Lesion"}
    bundle = make_bundle(tmp_path / "b", inference=inference, metadata=meta)
    out = tmp_path / "m"
    res = CliRunner().invoke(app, ["convert", "monai-bundle", str(bundle), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "parity PASS" in res.output
    model = load_model(out)
    assert model.manifest.kind == "multi_class" and model.manifest.outputs.activation == "softmax"
    assert [(lb.name, lb.normal, lb.triage) for lb in model.manifest.labels] == [
        ("normal", True, False),
        ("lesion", False, True),
    ]
    steps = [s for s in model.manifest.preprocessing if s.op == "normalize"]
    assert len(steps) == 2 and [s.op for s in model.manifest.preprocessing].count("window") == 0
    hu = np.array([[-1000.0, -200.0, 50.0, 300.0, 2000.0]], dtype=np.float32)
    header = ImageHeader.__new__(ImageHeader)  # only what modality_lut-free steps read
    pre = run_steps(hu, header, [steps[0]], expected_hw=None)
    np.testing.assert_allclose(pre.tensor.ravel(), (hu.ravel() + 200.0) / 500.0, rtol=1e-5, atol=1e-6)

    again = CliRunner().invoke(app, ["convert", "monai-bundle", str(tmp_path / "nothing"), "--out", str(out)])
    assert again.exit_code == 2 and "not a MONAI bundle" in again.output
