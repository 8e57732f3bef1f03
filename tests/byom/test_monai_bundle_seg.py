"""``convert monai-bundle`` for segmentation bundles: a bundle made with MONAI's own ``init_bundle``
whose network is a UNet (per-pixel output, ``network_data_format`` output type ``image`` with a
``channel_def``), a ``SlidingWindowInferer`` and ``Activations`` / ``AsDiscrete`` postprocessing,
converted into a ``kind: segmentation`` manifest, run by the node on a CT phantom series, and
compared with MONAI itself running the bundle's transforms, inferer, network and postprocessing."""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import need_module

log = logging.getLogger(__name__)

torch = need_module("torch")
need_module("monai")
need_module("onnx")

from monai.bundle import ConfigParser  # noqa: E402

from converters.cli import convert_monai_bundle  # noqa: E402
from converters.common import ConversionError  # noqa: E402
from node.inference.registry import load_model  # noqa: E402
from node.inference.runtime import CPU, RuntimeConfig, create_session  # noqa: E402
from node.runner.analyse import Stopwatch, analyse  # noqa: E402
from node.synth import generate_study  # noqa: E402
from tests.byom.test_monai_bundle import INFERENCE, METADATA, make_bundle  # noqa: E402

UNET = {
    "_target_": "UNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16, 32],
    "strides": [2, 2],
    "num_res_units": 1,
    "norm": "batch",
}
SEG_OUTPUT = {
    "type": "image",
    "format": "segmentation",
    "num_channels": 2,
    "spatial_shape": [64, 32],
    "dtype": "float32",
    "value_range": [0, 1],
    "is_onehot": False,
    "channel_def": {"0": "background", "1": "liver"},
}


def seg_bundle(
    root: Path, *, post: list[dict], inferer: dict | None = None, seed: int = 5, calibrate: Path | None = None
) -> Path:
    """A 2-D UNet segmentation bundle (the classifier bundle's preprocessing: window, resize to
    (x 64, y 32), normalise). ``calibrate``: a DICOM file on which the last layer's bias is set so
    that about half the pixels are 'liver' (random weights give a nearly constant map)."""
    inference = copy.deepcopy(INFERENCE)
    inference["network_def"] = copy.deepcopy(UNET)
    inference["inferer"] = inferer or {
        "_target_": "SlidingWindowInferer",
        "roi_size": [64, 32],
        "sw_batch_size": 1,
        "overlap": 0.25,
        "mode": "gaussian",
    }
    inference["postprocessing"] = {"_target_": "Compose", "transforms": post}
    meta = copy.deepcopy(METADATA)
    meta["name"] = "CT liver segmentation (test bundle)"
    meta["network_data_format"]["outputs"] = {"pred": copy.deepcopy(SEG_OUTPUT)}
    make_bundle(root, inference=inference, metadata=meta, seed=seed)
    if calibrate is not None:
        parser = ConfigParser(copy.deepcopy(inference))
        net = parser.get_parsed_content("network_def")
        weights = root / "models" / "model.pt"
        net.load_state_dict(torch.load(weights, weights_only=True))
        net.eval()
        image = parser.get_parsed_content("preprocessing")({"image": str(calibrate)})["image"]
        with torch.no_grad():
            logits = net(image.as_tensor()[None])[0]
            last = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][
                -1
            ]
            last.bias[1] -= float(torch.median(logits[1] - logits[0]))
        torch.save(net.state_dict(), weights)
    return root


