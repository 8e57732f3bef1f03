"""Preparation on the GPU (issue 16 item 3, node/inference/gpu_prepare.py and gpu_probe.py).

The preparation math is written against an array module; here it runs with NumPy and is held
to the node's CPU preparation (``preprocess.run_steps``, ``PrepareSpec.prepare``, the reduction
of reduce.py included) on full-size phantoms and real files:

- model tensors within :data:`GREY_TOLERANCE` grey levels (of the 0..255 window output, before
  normalize: float32 summation order in the area averages, and the float32 rounding of the
  window output before them; measured here <= 1.6e-4 grey levels on full-size chest
  radiographs, mammograms, CT and MR, pydicom's CR, CT and MR files); nearest-neighbour and
  unresized pipelines bit for bit;
- displays bit for bit (the CPU display table, looked up on the device);
- frames, order, headers and geometry as the CPU path's; errors the CPU path's.

Tests marked ``gpu`` run the real thing (CuPy, nvImageCodec) and are skipped without a CUDA
device (tests/conftest.py).
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from node.budget import Budget
from node.errors import BudgetExceeded, PreprocessError
from node.inference import gpu_prepare as gp
from node.inference import gpu_probe
from node.inference import preprocess as pp
from node.inference.codestream import frame_claim
from node.inference.decode import decode_frame, header_from_dataset, iter_frames, read_dataset
from node.inference.device_arrays import concatenate, to_host
from node.inference.isolate import PreparationDeadline
from node.inference.manifest import Manifest
from node.inference.prepared import DisplaySpec, PrepareSpec, iter_prepared
from node.inference.registry import load_registry
from node.synth import generate_study
from node.types import ImageHeader, LookupTable

REPO = Path(__file__).resolve().parents[2]
#: grey levels (0..255) the device preparation may differ from the CPU's by; ~6x the largest
#: difference measured (1.6e-4: letterbox to 224 of 16 full-size chest phantoms, seeds 1-8 in
#: both photometric interpretations) and far below one grey level
GREY_TOLERANCE = 1e-3
BUNDLED = {"cxr": "cxr", "mammo": "mammo", "mr": "mr-brain", "ct": "ct-liver"}


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(str(path))


@pytest.fixture(scope="module")
def registry():
    return load_registry(REPO / "models" / "onnx", strict=True)


@pytest.fixture(scope="module")
def phantoms() -> dict[str, list[Path]]:
    """Full-size phantoms of each bundled model's kind (chest in both photometric
    interpretations), and the colour ones, uncompressed and JPEG baseline."""
    out = Path(tempfile.mkdtemp(prefix="gpu-prepare-"))
    found: dict[str, list[Path]] = {}
    kinds: list[tuple[str, str, dict[str, Any]]] = [
        ("cxr", "cxr", {"seed": 3}),
        ("cxr-mono1", "cxr", {"seed": 4, "photometric": "MONOCHROME1"}),
        ("cxr-mono2", "cxr", {"seed": 5, "photometric": "MONOCHROME2"}),
        ("mammo", "mammo", {"seed": 1}),
        ("ct", "ct", {"seed": 3, "slices": 3}),
        ("mr", "mr", {"seed": 3}),
        ("derm", "derm", {"seed": 2}),
        ("derm-jpeg", "derm", {"seed": 2, "jpeg": True}),
        ("smear", "smear", {"seed": 2}),
    ]
    for name, kind, options in kinds:
        generate_study(kind, out / name, write_masks=False, **options)
        found[name] = sorted((out / name).glob("**/*.dcm"))[:3]
    return found


def _grey(manifest: Manifest) -> float:
    """Tensor units per grey level (0..255) after the manifest's normalize (1 without one)."""
    unit = 1.0
    for step in manifest.preprocessing:
        if step.op == "normalize":
            unit = 1.0 / (step.max_pixel_value * min(step.std))
    return unit


def _scaffold_chest(registry, size: int = 224) -> Manifest:
    """The converter scaffold's chest steps (a ResNet-50 at 224^2, 3 channels) as the BYOM
    tests fill them in (tests/byom/conftest.py fill_manifest: mean 0.5, std 0.25)."""
    data = registry.models["cxr"].manifest.model_dump(mode="json")
    data["id"] = "resnet50-chest"
    data["input"]["shape"] = [None, 3, size, size]
    data["preprocessing"] = [
        {"op": "modality_lut"},
        {"op": "window", "source": "header", "fallback": "minmax"},
        {"op": "invert_monochrome1"},
        {"op": "letterbox", "size": [size, size], "pad_value": 0.0, "interpolation": "area"},
        {"op": "normalize", "mean": [0.5], "std": [0.25], "max_pixel_value": 255.0},
        {"op": "replicate_channels", "channels": 3},
    ]
    data["heatmap"] = {"method": "none"}
    data["outputs"].pop("cam", None)
    return Manifest.model_validate(data)


def _with_steps(manifest: Manifest, steps: list[dict], **input_changes: Any) -> Manifest:
    data = manifest.model_dump(mode="json")
    data["preprocessing"] = steps
    data["input"].update(input_changes)
    data["heatmap"] = {"method": "none"}
    data["outputs"].pop("cam", None)
    return Manifest.model_validate(data)


def _assert_same(ref, got, manifest: Manifest) -> None:
    """The device path's frames are the CPU path's: same frames in the same order, headers and
    geometry equal, tensors within GREY_TOLERANCE, displays bit for bit."""
    assert [(f.item, f.index) for f in got] == [(f.item, f.index) for f in ref]
    for a, b in zip(ref, got, strict=True):
        assert a.header == b.header
        assert b.model_input is not None and a.model_input is not None
        ta, tb = a.model_input.tensor, np.asarray(b.model_input.tensor)
        assert ta.shape == tb.shape and ta.dtype == tb.dtype
        assert (
            a.model_input.geometry == b.model_input.geometry and a.model_input.layout == b.model_input.layout
        )
        worst = float(np.abs(ta.astype(np.float64) - tb).max()) / _grey(manifest)
        assert worst <= GREY_TOLERANCE, worst
        if a.display is None:
            assert b.display is None
        else:
            assert b.display is not None and b.display.dtype == np.uint8
            assert np.array_equal(a.display, b.display)
        assert "PixelData" not in b.dataset


