"""Real architectures through ``convert torch``: torchvision-layout ResNet-50 and DenseNet-121,
MONAI's DenseNet121 and EfficientNetBN, each with and without the CAM output, parity passing, then
loaded by the registry and analysed by the node; a 3-D classifier given a 2-D shape refused clearly
(volume classifiers: tests/byom/test_volume_classifier.py), segmentation networks pointed to
``--kind segmentation`` (tests/byom/test_segmentation_convert.py).

Random weights with fixed seeds (tests/byom/archs.py), nothing downloaded; 64x64 inputs (the
networks are fully convolutional up to the global pool) keep a 2-core CI machine busy for seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import need_module

torch = need_module("torch")
need_module("onnx")

from converters.cli import convert_torch  # noqa: E402
from converters.common import ConversionError, ort_session  # noqa: E402
from converters.torch_convert import WithCam, find_cam_head, verify_cam_identity  # noqa: E402
from node.inference.registry import load_model  # noqa: E402
from node.inference.runtime import CPU, RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import Stopwatch, analyse  # noqa: E402
from node.synth import generate_study  # noqa: E402
from tests.byom import archs  # noqa: E402
from tests.byom.conftest import fill_manifest  # noqa: E402

ARCHS = {  # factory -> (input C,H,W, expected CAM feature module, relu before the pool)
    "resnet50": ((3, 64, 64), "avgpool", False),
    "densenet121": ((3, 64, 64), "features", True),
    "monai_densenet121": ((1, 64, 64), "class_layers.pool", False),
    "monai_efficientnet_b0": ((1, 64, 64), "_avg_pooling", False),
}
MONAI = {"monai_densenet121", "monai_efficientnet_b0"}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One small chest radiograph phantom."""
    out = tmp_path_factory.mktemp("cxr")
    truth = generate_study("cxr", out, seed=5, write_masks=False, scale=0.1)
    return [out / i.file for i in truth.instances]


def _run_in_node(model_dir: Path, files: list[Path], cam: bool) -> None:
    # without a CAM the scaffold's occlusion map would run the network ~200 times: not the point here
    extra = {} if cam else {"heatmap": {"method": "none"}}
    fill_manifest(model_dir, labels=["finding_a", "finding_b"], **extra)
    model = load_model(model_dir)
    assert (model.manifest.outputs.cam == "cam") is cam
    session = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    result, _ = analyse(
        model, session, files, level="image", uid_seed="t", watch=Stopwatch(deadline=time.monotonic() + 120)
    )
    assert [f.label for f in result.findings] == ["finding_a", "finding_b"]
    assert all(0.0 <= f.probability <= 1.0 for f in result.findings)
    assert len({round(f.probability, 6) for f in result.findings}) == 2  # not a constant output
    methods = {h.method for h in result.images[0].heatmaps}
    assert methods == ({"cam"} if cam else set())


