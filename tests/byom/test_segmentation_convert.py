"""``convert torch --kind segmentation``: MONAI's UNet and SegResNet, 2-D and 3-D, converted with
parity on the per-pixel output (max abs and per-pixel class agreement), written as ``kind:
segmentation`` manifests the registry accepts; the 2-D ones run through the node's analysis on a
CT phantom series into masks, a DICOM SEG and an SR; ``--cam`` refused by name.

Random weights with fixed seeds (tests/byom/archs.py), small channels and inputs (2-D 1x64x64,
3-D 1x32x64x64), one torch thread.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import need_module

torch = need_module("torch")
need_module("onnx")
need_module("monai")

from converters.cli import convert_torch  # noqa: E402
from converters.common import ConversionError, ort_session  # noqa: E402
from converters.segmentation import LabelOptions, SegmentationOptions  # noqa: E402
from node.inference.manifest import parse_manifest  # noqa: E402
from node.inference.registry import load_model  # noqa: E402
from node.inference.runtime import CPU, RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import Stopwatch, analyse  # noqa: E402
from node.synth import generate_study  # noqa: E402
from tests.byom import archs  # noqa: E402
from tests.byom.conftest import fill_segmentation_manifest  # noqa: E402

log = logging.getLogger(__name__)
LIVER = ["--code", "liver=SCT:10200004:Liver", "--category", "SCT:91723000:Anatomical structure"]


def _labels() -> LabelOptions:
    return LabelOptions.parse(
        "background,liver", ["liver=SCT:10200004:Liver"], ["SCT:91723000:Anatomical structure"]
    )


def _convert(arch: str, shape: tuple[int, ...], out: Path, **seg: object) -> tuple[object, list[str]]:
    lines: list[str] = []
    result = convert_torch(
        out_dir=out,
        model=f"tests.byom.archs:{arch}",
        input_shape=shape,
        segmentation=SegmentationOptions(**{"background_index": 0, **seg}),  # type: ignore[arg-type]
        label_options=_labels(),
        echo=lines.append,
    )
    return result, lines


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small CT phantom series (4 slices of 256 x 256)."""
    out = tmp_path_factory.mktemp("ct")
    truth = generate_study("ct", out, seed=4, write_masks=False, slices=4, size=256)
    return [out / i.file for i in truth.instances]


