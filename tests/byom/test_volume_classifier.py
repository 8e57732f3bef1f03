"""3-D classifiers (MONAI DenseNet121 and EfficientNetBN, spatial_dims=3) through ``convert
torch --input-shape C,D,H,W``: parity passing, a series-level NCDHW manifest the registry
accepts, and the node's analysis of a CT phantom series giving what the PyTorch network gives on
the same volume (the series' prepared slices stacked and resampled along the slice axis as
PyTorch's trilinear ``interpolate`` does)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import need_module

torch = need_module("torch")
need_module("onnx")
need_module("monai")

from converters.cli import convert_torch  # noqa: E402
from converters.common import ConversionError  # noqa: E402
from node.inference.manifest import Manifest  # noqa: E402
from node.inference.registry import load_model  # noqa: E402
from node.inference.runtime import CPU, RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import Stopwatch, analyse, prepare_all  # noqa: E402
from node.runner.segment import stack_volume  # noqa: E402
from node.runner.volume import resample_depth  # noqa: E402
from node.synth import generate_study  # noqa: E402
from tests.byom import archs  # noqa: E402
from tests.byom.conftest import fill_manifest  # noqa: E402

SHAPE = (1, 32, 32, 32)  # C, D, H, W (DenseNet121 halves each side five times)


def test_depth_resampling_is_pytorch_trilinear() -> None:
    rng = np.random.default_rng(3)
    for source, depth in ((40, 16), (7, 16), (16, 16), (1, 4)):
        volume = rng.standard_normal((2, source, 5, 6)).astype(np.float32)
        ours = resample_depth(volume, depth)
        theirs = torch.nn.functional.interpolate(
            torch.from_numpy(volume)[None], size=(depth, 5, 6), mode="trilinear", align_corners=False
        )[0].numpy()
        assert ours.shape == (2, depth, 5, 6)
        assert np.abs(ours - theirs).max() < 1e-5, (source, depth)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("ct3d")
    truth = generate_study("ct", out, seed=11, write_masks=False, slices=40, size=128)
    return [out / i.file for i in truth.instances]


@pytest.mark.parametrize("arch", ["monai_densenet121_3d", "monai_efficientnet_b0_3d"])
def test_volume_classifier_converts_and_runs(arch: str, tmp_path: Path, ct_series: list[Path]) -> None:
    lines: list[str] = []
    out = tmp_path / arch
    convert_torch(out_dir=out, model=f"tests.byom.archs:{arch}", input_shape=SHAPE, echo=lines.append)
    assert any("parity" in line.lower() and "pass" in line.lower() for line in lines), lines
    fill_manifest(out, labels=["finding_a", "finding_b"], modality="CT")
    model = load_model(out)
    manifest = model.manifest
    assert manifest.input.layout == "NCDHW" and manifest.aggregation.level == "series"
    data = manifest.model_dump(mode="json")
    for field, value, why in (
        ("aggregation", {"level": "image"}, "classifies a series"),
        ("heatmap", {"method": "occlusion", "window": [4, 4], "stride": [2, 2]}, "no heatmap yet"),
    ):
        with pytest.raises(ValueError, match=why):
            Manifest.model_validate({**data, field: value})
    session = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    watch = Stopwatch(deadline=time.monotonic() + 120)
    result, sources = analyse(model, session, ct_series, level="series", uid_seed="t", watch=watch)
    assert result.frames_analysed == len(ct_series) == len(sources)
    assert [f.label for f in result.findings] == ["finding_a", "finding_b"]
    assert len(result.images) == 1 and not result.images[0].heatmaps
    assert watch.batches == [1]  # the whole series in one call

    # the same volume through the PyTorch network
    images = prepare_all(ct_series, manifest, False)
    volume = resample_depth(stack_volume(manifest, images), SHAPE[1])
    net = getattr(archs, arch)().eval()
    with torch.no_grad():
        logits = net(torch.from_numpy(volume)[None]).numpy()[0]
    expected = 1.0 / (1.0 + np.exp(-logits))
    got = np.array([f.probability for f in result.findings])
    assert np.abs(got - expected).max() < 1e-4, (got, expected)


def test_volume_classifier_refuses_cam(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no CAM output yet"):
        convert_torch(
            out_dir=tmp_path / "x",
            model="tests.byom.archs:monai_densenet121_3d",
            input_shape=SHAPE,
            cam=True,
            phantom=None,
            echo=lambda s: None,
        )