def _numpy_preparer() -> gp.GpuPreparer:
    return gp.GpuPreparer(xp=np, device_decode=False)


# -- the probe ------------------------------------------------------------------------------------


@pytest.fixture
def probe(monkeypatch):
    gpu_probe.gpu_preparation.cache_clear()
    yield gpu_probe.gpu_preparation
    gpu_probe.gpu_preparation.cache_clear()


def _fake_cupy(devices: int | Exception) -> types.ModuleType:
    cupy = types.ModuleType("cupy")

    def count() -> int:
        if isinstance(devices, Exception):
            raise devices
        return devices

    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))  # type: ignore[attr-defined]
    return cupy


def test_probe_refuses_a_model_not_on_cuda(probe, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="node.inference.gpu_probe"):
        found = probe("CPUExecutionProvider")
        assert probe("CPUExecutionProvider") is found  # cached: asked and logged once
    usable, reason = found
    assert not usable and not found.device_decode
    assert "CPUExecutionProvider" in reason and "CUDAExecutionProvider" in reason
    logged = [r for r in caplog.records if r.name == "node.inference.gpu_probe"]
    assert len(logged) == 1 and logged[0].levelno == logging.INFO and reason in logged[0].getMessage()


def test_probe_without_cupy_falls_back_and_says_why(probe, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with caplog.at_level(logging.INFO, logger="node.inference.gpu_probe"):
        found = probe("CUDAExecutionProvider")
        probe("CUDAExecutionProvider")
    assert not found.usable and found.reason.startswith("cupy is not installed")
    messages = [r.getMessage() for r in caplog.records if r.name == "node.inference.gpu_probe"]
    assert messages == [f"preparation on the CPU: {found.reason}"]


@pytest.mark.parametrize("devices", [0, RuntimeError("cudaErrorNoDevice: no CUDA-capable device")])
def test_probe_without_a_device_falls_back(probe, monkeypatch, devices) -> None:
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(devices))
    found = probe("CUDAExecutionProvider")
    assert not found.usable and found.reason.startswith("no CUDA device")