@pytest.mark.parametrize("arch", ["monai_unet", "monai_segresnet"])
def test_2d_segmentation_converts_and_runs(arch: str, tmp_path: Path, ct_series: list[Path]) -> None:
    out = tmp_path / arch
    result, lines = _convert(arch, (1, 64, 64), out, min_area_px=4)
    assert result.ok, "\n".join(lines)
    parity = result.parity[0]
    assert parity.max_abs < 1e-4 and parity.agreement is not None and parity.agreement >= 0.999
    assert any("per-pixel class agreement" in line for line in lines)

    # the graph is the eval-mode network, at the input's size, and not a constant
    x = np.random.default_rng(1).standard_normal((2, 1, 64, 64)).astype(np.float32)
    got = ort_session(out / "model.onnx").run(None, {"image": x})[0]
    with torch.no_grad():
        want = getattr(archs, arch)().eval()(torch.from_numpy(x)).numpy()
    assert got.shape == (2, 2, 64, 64)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    assert 0.05 < (want.argmax(axis=1) == 1).mean() < 0.95

    data = fill_segmentation_manifest(out)
    assert data["kind"] == "segmentation" and data["heatmap"] == {"method": "none"}
    assert data["segmentation"]["background_index"] == 0 and data["segmentation"]["min_area_px"] == 4
    model = load_model(out)
    m = model.manifest
    assert (m.outputs.activation, m.segmentation.dimensions, m.input.layout) == ("softmax", 2, "NCHW")
    assert [(lb.name, lb.index, lb.code.value, lb.category.value) for lb in m.labels] == [
        ("liver", 1, "10200004", "91723000")
    ]
    session = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    analysis, sources = analyse(
        model, session, ct_series, level="series", uid_seed="s", watch=Stopwatch(time.monotonic() + 60)
    )
    seg = analysis.segmentation
    assert seg is not None and analysis.frames_analysed == len(ct_series)
    assert seg.segments[0].label == "liver" and seg.segments[0].pixels > 0
    masks = [f.masks for f in seg.frames if f.masks is not None]
    assert masks and masks[0].shape == (1, 256, 256)
    assert [f.label for f in analysis.findings] == ["liver"] and analysis.findings[0].positive

    from node.runner import build_outputs
    from node.settings import Settings
    from tests.outputs.fabricate import IDENTITY

    built = dict(build_outputs(analysis, sources, IDENTITY, Settings()))
    assert {"seg", "sr"} <= set(built)
    assert built["seg"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage


@pytest.fixture(scope="module")
def ct_volume(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A CT phantom series of 40 slices of 128 x 128 (more slices than the 32-slice window)."""
    out = tmp_path_factory.mktemp("ctv")
    truth = generate_study("ct", out, seed=6, write_masks=False, slices=40, size=128)
    return [out / i.file for i in truth.instances]


@pytest.mark.parametrize("arch", ["monai_unet_3d", "monai_segresnet_3d"])
def test_3d_segmentation_converts_and_runs(arch: str, tmp_path: Path, ct_volume: list[Path]) -> None:
    out = tmp_path / arch
    result, lines = _convert(arch, (1, 32, 64, 64), out, min_volume_voxels=20, overlap=0.5, blend="constant")
    assert result.ok, "\n".join(lines)
    assert result.parity[0].max_abs < 1e-4 and result.parity[0].agreement >= 0.999
    assert any("phantom-ct" in line for line in lines)  # a stack of CT phantom slices
    got = ort_session(out / "model.onnx").run(None, {"image": np.zeros((1, 1, 32, 64, 64), np.float32)})[0]
    assert got.shape == (1, 2, 32, 64, 64)

    data = fill_segmentation_manifest(out)
    assert data["input"]["shape"] == [None, 1, 32, 64, 64] and data["input"]["layout"] == "NCDHW"
    assert data["segmentation"] | {"series_description": None} == {
        "dimensions": 3,
        "background_index": 0,
        "roi_size": [32, 64, 64],
        "overlap": 0.5,
        "blend": "constant",
        "min_volume_voxels": 20,
        "batch_size": 4,
        "series_description": None,
    }
    m = parse_manifest(data, "m.yaml")
    assert m.roi_size == (32, 64, 64)
    model = load_model(out)  # the registry checks the graph (rank-5 output) against the manifest
    assert model.manifest.segmentation.dimensions == 3

    # the node's 3-D path (slices prepared, stacked, sliding window) against MONAI's
    # sliding_window_inference of the torch network over the same volume, then analyse's masks
    from monai.inferers import sliding_window_inference

    from node.runner.analyse import prepare_all
    from node.runner.segment import stack_volume, volume_logits

    images = prepare_all(ct_volume, model.manifest, False)
    volume = stack_volume(model.manifest, images)
    assert volume.shape == (1, len(ct_volume), 64, 64)
    session = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    batches: list[int] = []
    got = volume_logits(model.manifest, session, volume, batches)
    net = getattr(archs, arch)().eval()
    with torch.no_grad():
        want = sliding_window_inference(
            torch.from_numpy(volume)[None], (32, 64, 64), 4, net, overlap=0.5, mode="constant"
        )[0].numpy()
    assert len(batches) >= 1 and sum(batches) >= 2  # more than one window along the slices
    agreement = float((got.argmax(axis=0) == want.argmax(axis=0)).mean())
    log.info(
        "%s: node 3-D path vs MONAI sliding_window_inference: max abs %.2e, agreement %.6f",
        arch,
        float(np.abs(got - want).max()),
        agreement,
    )
    assert agreement >= 0.999 and np.abs(got - want).max() < 1e-3
    assert 0.02 < (want.argmax(axis=0) == 1).mean() < 0.98
    analysis, sources = analyse(
        model, session, ct_volume, level="series", uid_seed="v", watch=Stopwatch(time.monotonic() + 120)
    )
    seg = analysis.segmentation
    assert seg is not None and analysis.frames_analysed == len(ct_volume)
    assert seg.segments[0].pixels > 0 and seg.segments[0].volume_mm3 is not None
    from node.runner import build_outputs
    from node.settings import Settings
    from tests.outputs.fabricate import IDENTITY

    assert {"seg", "sr"} <= set(dict(build_outputs(analysis, sources, IDENTITY, Settings())))


def test_cam_and_3d_classifiers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"--cam is for classifiers.*drop --cam"):
        convert_torch(
            out_dir=tmp_path / "a",
            model="tests.byom.archs:monai_unet",
            input_shape=(1, 64, 64),
            cam=True,
            segmentation=SegmentationOptions(background_index=0),
            echo=lambda s: None,
        )
    # a 3-D classifier given one slice (C,H,W) is pointed to C,D,H,W (tests/byom/test_volume_classifier.py)
    with pytest.raises(ConversionError, match=r"3-D network \(Conv3d at 'features.conv0'\).*give .*C,D,H,W"):
        convert_torch(
            out_dir=tmp_path / "b",
            model="tests.byom.archs:monai_densenet121_3d",
            input_shape=(1, 64, 64),
            phantom=None,
            echo=lambda s: None,
        )
    # a 3-D segmentation network given one slice, a classifier given --kind segmentation
    with pytest.raises(ConversionError, match=r"3-D network.*give the network's volume input as C,D,H,W"):
        _convert("monai_unet_3d", (1, 64, 64), tmp_path / "d")
    with pytest.raises(ConversionError, match=r"a classifier, not a segmentation network"):
        convert_torch(
            out_dir=tmp_path / "e",
            model="tests.byom.archs:monai_densenet121",
            input_shape=(1, 64, 64),
            segmentation=SegmentationOptions(background_index=0),
            phantom=None,
            echo=lambda s: None,
        )


def test_segmentation_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"2 channels of logits.*--activation softmax --background-in"):
        convert_torch(
            out_dir=tmp_path / "a",
            model="tests.byom.archs:monai_segresnet",
            input_shape=(1, 32, 32),
            segmentation=SegmentationOptions(),
            echo=lambda s: None,
        )
    with pytest.raises(ConversionError, match=r"--labels names 3 channels.*outputs 2"):
        convert_torch(
            out_dir=tmp_path / "b",
            model="tests.byom.archs:monai_segresnet",
            input_shape=(1, 32, 32),
            segmentation=SegmentationOptions(background_index=0),
            label_options=LabelOptions.parse("background,liver,lesion"),
            force=True,
            echo=lambda s: None,
        )
    with pytest.raises(ConversionError, match="sigmoid segmentation model .* no background channel"):
        convert_torch(
            out_dir=tmp_path / "c",
            model="tests.byom.archs:monai_segresnet",
            input_shape=(1, 32, 32),
            segmentation=SegmentationOptions(background_index=0, activation="sigmoid"),
            echo=lambda s: None,
        )
    with pytest.raises(ConversionError, match=r"--code names \['kidney'\], which are not in --labels"):
        LabelOptions.parse("background,liver", ["kidney=SCT:64033007:Kidney"])
    with pytest.raises(ConversionError, match="SCHEME:VALUE:MEANING"):
        LabelOptions.parse("background,liver", [], ["liver=Liver"])


def test_cli_sigmoid_segmentation(tmp_path: Path) -> None:
    """``pacs-node convert torch --kind segmentation`` with one sigmoid channel: no background."""
    from typer.testing import CliRunner

    from node.cli import app

    out = tmp_path / "m"
    args = ["convert", "torch", "--model", "tests.byom.archs:monai_unet_sigmoid", "--input-shape", "1,32,32"]
    args += ["--out", str(out), "--kind", "segmentation", "--labels", "liver", *LIVER, "--min-area", "3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "parity PASS" in res.output and "per-pixel class agreement 100" in res.output
    data = fill_segmentation_manifest(out)
    assert data["outputs"]["activation"] == "sigmoid" and "background_index" not in data["segmentation"]
    assert load_model(out).manifest.labels[0].index == 0

    cam = CliRunner().invoke(app, [*args, "--force", "--cam"])
    assert cam.exit_code == 2 and "--cam is for classifiers" in cam.output
    cls = CliRunner().invoke(app, [*args[:6], "--out", str(tmp_path / "x"), "--background-index", "0"])
    assert cls.exit_code == 2 and "only with --kind segmentation" in cls.output