@pytest.mark.parametrize("cam", [False, True], ids=["plain", "cam"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_real_architecture_converts_and_runs(arch: str, cam: bool, tmp_path: Path, study: list[Path]) -> None:
    if arch in MONAI:
        need_module("monai")
    shape, feature_name, relu = ARCHS[arch]
    net = getattr(archs, arch)()
    weights = tmp_path / "w.pt"
    torch.save(net.state_dict(), weights)
    out = tmp_path / arch
    lines: list[str] = []
    result = convert_torch(
        out_dir=out,
        model=f"tests.byom.archs:{arch}",
        weights=weights,
        input_shape=shape,
        cam=cam,
        echo=lines.append,
    )
    assert result.ok, "\n".join(lines)
    assert result.output_names == (["logits", "cam"] if cam else ["logits"])
    assert result.parity[0].max_abs < 1e-4

    # the ONNX graph is the eval-mode network, and its outputs are not vanishingly small (a parity
    # check on outputs of 1e-14, as with MONAI's initialisation, would pass whatever the graph does)
    x = np.random.default_rng(1).standard_normal((2, *shape)).astype(np.float32)
    got = ort_session(out / "model.onnx").run(None, {"image": x})
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(want).max() > 0.05
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-3)
    if cam:
        logits, cam_map = got
        assert cam_map.shape[:2] == (2, 2) and cam_map.shape[2] == cam_map.shape[3] == 2  # 64 / 32
        head = find_cam_head(net, probe=torch.from_numpy(x))
        assert (head.feature_name, head.relu) == (feature_name, relu)
        bias = head.linear.bias.detach().numpy()
        np.testing.assert_allclose(cam_map.mean(axis=(2, 3)) + bias, logits, atol=1e-4)
    _run_in_node(out, study, cam)


def test_torchvision_layouts_match_torchvision() -> None:
    """The helper networks are torchvision's: parameter counts of resnet50()/densenet121() at 1000
    classes (25,557,032 and 7,978,856, torchvision's model cards) and its state_dict key names."""
    r = archs.ResNet((3, 4, 6, 3), 1000)
    d = archs.DenseNet(num_classes=1000)
    assert sum(p.numel() for p in r.parameters()) == 25_557_032
    assert sum(p.numel() for p in d.parameters()) == 7_978_856
    assert sum(p.numel() for n, p in r.named_parameters() if not n.startswith("fc.")) == 23_508_032
    rk, dk = set(r.state_dict()), set(d.state_dict())
    assert len(rk) == 320
    assert {"conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer4.2.bn3.bias"} <= rk
    assert {"fc.weight", "fc.bias"} <= rk
    assert {
        "features.conv0.weight",
        "features.norm0.running_mean",
        "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock4.denselayer16.conv2.weight",
        "features.transition3.conv.weight",
        "features.norm5.bias",
        "classifier.weight",
    } <= dk


def test_densenet_cam_needs_the_relu_before_the_pool() -> None:
    """torchvision DenseNet pools relu(features); a CAM of the features themselves is refused."""
    net = archs.densenet121().eval()
    x = torch.randn(2, 3, 64, 64)
    head = find_cam_head(net, probe=x)
    assert head.source == "module_output" and head.relu
    verify_cam_identity(WithCam(net, head).eval(), x)
    head.relu = False
    with pytest.raises(ConversionError, match="not global-average-pool"):
        verify_cam_identity(WithCam(archs.densenet121().eval(), head).eval(), x)


def test_functional_pool_without_gap_head_is_refused(tmp_path: Path) -> None:
    """A network whose head is not GAP + linear (here: max pool, functional) is refused for --cam."""

    class MaxNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Conv2d(1, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.amax(torch.relu(self.features(x)), dim=(2, 3)))

    with pytest.raises(ConversionError, match="no AdaptiveAvgPool2d"):
        find_cam_head(MaxNet().eval(), probe=torch.randn(2, 1, 16, 16))
    with pytest.raises(ConversionError, match="does not give the logits"):
        find_cam_head(MaxNet().eval(), features_name="features", probe=torch.randn(2, 1, 16, 16))


def test_3d_and_segmentation_networks_are_refused(tmp_path: Path) -> None:
    need_module("monai")
    classifier = r"3-D network \(Conv3d at 'features.conv0'\) and --input-shape is one 2-D image"
    with pytest.raises(ConversionError, match=classifier):
        convert_torch(
            out_dir=tmp_path / "a",
            model="tests.byom.archs:monai_densenet121_3d",
            input_shape=(1, 64, 64),
            phantom=None,
            echo=lambda s: None,
        )
    for name in ("monai_unet", "monai_segresnet"):
        with pytest.raises(ConversionError, match=r"per-pixel scores.*convert it with --kind segmentation"):
            convert_torch(
                out_dir=tmp_path / name,
                model=f"tests.byom.archs:{name}",
                input_shape=(1, 64, 64),
                phantom=None,
                echo=lambda s: None,
            )