def test_probe_without_nvimgcodec_prepares_on_the_gpu_and_decodes_on_the_cpu(
    probe, monkeypatch, caplog
) -> None:
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    with caplog.at_level(logging.INFO, logger="node.inference.gpu_probe"):
        found = probe("CUDAExecutionProvider")
    assert found.usable and not found.device_decode
    assert found.reason.startswith("nvimgcodec missing") and "CPU" in found.reason
    assert any(found.reason in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_probe_with_everything_decodes_on_the_gpu(probe, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(2))
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", types.ModuleType("nvidia.nvimgcodec"))
    found = probe("CUDAExecutionProvider")
    assert found.usable and found.device_decode and found.reason == ""


def test_make_gpu_preparer_follows_the_probe(probe, monkeypatch) -> None:
    assert gp.make_gpu_preparer("CPUExecutionProvider") is None
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert gp.make_gpu_preparer("CUDAExecutionProvider") is None
    probe.cache_clear()
    fake = _fake_cupy(1)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    pool = _Recording()
    made = gp.make_gpu_preparer("CUDAExecutionProvider", cpu=pool)
    assert made is not None and made.xp is fake and made.cpu is pool and not made.device_decode


def test_host_arrays_and_batches_of_host_tensors() -> None:
    a, b = np.ones((1, 3, 4, 4), np.float32), np.zeros((2, 3, 4, 4), np.float32)
    assert to_host(a) is a or np.array_equal(to_host(a), a)
    joined = concatenate([a, b])
    assert isinstance(joined, np.ndarray) and joined.shape == (3, 3, 4, 4) and joined[0].min() == 1


def test_the_modules_import_without_cupy_or_nvimgcodec() -> None:
    code = (
        "import sys\n"
        "import node.inference.gpu_prepare, node.inference.gpu_probe\n"
        "assert 'cupy' not in sys.modules and 'nvidia.nvimgcodec' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


# -- which models ---------------------------------------------------------------------------------


def test_supported_for_each_bundled_model(registry) -> None:
    expected = {
        "cxr": None,
        "mammo": None,
        "mr-brain": None,
        "ct-liver": None,
        "ct-liver-seg": None,
        "derm-lesion": None,
        "smear-malaria": None,
    }
    for model_id, reason in expected.items():
        assert gp.supported(registry.models[model_id].manifest) == reason, model_id
    reason = gp.supported(registry.models["fundus-dr"].manifest)
    assert reason is not None and "circular_crop" in reason and "step 0" in reason


@pytest.mark.parametrize(
    "step, named",
    [
        ({"op": "clahe"}, "clahe"),
        ({"op": "median", "ksize": 3}, "median"),
        ({"op": "gaussian", "sigma": 1.0}, "gaussian"),
        ({"op": "to_8bit", "method": "image_percentile"}, "image_percentile"),
        ({"op": "resize", "size": [128, 128], "interpolation": "cubic"}, "cubic"),
    ],
)
def test_supported_names_the_step_without_a_gpu_version(registry, step, named) -> None:
    base = registry.models["cxr"].manifest
    steps = [
        {"op": "modality_lut"},
        {"op": "window", "source": "header", "fallback": "minmax"},
        step,
        {"op": "resize", "size": [128, 128], "interpolation": "area"},
        {"op": "normalize", "mean": [0.5], "std": [0.25]},
    ]
    reason = gp.supported(_with_steps(base, steps))
    assert reason is not None and named in reason and "step 2" in reason


# -- the math against the CPU's ---------------------------------------------------------------------


def test_resize_weights_are_opencvs_for_every_rule() -> None:
    """Each weight matrix applied in float64 is OpenCV's float64 resize (its own weights and
    double sums) of random rows: same rule, same table (shrink, grow, both)."""
    rng = np.random.default_rng(1)
    for ssize, dsize in [(2500, 224), (301, 100), (100, 301), (64, 64), (7, 16), (16, 7), (3, 1)]:
        image = rng.random((ssize, 5))
        for name, flag in (("linear", cv2.INTER_LINEAR), ("nearest", cv2.INTER_NEAREST)):
            want = cv2.resize(image, (5, dsize), interpolation=flag)
            got = gp.resize_weights(ssize, dsize, name).astype(np.float64) @ image
            assert np.abs(got - want).max() < 1e-6, (name, ssize, dsize)
        kind = "area" if dsize <= ssize else "area_linear"
        want = cv2.resize(image, (5, dsize), interpolation=cv2.INTER_AREA)
        got = gp.resize_weights(ssize, dsize, kind).astype(np.float64) @ image
        assert np.abs(got - want).max() < 1e-6, (kind, ssize, dsize)


@pytest.mark.parametrize(
    "shape, target",
    [
        ((2500, 2048), (224, 184)),
        ((1000, 800), (128, 102)),
        ((1024, 1024), (128, 128)),
        ((257, 259), (255, 258)),
    ],
)
def test_area_resize_is_opencvs_within_float32_error(shape, target) -> None:
    """The matrix products against cv2.resize INTER_AREA on float32 values: float32 summation
    order only (the bound of tests/inference/test_prepare_speed_exact.py for reduce.py: 16
    ulps of the largest value, plus one per source pixel a cell spans along each axis)."""
    rng = np.random.default_rng(shape[0])
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = (4000 * (0.5 + 0.4 * np.sin(yy / 97.0) * np.cos(xx / 61.0)) + rng.normal(0, 40, shape)).astype(
        np.float32
    )
    got = gp.resize(np, image, target, "area")
    want = cv2.resize(image, (target[1], target[0]), interpolation=cv2.INTER_AREA)
    ulp = float(np.spacing(np.float32(np.abs(image).max())))
    terms = shape[0] / target[0] + shape[1] / target[1]
    assert got.dtype == np.float32 and got.shape == target
    assert np.abs(got - want).max() <= (16 + terms) * ulp, float(np.abs(got - want).max() / ulp)


def _frame_and_header(path: Path) -> tuple[np.ndarray, ImageHeader]:
    (decoded,) = list(iter_frames(read_dataset(path)))
    return decoded.frame(0), decoded.header


@pytest.mark.parametrize(
    "name, model_id",
    [
        ("RG1_UNCR.dcm", "cxr"),  # CR, MONOCHROME1, 15 bits, 1955 x 1841
        ("RG3_UNCR.dcm", "cxr"),  # CR, MONOCHROME1, 10 bits
        ("MR2_UNCR.dcm", "mr-brain"),  # MR, rescale 3.77, 1024^2
        ("CT_small.dcm", "ct-liver"),  # CT, signed, rescale -1024
        ("693_UNCR.dcm", "ct-liver"),  # CT, signed 14 bits, 512^2
        ("MR_small.dcm", "mr-brain"),  # signed MR, 64^2 (enlarged to 128^2)
    ],
)
def test_real_files_prepare_as_on_the_cpu(registry, name, model_id) -> None:
    manifest = registry.models[model_id].manifest
    pixels, header = _frame_and_header(_testdata(name))
    for reduce in (True, False):
        ref = pp.run_steps(
            pixels,
            header,
            manifest.preprocessing,
            expected_hw=manifest.input.spatial,
            expected_channels=manifest.input.channels,
            reduce=reduce,
        )
        got = gp.prepare_frame(np, pixels, header, manifest)
        assert got.tensor.shape == ref.tensor.shape and got.tensor.dtype == ref.tensor.dtype
        assert got.geometry == ref.geometry
        worst = float(np.abs(got.tensor - ref.tensor).max()) / _grey(manifest)
        assert worst <= GREY_TOLERANCE, (name, reduce, worst)


@pytest.mark.parametrize("kind", ["cxr", "cxr-mono1", "cxr-mono2", "mammo", "ct", "mr"])
def test_bundled_models_prepare_their_phantoms_as_on_the_cpu(registry, phantoms, kind) -> None:
    manifest = registry.models[BUNDLED[kind.split("-")[0]]].manifest
    spec = PrepareSpec(manifest, check_size=False)  # the mammography model tiles its input
    _assert_same(
        list(iter_prepared(phantoms[kind], spec)),
        list(_numpy_preparer().stream(phantoms[kind], spec)),
        manifest,
    )


@pytest.mark.parametrize("kind", ["cxr", "cxr-mono1", "cxr-mono2"])
def test_the_scaffold_chest_steps_on_full_size_radiographs(registry, phantoms, kind) -> None:
    """The ResNet-50 scaffold's chest steps (letterbox 224, normalize, 3 channels) on full-size
    chest phantoms (MONOCHROME1 and 2): the CPU path's tensors, displays bit for bit."""
    manifest = _scaffold_chest(registry)
    assert gp.supported(manifest) is None
    spec = PrepareSpec(manifest)
    ref = list(iter_prepared(phantoms[kind], spec))
    assert ref[0].model_input is not None and ref[0].model_input.tensor.shape == (1, 3, 224, 224)
    assert max(ref[0].header.rows, ref[0].header.cols) > 1500  # full size
    _assert_same(ref, list(_numpy_preparer().stream(phantoms[kind], spec)), manifest)


@pytest.mark.parametrize(
    "kind, model_id", [("derm", "derm-lesion"), ("derm-jpeg", "derm-lesion"), ("smear", "smear-malaria")]
)
def test_colour_models_prepare_as_on_the_cpu(registry, phantoms, kind, model_id) -> None:
    manifest = registry.models[model_id].manifest
    spec = PrepareSpec(manifest)
    _assert_same(
        list(iter_prepared(phantoms[kind], spec)),
        list(_numpy_preparer().stream(phantoms[kind], spec)),
        manifest,
    )


def _synthetic(
    rows: int = 301, cols: int = 257, *, signed: bool = False, bits: int = 12, **header: Any
) -> tuple[np.ndarray, ImageHeader]:
    rng = np.random.default_rng(rows * cols)
    yy, xx = np.mgrid[:rows, :cols]
    top = 2 ** (bits - 1) if signed else 2**bits
    base = (0.5 + 0.45 * np.sin(yy / 23.0) * np.cos(xx / 17.0)) * top - (top / 2 if signed else 0)
    dtype = np.int16 if signed else np.uint16
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    pixels = np.clip(base + rng.normal(0, 30, base.shape), lo, hi).astype(dtype)
    fields: dict[str, Any] = {
        "sop_instance_uid": "1.2.3",
        "series_instance_uid": "1.2",
        "study_instance_uid": "1",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "modality": "OT",
        "rows": rows,
        "cols": cols,
        "number_of_frames": 1,
        "samples_per_pixel": 1,
        "photometric_interpretation": "MONOCHROME2",
        "stored_photometric_interpretation": "MONOCHROME2",
        "bits_allocated": 16,
        "bits_stored": bits,
        "pixel_representation": int(signed),
    }
    fields.update(header)
    return pixels, ImageHeader(**fields)


def _lut(first: int, entries: int, bits: int, rng_seed: int = 0) -> LookupTable:
    rng = np.random.default_rng(rng_seed)
    table = np.sort(rng.integers(0, 2**bits, entries)).astype(np.uint16)
    return LookupTable(first_mapped=first, bits=bits, data=table.tobytes())


WINDOWS: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [
    ("linear", {"window_center": 1800.0, "window_width": 2500.0}, []),
    (
        "linear-exact",
        {"window_center": 1800.5, "window_width": 1999.25, "voi_lut_function": "LINEAR_EXACT"},
        [],
    ),
    ("sigmoid", {"window_center": 2000.0, "window_width": 1500.0, "voi_lut_function": "SIGMOID"}, []),
    ("threshold", {"window_center": 2000.0, "window_width": 1.0}, []),
    ("voi-lut", {"voi_lut": _lut(100, 3000, 12)}, []),
    (
        "modality-lut",
        {"modality_lut": _lut(0, 4096, 14, 1), "window_center": 8000.0, "window_width": 9000.0},
        [],
    ),
    (
        "rescale-mono1",
        {
            "rescale_slope": 0.5,
            "rescale_intercept": -300.0,
            "window_center": 500.0,
            "window_width": 900.0,
            "photometric_interpretation": "MONOCHROME1",
        },
        [],
    ),
    ("no-window", {}, []),
    ("preset", {}, [{"op": "window", "source": "preset", "preset": "lung"}]),
    ("explicit", {}, [{"op": "window", "source": "explicit", "center": 900.0, "width": 1500.0}]),
    ("to8bit-naive", {}, [{"op": "to_8bit", "method": "naive"}]),
    ("to8bit-global", {}, [{"op": "to_8bit", "method": "global_percentile", "low": 200.0, "high": 3500.0}]),
]


@pytest.mark.parametrize("what, header_fields, window_steps", WINDOWS, ids=[w[0] for w in WINDOWS])
@pytest.mark.parametrize(
    "geometry",
    [
        {"op": "resize", "size": [128, 96], "interpolation": "area"},  # shrink
        {
            "op": "letterbox",
            "size": [224, 224],
            "interpolation": "area",
            "pad_value": -1.0,
        },  # grow: OpenCV's linear variant
        {"op": "resize", "size": [128, 300], "interpolation": "area"},  # one axis grows
        {"op": "resize", "size": [100, 80], "interpolation": "linear"},
        {"op": "letterbox", "size": [512, 400], "interpolation": "linear", "align": "top_left"},
        {"op": "resize", "size": [150, 333], "interpolation": "nearest"},
    ],
    ids=["area", "area-grow", "area-mixed", "linear", "linear-grow", "nearest"],
)
def test_every_step_as_on_the_cpu(registry, what, header_fields, window_steps, geometry) -> None:
    signed = what == "rescale-mono1"
    pixels, header = _synthetic(signed=signed, **header_fields)
    intensity = window_steps or [{"op": "window", "source": "header", "fallback": "minmax"}]
    steps = [{"op": "modality_lut"}, *intensity, {"op": "invert_monochrome1"}, geometry]
    steps.append({"op": "normalize", "mean": [0.4], "std": [0.3]})
    manifest = _with_steps(registry.models["cxr"].manifest, steps)
    exact = pp.run_steps(pixels, header, manifest.preprocessing, reduce=False)
    reduced = pp.run_steps(pixels, header, manifest.preprocessing)  # the node's path
    got = gp.run_steps(np, pixels, header, manifest.preprocessing)
    assert got.tensor.shape == exact.tensor.shape and got.geometry == exact.geometry == reduced.geometry
    unit = _grey(manifest)
    worst = float(np.abs(got.tensor - exact.tensor).max()) / unit
    if geometry["interpolation"] == "nearest":
        assert worst == 0.0  # no sums: bit for bit
    assert worst <= GREY_TOLERANCE, worst
    # the reduction's own float32 error is amplified by a steep window (a threshold: 255 grey
    # levels per stored unit): no farther from the node's path than it is from the exact one
    own = float(np.abs(reduced.tensor - exact.tensor).max()) / unit
    assert float(np.abs(got.tensor - reduced.tensor).max()) / unit <= GREY_TOLERANCE + own


@pytest.mark.parametrize("dtype, layout", [("uint8", "NCHW"), ("float16", "NHWC"), ("float32", "NHWC")])
def test_output_dtype_and_layout_as_on_the_cpu(registry, dtype, layout) -> None:
    pixels, header = _synthetic(window_center=1800.0, window_width=2500.0)
    steps = [
        {"op": "modality_lut"},
        {"op": "window", "source": "header"},
        {"op": "resize", "size": [64, 64], "interpolation": "area"},
        {"op": "replicate_channels", "channels": 3},
    ]
    parsed = _with_steps(registry.models["cxr"].manifest, steps).preprocessing
    ref = pp.run_steps(pixels, header, parsed, layout=layout, dtype=dtype)
    got = gp.run_steps(np, pixels, header, parsed, layout=layout, dtype=dtype)
    assert got.tensor.dtype == ref.tensor.dtype and got.tensor.shape == ref.tensor.shape
    diff = np.abs(got.tensor.astype(np.float64) - ref.tensor.astype(np.float64))
    if dtype == "uint8":  # a rounding of x.5 may go the other way: one level, rarely
        assert diff.max() <= 1 and np.count_nonzero(diff) <= diff.size // 1000
    else:
        assert diff.max() <= GREY_TOLERANCE + (0.25 if dtype == "float16" else 0.0)


def test_an_unresized_pipeline_is_bit_for_bit(registry) -> None:
    pixels, header = _synthetic(64, 64, window_center=1800.0, window_width=2500.0)
    steps = [
        {"op": "modality_lut"},
        {"op": "window", "source": "header"},
        {"op": "normalize", "mean": [0.5], "std": [0.25]},
    ]
    manifest = _with_steps(registry.models["cxr"].manifest, steps, shape=[None, 1, 64, 64])
    ref = pp.run_steps(pixels, header, manifest.preprocessing)
    assert np.array_equal(gp.run_steps(np, pixels, header, manifest.preprocessing).tensor, ref.tensor)


# -- the preparer ---------------------------------------------------------------------------------


def test_the_preparer_streams_a_study_as_iter_prepared(registry, phantoms) -> None:
    files = [*phantoms["cxr"], *phantoms["cxr-mono1"], *phantoms["cxr-mono2"]]
    manifest = registry.models["cxr"].manifest
    for keep in (True, False):
        spec = PrepareSpec(manifest, keep_display=keep)
        ref = list(iter_prepared(files, spec))
        preparer = _numpy_preparer()
        _assert_same(ref, list(preparer.stream(files, spec)), manifest)
        _assert_same(ref, preparer.submit(files, spec), manifest)


def test_the_analysis_runs_on_the_preparer(registry, phantoms) -> None:
    """node.runner.analyse.prepare_and_infer with a GpuPreparer (NumPy here) gives the
    probabilities it gives in this process, within what GREY_TOLERANCE moves a model
    (measured: <= 3.3e-7 over chest, mammography, MR and CT phantoms with their models)."""
    from node.inference.runtime import RuntimeConfig, create_session
    from node.runner.analyse import prepare_and_infer

    model = registry.models["cxr"]
    session = create_session(model, RuntimeConfig())
    files = [*phantoms["cxr"], *phantoms["cxr-mono1"]]
    ref = prepare_and_infer(files, model.manifest, session, False)
    got = prepare_and_infer(files, model.manifest, session, False, preparer=_numpy_preparer())
    assert [im.header.sop_instance_uid for im in got[0]] == [im.header.sop_instance_uid for im in ref[0]]
    assert np.abs(got[2] - ref[2]).max() < 1e-4
    assert all(np.array_equal(a.display, b.display) for a, b in zip(ref[0], got[0], strict=True))


def test_a_multiframe_image_frame_by_frame(registry) -> None:
    manifest = registry.models["mr-brain"].manifest
    files = [_testdata("emri_small.dcm")]  # 10 frames of 64^2
    spec = PrepareSpec(manifest)
    ref = list(iter_prepared(files, spec))
    assert len(ref) == 10
    _assert_same(ref, list(_numpy_preparer().stream(files, spec)), manifest)


def test_display_specs_and_unsupported_models_run_the_cpu_code(registry, phantoms, caplog) -> None:
    files = phantoms["cxr"]
    shown = DisplaySpec(((0,),) * len(files))
    got = list(_numpy_preparer().stream(files, shown))
    ref = list(iter_prepared(files, shown))
    assert all(
        np.array_equal(a.display, b.display) and b.model_input is None for a, b in zip(ref, got, strict=True)
    )
    manifest = _with_steps(
        registry.models["cxr"].manifest,
        [
            {"op": "modality_lut"},
            {"op": "window", "source": "header", "fallback": "minmax"},
            {"op": "clahe"},
            {"op": "letterbox", "size": [128, 128]},
            {"op": "normalize", "mean": [0.5], "std": [0.25]},
        ],
    )
    preparer = _numpy_preparer()
    with caplog.at_level(logging.INFO, logger="node.inference.gpu_prepare"):
        for _ in range(2):
            got = list(preparer.stream(files, PrepareSpec(manifest)))
    told = [r.getMessage() for r in caplog.records if "preparation on the CPU" in r.getMessage()]
    assert len(told) == 1 and "clahe" in told[0]  # once per model
    ref = list(iter_prepared(files, PrepareSpec(manifest)))
    for a, b in zip(ref, got, strict=True):
        assert np.array_equal(a.model_input.tensor, b.model_input.tensor)


class _Recording:
    """A CPU preparer (the node's pool stands here) that records what it was given."""

    def __init__(self) -> None:
        self.specs: list[Any] = []

    def submit(self, items, spec, budget=None, deadline=None):
        return list(self.stream(items, spec, budget, deadline))

    def stream(self, items, spec, budget=None, deadline=None):
        self.specs.append(spec)
        yield from iter_prepared(items, spec)


def test_a_cpu_preparer_takes_display_specs_and_unsupported_models(registry, phantoms) -> None:
    files = phantoms["cxr"][:1]
    cpu = _Recording()
    preparer = gp.GpuPreparer(xp=np, device_decode=False, cpu=cpu)
    shown = DisplaySpec(((0,),))
    (frame,) = preparer.submit(files, shown)
    assert frame.display is not None and cpu.specs == [shown]
    fundus = PrepareSpec(registry.models["fundus-dr"].manifest)
    fundus_files = phantoms["derm"][:1]  # any RGB image: the fundus steps run on it
    got = preparer.submit(fundus_files, fundus)
    assert cpu.specs[-1] is fundus
    ref = list(iter_prepared(fundus_files, fundus))
    assert np.array_equal(got[0].model_input.tensor, ref[0].model_input.tensor)
    # a supported model never reaches it
    preparer.submit(files, PrepareSpec(registry.models["cxr"].manifest))
    assert len(cpu.specs) == 2


def test_errors_are_the_cpu_paths(registry) -> None:
    """A frame the device path cannot prepare goes to the CPU code: its error is the CPU's."""
    strict = _with_steps(
        registry.models["ct-liver"].manifest,
        [
            {"op": "modality_lut"},
            {"op": "window", "source": "header"},  # CT_small has no window: fallback error
            {"op": "resize", "size": [128, 128]},
            {"op": "normalize", "mean": [0.5], "std": [0.25]},
        ],
    )
    files = [_testdata("CT_small.dcm")]
    with pytest.raises(PreprocessError) as cpu:
        list(iter_prepared(files, PrepareSpec(strict)))
    with pytest.raises(PreprocessError) as gpu:
        list(_numpy_preparer().stream(files, PrepareSpec(strict)))
    assert str(gpu.value) == str(cpu.value)
    tight = Budget(max_frame_pixels=1000)
    with pytest.raises(BudgetExceeded, match="max_frame_pixels"):
        list(_numpy_preparer().stream(files, PrepareSpec(registry.models["ct-liver"].manifest), tight))


def test_a_passed_deadline_stops_the_preparation(registry, phantoms) -> None:
    spec = PrepareSpec(registry.models["cxr"].manifest)
    with pytest.raises(PreparationDeadline):
        list(_numpy_preparer().stream(phantoms["cxr"], spec, deadline=time.monotonic() - 1))


# -- decoding on the device, with a stand-in for nvImageCodec ------------------------------------


class _FakeCodec:
    """nvImageCodec's module as decode_on_device uses it; its Decoder decodes with pydicom and
    returns what a GPU decoder may: unsigned samples, sign bits or garbage above BitsStored."""

    class ColorSpec:
        UNCHANGED, SRGB, SYCC = "unchanged", "srgb", "sycc"

    class DecodeParams:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs = kwargs

    def __init__(self, ds: Dataset, garbage: bool = False, fail: bool = False) -> None:
        self.ds, self.garbage, self.fail = ds, garbage, fail
        self.calls = 0

    def Decoder(self) -> _FakeCodec:  # noqa: N802 - nvImageCodec's name
        return self

    def decode(self, codestream: bytes, params: Any) -> np.ndarray:
        import openjpeg  # the codestream it is given, decoded by OpenJPEG (pylibjpeg's)

        self.calls += 1
        if self.fail:
            raise RuntimeError("nvjpeg2k: decode failed")
        values = np.asarray(openjpeg.decode(codestream))
        out = values.view(np.dtype(f"u{values.dtype.itemsize}")).copy()
        if self.garbage:  # the samples' bits above the precision set (unsigned) or not
            bits = frame_claim(pydicom.uid.JPEG2000Lossless, codestream).bits  # sign-extended (signed)
            high = out.dtype.type(((1 << 8 * out.itemsize) - 1) ^ ((1 << bits) - 1))
            out = out | high if values.dtype.kind == "u" else out & ~high
        return out[..., np.newaxis]


def _native(values: np.ndarray, bits: int, signed: bool) -> Dataset:
    """A native greyscale data set of ``values`` (BitsAllocated from their dtype)."""
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8 * values.dtype.itemsize, bits, bits - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = values.tobytes()
    return ds


def _j2k(values: np.ndarray, bits: int, signed: bool) -> Dataset:
    ds = _native(values, bits, signed)
    ds.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    return ds


def _encapsulated(values: np.ndarray, bits: int, ts: str, frame: bytes) -> Dataset:
    """A data set whose one frame is ``frame`` (a codestream of ``values``) in syntax ``ts``."""
    ds = _native(values, bits, False)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(ts)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.WindowCenter, ds.WindowWidth = 2 ** (bits - 1), 2**bits
    return ds


def _jpeg_baseline(rows: int = 300, cols: int = 260) -> Dataset:
    """A greyscale JPEG baseline (8-bit, OpenCV's encoder at quality 90) data set."""
    pixels, _ = _synthetic(rows, cols, bits=8)
    values = pixels.astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", values, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return _encapsulated(values, 8, pydicom.uid.JPEGBaseline8Bit, jpeg.tobytes())


def test_a_jpeg_baseline_file_through_the_cpu_decode_is_the_cpu_paths(registry) -> None:
    """(The data set the GPU test decodes on the device, here through the CPU decode.)"""
    manifest = registry.models["mr-brain"].manifest
    ds = _jpeg_baseline()
    ref = list(iter_prepared([copy.deepcopy(ds)], PrepareSpec(manifest)))
    _assert_same(ref, list(_numpy_preparer().stream([copy.deepcopy(ds)], PrepareSpec(manifest))), manifest)


@pytest.mark.parametrize(
    "bits, signed, declared",
    [(12, False, 12), (12, True, 12), (16, True, 16), (10, False, 10), (10, False, 12), (14, True, 16)],
)
@pytest.mark.parametrize("garbage", [False, True])
def test_device_decode_gives_pydicoms_stored_values(bits, signed, declared, garbage) -> None:
    """Samples of ``bits`` precision in a data set whose BitsStored is ``declared`` (at least
    the precision: 693_J2KR.dcm has 14 in 16), as a GPU decoder may return them."""
    rng = np.random.default_rng(bits)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = rng.integers(lo, hi + 1, (40, 56)).astype(np.int16 if signed else np.uint16)
    ds = _j2k(values, bits, signed)
    ds.BitsStored, ds.HighBit = declared, declared - 1
    codec = _FakeCodec(ds, garbage=garbage)
    header = header_from_dataset(ds)
    codestream = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    got = gp.decode_on_device(np, codec, codec, codestream, pydicom.uid.JPEG2000Lossless, header)
    ref = decode_frame(ds, 0).frame(0)
    assert got is not None and got.dtype == ref.dtype and np.array_equal(got, ref)


def test_device_decode_failures_fall_back_to_the_cpu(registry, caplog, tmp_path) -> None:
    pixels, _ = _synthetic(200, 180)
    ds = _j2k(pixels, 12, False)
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    manifest = registry.models["mr-brain"].manifest
    ref = list(iter_prepared([copy.deepcopy(ds)], PrepareSpec(manifest)))
    for fail in (False, True):
        codec = _FakeCodec(copy.deepcopy(ds), fail=fail)
        preparer = _numpy_preparer()
        preparer._codec, preparer._decoder = codec, codec
        with caplog.at_level(logging.DEBUG, logger="node.inference.gpu_prepare"):
            got = list(preparer.stream([copy.deepcopy(ds)], PrepareSpec(manifest)))
        assert codec.calls == 1
        _assert_same(ref, got, manifest)
        if fail:
            failed = [r.getMessage() for r in caplog.records if "device decode failed" in r.getMessage()]
            assert failed and pydicom.uid.JPEG2000Lossless in failed[0]


@pytest.mark.parametrize(
    "name, model_id", [("MR2_J2KR.dcm", "mr-brain"), ("693_J2KR.dcm", "ct-liver"), ("RG1_J2KR.dcm", "cxr")]
)
def test_device_decoded_files_prepare_as_on_the_cpu(registry, name, model_id) -> None:
    """Real JPEG 2000 files through the device decode's path (the stand-in decoder): MR, a
    signed CT whose codestream has 14 bits for BitsStored 16, a 15-bit MONOCHROME1 CR: the
    CPU path's frames, tensors and displays."""
    manifest = registry.models[model_id].manifest
    path = _testdata(name)
    codec = _FakeCodec(pydicom.dcmread(path), garbage=True)
    preparer = _numpy_preparer()
    preparer._codec, preparer._decoder = codec, codec
    got = list(preparer.stream([path], PrepareSpec(manifest)))
    ref = list(iter_prepared([path], PrepareSpec(manifest)))
    assert codec.calls == len(ref) == int(pydicom.dcmread(path).get("NumberOfFrames", 1))
    _assert_same(ref, got, manifest)


def _openjph(source: Path, ts: str) -> Dataset:
    """``source`` (uncompressed, one frame) as an HTJ2K file written by OpenJPH (itkwasm-htj2k,
    the dev extra), lossless, one tile; RPCL order for .202."""
    htj2k = pytest.importorskip("itkwasm_htj2k", reason="itkwasm-htj2k (dev extra) writes HTJ2K")
    itkwasm = pytest.importorskip("itkwasm")
    ds = pydicom.dcmread(source)
    frame = np.ascontiguousarray(ds.pixel_array)
    rows, cols = frame.shape
    image = itkwasm.Image(
        itkwasm.ImageType(dimension=2, componentType=frame.dtype.name, pixelType="Scalar", components=1),
        size=[cols, rows],
        data=frame,
    )
    stream = htj2k.encode(
        image,
        decompositions=5,
        not_reversible=False,
        quantization_step=1,
        progression_order=2 if ts == pydicom.uid.HTJ2KLosslessRPCL else 1,
        tile_size=[cols, rows],
        tile_offset=[0, 0],
        block_dimensions=[64, 64],
    )
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(ts)
    ds.PixelData = encapsulate([bytes(stream)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("ts", [pydicom.uid.HTJ2KLossless, pydicom.uid.HTJ2KLosslessRPCL])
def test_htj2k_files_through_the_device_decode_path(registry, ts) -> None:
    """A signed 16-bit CT written as HTJ2K by OpenJPH, through the device decode's path (the
    stand-in decoder): taken there (its precision is BitsStored), the CPU path's results."""
    ds = _openjph(_testdata("CT_small.dcm"), ts)
    manifest = registry.models["ct-liver"].manifest
    codec = _FakeCodec(ds, garbage=True)
    preparer = _numpy_preparer()
    preparer._codec, preparer._decoder = codec, codec
    got = list(preparer.stream([copy.deepcopy(ds)], PrepareSpec(manifest)))
    assert codec.calls == 1
    _assert_same(list(iter_prepared([copy.deepcopy(ds)], PrepareSpec(manifest))), got, manifest)


@pytest.mark.parametrize("name", ["J2K_pixelrep_mismatch.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_precision_or_sign_other_than_the_data_sets_is_left_to_pydicom(registry, name) -> None:
    """A codestream signed where the data set says unsigned (pydicom corrects it), or of more
    bits than BitsStored (16 for 12: pydicom's handling), is decoded on the CPU; a 10-frame
    file of such frames prepares as on the CPU through that fallback."""
    path = _testdata(name)
    ds = pydicom.dcmread(path)
    header = header_from_dataset(ds)
    codestream = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=header.number_of_frames)
    codec = _FakeCodec(ds)
    assert gp.decode_on_device(np, codec, codec, codestream, pydicom.uid.JPEG2000Lossless, header) is None
    assert codec.calls == 0
    if header.number_of_frames > 1:
        manifest = registry.models["mr-brain"].manifest
        preparer = _numpy_preparer()
        preparer._codec, preparer._decoder = codec, codec
        got = list(preparer.stream([path], PrepareSpec(manifest)))
        _assert_same(list(iter_prepared([path], PrepareSpec(manifest))), got, manifest)
        assert len(got) == 10


# -- on a GPU (skipped without one) --------------------------------------------------------------


def _cupy_and_codec() -> tuple[Any, Any]:
    cupy = pytest.importorskip("cupy")
    nvimgcodec = pytest.importorskip("nvidia.nvimgcodec")
    return cupy, nvimgcodec


def _device_decode(path_or_ds: Path | Dataset) -> tuple[np.ndarray | None, np.ndarray]:
    cupy, nvimgcodec = _cupy_and_codec()
    ds = read_dataset(path_or_ds)
    header = header_from_dataset(ds)
    ts = pydicom.uid.UID(header.transfer_syntax_uid)
    codestream = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=header.number_of_frames)
    got = gp.decode_on_device(cupy, nvimgcodec, nvimgcodec.Decoder(), codestream, ts, header)
    ref = decode_frame(ds, 0).frame(0)
    return (None if got is None else cupy.asnumpy(got)), ref


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name",
    [
        "RG1_J2KR.dcm",
        "MR2_J2KR.dcm",
        "693_J2KR.dcm",
        "MR_small_jp2klossless.dcm",
        "examples_jpeg2k.dcm",  # colour, YBR_RCT (reversible) to RGB
    ],
)
def test_gpu_lossless_jpeg2000_is_pydicoms(name) -> None:
    """CR 15-bit MONOCHROME1, MR 12-bit, signed CT (14-bit codestream), signed MR, colour."""
    got, ref = _device_decode(_testdata(name))
    assert got is not None, "the device decode should take it"
    assert got.dtype == ref.dtype and np.array_equal(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name", ["RG1_J2KI.dcm", "MR2_J2KI.dcm", "SC_rgb_jpeg_dcmtk.dcm", "color3d_jpeg_baseline.dcm"]
)
def test_gpu_lossy_decodes_within_a_level_or_two(name) -> None:
    """Lossy codestreams decode to decoder-dependent values (the 9/7 wavelet, the IDCT and the
    chroma upsampling are implementation-defined within the standards' tolerance): provisional
    bound, measured on the first lent device."""
    got, ref = _device_decode(_testdata(name))
    if got is None:
        pytest.skip("the device decode declined this file (colour model or precision)")
    diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert diff.max() <= 4 and diff.mean() <= 0.5, (int(diff.max()), float(diff.mean()))


@pytest.mark.gpu
def test_gpu_jpeg_baseline_greyscale_and_htj2k() -> None:
    """JPEG baseline within two levels (IDCTs differ); HTJ2K lossless (encoded on the device
    as a bare codestream, 16 bits as its encoder writes uint16) bit for bit."""
    cupy, nvimgcodec = _cupy_and_codec()
    got, ref = _device_decode(_jpeg_baseline())
    assert got is not None
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2
    pixels, _ = _synthetic(300, 260, bits=12)
    params = nvimgcodec.Jpeg2kEncodeParams()
    params.ht = True
    params.bitstream_type = nvimgcodec.Jpeg2kBitstreamType.J2K
    encode = nvimgcodec.EncodeParams(
        quality_type=nvimgcodec.QualityType.LOSSLESS, jpeg2k_encode_params=params
    )
    stream = nvimgcodec.Encoder().encode(pixels, codec="jpeg2k", params=encode)
    ht = _encapsulated(pixels, 16, pydicom.uid.HTJ2KLossless, bytes(stream))
    got, ref = _device_decode(ht)
    assert got is not None, "the device decode should take it"
    assert np.array_equal(got, ref) and np.array_equal(ref, pixels)


@pytest.mark.gpu
@pytest.mark.parametrize("ts", [pydicom.uid.HTJ2KLossless, pydicom.uid.HTJ2KLosslessRPCL])
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_gpu_htj2k_from_openjph_is_pydicoms(name, ts) -> None:
    """HTJ2K lossless written by another implementation (OpenJPH), signed 16-bit CT and MR."""
    got, ref = _device_decode(_openjph(_testdata(name), ts))
    assert got is not None, "the device decode should take it"
    assert got.dtype == ref.dtype and np.array_equal(got, ref)


@pytest.mark.gpu
def test_gpu_preparer_streams_device_tensors_as_the_cpu_path(registry, phantoms) -> None:
    cupy, _ = _cupy_and_codec()
    manifest = _scaffold_chest(registry)
    files = [*phantoms["cxr"], *phantoms["cxr-mono1"]]
    compressed = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
        target = path.with_suffix(".j2k.dcm")
        ds.save_as(target)
        compressed.append(target)
    spec = PrepareSpec(manifest)
    preparer = gp.GpuPreparer()
    assert preparer.device_decode
    for batch in (files, compressed):
        got = list(preparer.stream(batch, spec))
        assert all(isinstance(f.model_input.tensor, cupy.ndarray) for f in got)
        joined = concatenate([f.model_input.tensor for f in got])
        assert isinstance(joined, cupy.ndarray) and joined.shape[0] == len(got)
        assert isinstance(to_host(joined), np.ndarray)
        host = [
            type(f)(
                f.item,
                f.index,
                f.dataset,
                f.header,
                type(f.model_input)(
                    cupy.asnumpy(f.model_input.tensor), f.model_input.geometry, f.model_input.layout
                ),
                f.display,
            )
            for f in got
        ]
        _assert_same(list(iter_prepared(batch, spec)), host, manifest)