ARGMAX = [
    {"_target_": "Activationsd", "keys": "pred", "softmax": True},
    {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
]


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A CT phantom series (512 x 512, 3 slices)."""
    out = tmp_path_factory.mktemp("ct")
    truth = generate_study("ct", out, seed=2, write_masks=False, slices=3)
    return [out / i.file for i in truth.instances]


def monai_masks(bundle: Path, files: list[Path], post: bool = True) -> list[np.ndarray]:
    """MONAI itself, per file: the bundle's preprocessing, inferer and network; then its
    postprocessing (a (1, x, y) label map), or (``post=False``) the softmax probabilities resized
    back to the source image by MONAI's bilinear Resize and argmaxed (x, y), as the node maps
    probabilities back to the source pixels before its argmax."""
    from monai.transforms import Resize

    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    postprocess = parser.get_parsed_content("postprocessing")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    out = []
    with torch.no_grad():
        for f in files:
            image = pre({"image": str(f)})["image"]
            logits = inferer(image.as_tensor()[None], net)[0]
            if post:
                out.append(np.asarray(postprocess({"pred": logits})["pred"])[0])
            else:
                probs = torch.softmax(logits, dim=0)
                full = Resize(spatial_size=(512, 512), mode="bilinear")(probs)
                out.append(np.asarray(full).argmax(axis=0))
    return out


def test_segmentation_bundle_converts_and_matches_monai(tmp_path: Path, ct_series: list[Path]) -> None:
    bundle = seg_bundle(tmp_path / "bundle", post=ARGMAX, calibrate=ct_series[1])
    out = tmp_path / "models" / "ct-liver-bundle"
    lines: list[str] = []
    result = convert_monai_bundle(bundle_dir=bundle, out_dir=out, echo=lines.append)
    assert result.ok, "\n".join(lines)
    assert result.parity[0].agreement is not None and result.parity[0].agreement >= 0.999
    assert any("SlidingWindowInferer roi_size [64, 32] = the whole" in line for line in lines)
    assert any("AsDiscreted argmax" in line for line in lines)

    model = load_model(out)  # accepted as written
    m = model.manifest
    assert (m.kind, m.outputs.activation, m.heatmap.method) == ("segmentation", "softmax", "none")
    assert m.segmentation.dimensions == 2 and m.segmentation.background_index == 0
    assert [(lb.name, lb.index, lb.code.meaning) for lb in m.labels] == [("liver", 1, "liver")]
    assert m.labels[0].category.scheme_designator == "99PACSNODE"
    assert tuple(m.input.shape) == (None, 1, 32, 64)  # rows (MONAI's y), columns (MONAI's x)

    # the node's whole path against MONAI's, per slice, on the source pixels (512 x 512)
    session = create_session(model, RuntimeConfig(providers=(CPU,), intra_op_threads=1, inter_op_threads=1))
    analysis, _ = analyse(
        model, session, ct_series, level="series", uid_seed="b", watch=Stopwatch(time.monotonic() + 60)
    )
    import pydicom

    from converters.common import ort_session
    from node.runner.analyse import prepare_all

    by_uid = {f.sop_instance_uid: f for f in analysis.segmentation.frames}
    want_full = monai_masks(bundle, ct_series, post=False)
    want_model = monai_masks(bundle, ct_series, post=True)
    prepared = {im.header.sop_instance_uid: im for im in prepare_all(ct_series, m, False)}  # analyse's
    onnx = ort_session(out / "model.onnx")
    full_agree, model_agree = [], []
    for f, full, small in zip(ct_series, want_full, want_model, strict=True):
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        im = prepared[uid]
        # model resolution: the node's preprocessing + ONNX, argmax, vs MONAI's AsDiscreted argmax
        logits = onnx.run(None, {"image": im.model_input.tensor})[0][0]
        assert small.shape == (64, 32) and set(np.unique(small)) <= {0.0, 1.0}
        model_agree.append(float((logits.argmax(axis=0) == small.T).mean()))  # (x, y) -> (row, col)
        # source pixels: analyse's mask vs MONAI's probabilities resized back, argmax
        frame = by_uid[uid]
        got = frame.masks[0] if frame.masks is not None else np.zeros((512, 512), bool)
        assert 0.02 < (full == 1).mean() < 0.98  # not a constant map
        full_agree.append(float((got == (full.T == 1)).mean()))
    log.info("bundle mask agreement: model resolution %s, source pixels %s", model_agree, full_agree)
    assert min(model_agree) >= 0.999, model_agree
    assert min(full_agree) >= 0.999, full_agree


def test_sigmoid_threshold_and_small_objects_map(tmp_path: Path) -> None:
    post = [
        {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
        {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.4},
        {"_target_": "RemoveSmallObjectsd", "keys": "pred", "min_size": 12, "connectivity": 2},
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": str(tmp_path / "x"),
            "output_ext": ".png",
            "writer": "PILWriter",
        },
    ]
    bundle = seg_bundle(tmp_path / "b", post=post, inferer={"_target_": "SimpleInferer"})
    out = tmp_path / "m"
    lines: list[str] = []
    assert convert_monai_bundle(bundle_dir=bundle, out_dir=out, echo=lines.append).ok, "\n".join(lines)
    m = load_model(out).manifest
    assert m.outputs.activation == "sigmoid" and m.segmentation.background_index is None
    assert [(lb.name, lb.index, lb.threshold) for lb in m.labels] == [("liver", 1, 0.4)]  # not background
    assert m.segmentation.min_area_px == 12
    assert any("SaveImaged -> the node writes a DICOM Segmentation" in line for line in lines)


def test_unmappable_segmentation_bundles_are_refused(tmp_path: Path) -> None:
    post = [
        *ARGMAX,
        {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [1]},
        {"_target_": "FillHolesd", "keys": "pred"},
    ]
    bundle = seg_bundle(tmp_path / "a", post=post)
    with pytest.raises(ConversionError) as err:
        convert_monai_bundle(bundle_dir=bundle, out_dir=tmp_path / "oa", echo=lambda s: None)
    text = str(err.value)
    assert "KeepLargestConnectedComponentd (postprocessing transform 2): needs a keep-the-largest" in text
    assert "FillHolesd (postprocessing transform 3): needs a hole-filling op" in text

    small = {"_target_": "SlidingWindowInferer", "roi_size": [32, 32], "overlap": 0.5, "mode": "gaussian"}
    bundle = seg_bundle(tmp_path / "b", post=ARGMAX, inferer=small)
    with pytest.raises(ConversionError, match=r"roi_size \[32, 32\] on a \[64, 32\] image.*2-D sliding"):
        convert_monai_bundle(bundle_dir=bundle, out_dir=tmp_path / "ob", echo=lambda s: None)

    bundle = seg_bundle(tmp_path / "c", post=ARGMAX)
    with pytest.raises(ConversionError, match="--cam is for classifiers"):
        convert_monai_bundle(bundle_dir=bundle, out_dir=tmp_path / "oc", cam=True, echo=lambda s: None)
    assert not (tmp_path / "oa" / "model.onnx").exists() and not (tmp_path / "ob" / "model.onnx").exists()


def test_cli_segmentation_bundle_with_codes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from node.cli import app

    bundle = seg_bundle(tmp_path / "b", post=ARGMAX)
    out = tmp_path / "m"
    args = ["convert", "monai-bundle", str(bundle), "--out", str(out), "--code", "liver=SCT:10200004:Liver"]
    res = CliRunner().invoke(app, [*args, "--category", "SCT:91723000:Anatomical structure"])
    assert res.exit_code == 0, res.output
    assert "per-pixel class agreement" in res.output
    label = load_model(out).manifest.labels[0]
    assert (label.code.value, label.category.value) == ("10200004", "91723000")
