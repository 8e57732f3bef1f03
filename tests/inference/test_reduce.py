"""Reduce early (node/inference/reduce.py): area-resizing the stored integers before the intensity
steps gives the model the input the full-resolution path gives (float rounding apart) and the
bundled models the same probabilities; wherever the conditions do not hold the exact path runs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from node.inference.decode import decode
from node.inference.explain import patch_scores
from node.inference.manifest import Manifest, PatchHeatmap
from node.inference.postprocess import probabilities
from node.inference.preprocess import prepare, run_steps
from node.inference.reduce import reduce_early
from node.inference.registry import load_registry
from node.inference.runtime import RuntimeConfig, create_session
from node.synth import generate_study

REPO = Path(__file__).resolve().parents[2]
#: grey levels (0..255, before normalisation) the model input may differ by: float rounding
MAX_GREY = 1e-3
MEAN_GREY = 1e-4


@pytest.fixture(scope="module")
def registry():
    return load_registry(REPO / "models" / "onnx", strict=True)


@pytest.fixture(scope="module")
def phantoms() -> dict[str, list[Path]]:
    out = Path(tempfile.mkdtemp(prefix="reduce-"))
    files: dict[str, list[Path]] = {}
    for kind, seeds, options in (("cxr", (1, 2, 3), {"scale": 0.5}), ("mammo", (1,), {"scale": 1.0})):
        for seed in seeds:
            generate_study(kind, out / f"{kind}{seed}", seed=seed, **options)
        files[kind] = sorted((out).glob(f"{kind}*/**/*.dcm"))
    return files


def _grey_scale(manifest: Manifest) -> float:
    """Model-input units per grey level (the normalize step's divisor)."""
    norm = next(s for s in manifest.preprocessing if s.op == "normalize")
    return 1.0 / (norm.max_pixel_value * min(norm.std))


def _scores(manifest: Manifest, session, tensor: np.ndarray) -> np.ndarray:
    """The image's label probabilities as the node computes them (a patch model: max over tiles)."""

    def predict(batch: np.ndarray) -> np.ndarray:
        return probabilities(manifest, session.run(batch)[manifest.outputs.probabilities])

    spec = manifest.heatmap
    if isinstance(spec, PatchHeatmap):
        scores, _ = patch_scores(tensor, predict, tuple(spec.patch_size), tuple(spec.stride))
        return scores.max(axis=0)
    return predict(tensor)


def _both(decoded, manifest: Manifest):
    spec = manifest.input
    # no size check: the mammography model is a patch model (it tiles the prepared image)
    kwargs = dict(layout=spec.layout, dtype=spec.dtype, expected_channels=spec.channels)
    exact = run_steps(decoded.frame(0), decoded.header, manifest.preprocessing, reduce=False, **kwargs)
    fast = run_steps(decoded.frame(0), decoded.header, manifest.preprocessing, reduce=True, **kwargs)
    return exact, fast


@pytest.mark.parametrize("model_id, kind", [("cxr", "cxr"), ("mammo", "mammo")])
def test_bundled_models_see_the_same_input_and_give_the_same_probabilities(
    registry, phantoms, model_id, kind
):
    model = registry.models[model_id]
    manifest = model.manifest
    session = create_session(model, RuntimeConfig())
    unit = _grey_scale(manifest)
    reduced_any = False
    for path in phantoms[kind]:
        decoded = decode(path)
        shown = reduce_early(
            decoded.frame(0), decoded.header, manifest.preprocessing, _prefix_for(manifest, decoded.header)
        )
        reduced_any |= shown is not None
        exact, fast = _both(decoded, manifest)
        diff = np.abs(exact.tensor - fast.tensor) / unit
        assert diff.max() <= MAX_GREY, (path.name, float(diff.max()))
        assert diff.mean() <= MEAN_GREY, (path.name, float(diff.mean()))
        for a, b in zip(
            (
                exact.geometry.scale_y,
                exact.geometry.scale_x,
                exact.geometry.offset_y,
                exact.geometry.offset_x,
            ),
            (fast.geometry.scale_y, fast.geometry.scale_x, fast.geometry.offset_y, fast.geometry.offset_x),
            strict=True,
        ):
            assert a == pytest.approx(b, abs=1e-9)
        assert exact.geometry.source_shape == fast.geometry.source_shape
        p_exact, p_fast = _scores(manifest, session, exact.tensor), _scores(manifest, session, fast.tensor)
        assert np.abs(p_exact - p_fast).max() < 1e-4, (path.name, p_exact, p_fast)
    assert reduced_any, "the full-size phantoms should take the reduced path"


def _manifest_with(registry, steps: list[dict], size=(128, 128)) -> Manifest:
    data = registry.models["cxr"].manifest.model_dump(mode="json")
    data["preprocessing"] = steps
    data["input"]["shape"] = [None, 1, *size]
    return Manifest.model_validate(data)


def _cxr(phantoms):
    return decode(phantoms["cxr"][0])


LINEAR = [{"op": "modality_lut"}, {"op": "window", "source": "explicit", "center": 1500, "width": 900}]
TAIL = [
    {"op": "letterbox", "size": [128, 128], "interpolation": "area"},
    {"op": "normalize", "mean": [0.5], "std": [0.25]},
]


def test_a_narrow_clipping_window_is_reduced_within_tolerance(registry, phantoms):
    """Half the image clipped by the window: the stored-domain clip keeps the result."""
    manifest = _manifest_with(registry, LINEAR + [{"op": "invert_monochrome1"}] + TAIL)
    decoded = _cxr(phantoms)
    assert reduce_early(
        decoded.frame(0), decoded.header, manifest.preprocessing, _prefix_for(manifest, decoded.header)
    )
    exact, fast = _both(decoded, manifest)
    diff = np.abs(exact.tensor - fast.tensor) / _grey_scale(manifest)
    assert diff.max() <= MAX_GREY and diff.mean() <= MEAN_GREY, (float(diff.max()), float(diff.mean()))


@pytest.mark.parametrize(
    "steps, why",
    [
        (
            [{"op": "modality_lut"}, {"op": "window", "source": "explicit", "center": 1500, "width": 900}]
            + [{"op": "clahe"}]
            + TAIL,
            "CLAHE before the resize is not pointwise",
        ),
        (
            LINEAR + [{"op": "letterbox", "size": [128, 128], "interpolation": "linear"}] + TAIL[1:],
            "only an area resize averages",
        ),
        (
            [{"op": "modality_lut"}, {"op": "to_8bit", "method": "naive"}] + TAIL,
            "quantising to 8 bits is not affine",
        ),
    ],
)
def test_the_exact_path_runs_where_the_conditions_fail(registry, phantoms, steps, why):
    manifest = _manifest_with(registry, steps)
    decoded = _cxr(phantoms)
    exact, fast = _both(decoded, manifest)
    assert np.array_equal(exact.tensor, fast.tensor), why


def test_a_sigmoid_window_is_not_affine_so_runs_exactly(registry, phantoms):
    decoded = _cxr(phantoms)
    header = decoded.header
    from dataclasses import replace

    sigmoid = replace(header, voi_lut_function="SIGMOID", window_centers=(1500.0,), window_widths=(900.0,))
    manifest = _manifest_with(registry, [{"op": "modality_lut"}, {"op": "window", "source": "header"}] + TAIL)
    got = reduce_early(decoded.frame(0), sigmoid, manifest.preprocessing, _prefix_for(manifest, sigmoid))
    assert got is None
    a = run_steps(decoded.frame(0), sigmoid, manifest.preprocessing, reduce=False).tensor
    b = run_steps(decoded.frame(0), sigmoid, manifest.preprocessing, reduce=True).tensor
    assert np.array_equal(a, b)


def _prefix_for(manifest: Manifest, header):
    def run(values: np.ndarray, n: int):
        out = run_steps(values, header, manifest.preprocessing[:n], reduce=False)
        return out.tensor[0, 0], None

    return run


def test_an_enlargement_runs_exactly(registry):
    """A small image enlarged to the model size: nothing to save, the exact path runs."""
    decoded = decode(get_testdata_file("MR_small.dcm", download=False))
    steps = [{"op": "modality_lut"}, {"op": "window", "source": "explicit", "center": 600, "width": 800}]
    manifest = _manifest_with(registry, steps + TAIL)
    header = decoded.header
    assert (
        reduce_early(decoded.frame(0), header, manifest.preprocessing, _prefix_for(manifest, header)) is None
    )
    a = run_steps(decoded.frame(0), header, manifest.preprocessing, reduce=False).tensor
    b = run_steps(decoded.frame(0), header, manifest.preprocessing, reduce=True).tensor
    assert np.array_equal(a, b)


def test_real_vendor_radiographs_reduce_to_the_same_input(registry):
    """pydicom-data's real CR (MONOCHROME1 among them) through the bundled chest preprocessing."""
    manifest = registry.models["cxr"].manifest
    unit = _grey_scale(manifest)
    seen = 0
    for name in ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG3_UNCR.dcm", "RG3_UNCI.dcm"):
        path = get_testdata_file(name)
        if path is None:
            continue
        decoded = decode(path)
        if reduce_early(
            decoded.frame(0), decoded.header, manifest.preprocessing, _prefix_for(manifest, decoded.header)
        ):
            seen += 1
        exact, fast = _both(decoded, manifest)
        diff = np.abs(exact.tensor - fast.tensor) / unit
        assert diff.max() <= MAX_GREY, (name, float(diff.max()))
    assert seen >= 1


def test_prepare_uses_the_reduced_path_for_the_node(registry, phantoms):
    """`prepare` (what the runner calls) takes the reduced path: same result as run_steps(reduce=True)."""
    manifest = registry.models["cxr"].manifest
    decoded = decode(phantoms["cxr"][1])
    via_prepare = prepare(decoded, manifest).tensor
    _, fast = _both(decoded, manifest)
    assert np.array_equal(via_prepare, fast.tensor)
