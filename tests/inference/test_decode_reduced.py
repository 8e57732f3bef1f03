"""JPEG 2000 decoded at a reduced resolution (``decode_reduced``, node/inference/reduce.py
``prepare_frames``): the wavelet's low-pass image stands in for the first area average, so the
model input differs from the full decode's by a stated tolerance, the bundled models'
probabilities by less than 0.01, and the geometry still maps to source pixels; off (the
default), or where it cannot apply, the full decode runs unchanged."""

from __future__ import annotations

import tempfile
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from node.budget import Budget
from node.errors import BudgetExceeded
from node.inference.codestream import j2k_levels
from node.inference.decode import iter_frames, iter_frames_reduced
from node.inference.manifest import Manifest
from node.inference.preprocess import prepare
from node.inference.reduce import decode_reduction, prepare_frames
from node.inference.registry import load_registry
from node.inference.runtime import RuntimeConfig, create_session
from node.synth import generate_study

from .test_reduce import _grey_scale, _scores

REPO = Path(__file__).resolve().parents[2]
#: grey levels (0..255, before normalisation) the reduced model input may differ by: the 5/3
#: low pass is not an area average (half a pixel off, sharper), so edges differ most (measured:
#: chest max 17-20, mean 0.8-1.0; mammography max 45-57, mean 1.2-1.4)
MAX_GREY = 64.0
MEAN_GREY = 2.0
#: label probabilities: chest within 0.01 (measured <= 0.0002); the mammography patch model
#: (max over 64x64 tiles) moves more (measured up to 0.028 on one view): its manifest keeps the
#: full decode, and this bound records how far the reduced one would move it
MAX_DP = {"cxr": 0.01, "mammo": 0.05}


@pytest.fixture(scope="module")
def registry():
    return load_registry(REPO / "models" / "onnx", strict=True)


@pytest.fixture(scope="module")
def phantoms() -> dict[str, list[pydicom.Dataset]]:
    """Chest and mammography phantoms, JPEG 2000 lossless."""
    out = Path(tempfile.mkdtemp(prefix="j2k-"))
    found: dict[str, list[pydicom.Dataset]] = {}
    for kind, seeds, options in (("cxr", (1, 2, 3), {"scale": 0.5}), ("mammo", (1,), {"scale": 0.5})):
        for seed in seeds:
            generate_study(kind, out / f"{kind}{seed}", seed=seed, **options)
        found[kind] = []
        for path in sorted(out.glob(f"{kind}*/**/*.dcm")):
            ds = pydicom.dcmread(path)
            ds.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
            found[kind].append(ds)
    return found


def _on(manifest: Manifest) -> Manifest:
    data = manifest.model_dump(mode="json")
    data["decode_reduced"] = True
    return Manifest.model_validate(data)


def _one(ds: pydicom.Dataset, manifest: Manifest):
    # no size check: the mammography model is a patch model (it tiles the prepared image)
    ((decoded, model_input),) = list(prepare_frames(ds, manifest, check_size=False))
    return decoded, model_input


@pytest.mark.parametrize("model_id", ["cxr", "mammo"])
def test_bundled_models_give_the_same_probabilities_from_the_reduced_decode(registry, phantoms, model_id):
    model = registry.models[model_id]
    manifest = model.manifest
    session = create_session(model, RuntimeConfig())
    unit = _grey_scale(manifest)
    for ds in phantoms[model_id]:
        full_decoded, full = _one(ds, manifest)
        small_decoded, small = _one(ds, _on(manifest))
        assert small_decoded.pixels.shape[1] < full_decoded.pixels.shape[1], "the reduced path should run"
        diff = np.abs(full.tensor - small.tensor) / unit
        assert diff.max() <= MAX_GREY and diff.mean() <= MEAN_GREY, (float(diff.max()), float(diff.mean()))
        p_full, p_small = _scores(manifest, session, full.tensor), _scores(manifest, session, small.tensor)
        assert np.abs(p_full - p_small).max() < MAX_DP[model_id], (p_full, p_small)
        # the geometry maps model pixels to the same source pixels (within one reduced pixel)
        step = full_decoded.pixels.shape[1] / small_decoded.pixels.shape[1]
        g, h = full.geometry, small.geometry
        assert g.source_shape == h.source_shape and g.model_shape == h.model_shape
        for corner in ((0, 0), (g.model_shape[0] - 1, g.model_shape[1] - 1), (37.0, 52.0)):
            a, b = g.to_source(*corner), h.to_source(*corner)
            assert abs(a[0] - b[0]) <= step and abs(a[1] - b[1]) <= step, (corner, a, b)


def test_off_by_default_and_the_full_decode_unchanged(registry, phantoms):
    manifest = registry.models["cxr"].manifest
    assert manifest.decode_reduced is False
    ds = phantoms["cxr"][0]
    decoded, model_input = _one(ds, manifest)
    (reference,) = list(iter_frames(ds))
    assert decoded.pixels.shape == reference.pixels.shape
    assert np.array_equal(model_input.tensor, prepare(reference, manifest).tensor)


def test_on_but_not_jpeg_2000_runs_the_full_decode(registry):
    out = Path(tempfile.mkdtemp(prefix="j2k-native-"))
    generate_study("cxr", out, seed=4, scale=0.5)
    ds = pydicom.dcmread(sorted(out.glob("**/*.dcm"))[0])
    manifest = registry.models["cxr"].manifest
    _, on = _one(ds, _on(manifest))
    _, off = _one(ds, manifest)
    assert np.array_equal(on.tensor, off.tensor)


def test_never_more_levels_than_the_codestream_has(phantoms):
    ds = phantoms["cxr"][0]
    from pydicom.encaps import get_frame

    levels = j2k_levels(get_frame(ds.PixelData, 0, number_of_frames=1))
    assert levels == 5  # OpenJPEG's default
    ((image, k),) = list(iter_frames_reduced(ds, 9))
    assert 0 < k <= levels
    assert image.pixels.shape[1:] == (-(-ds.Rows // 2**k), -(-ds.Columns // 2**k))


def test_the_budget_is_checked_before_decoding(registry, phantoms):
    ds = phantoms["cxr"][0]
    tight = Budget(max_frame_pixels=1000)
    with pytest.raises(BudgetExceeded, match="max_frame_pixels"):
        list(prepare_frames(ds, _on(registry.models["cxr"].manifest), tight))
    with pytest.raises(BudgetExceeded, match="max_frame_pixels"):
        list(iter_frames_reduced(ds, 2, tight))


def test_a_model_that_sees_full_resolution_is_not_reduced(registry):
    steps = registry.models["fundus-dr"].manifest.preprocessing  # circular crop first
    assert decode_reduction(steps, (4000, 4000)) == 0
    assert decode_reduction(registry.models["cxr"].manifest.preprocessing, (2500, 3000)) == 4


@pytest.mark.parametrize(
    "dtype, bits, pi",
    [
        ("int16", 12, "MONOCHROME2"),
        ("uint16", 16, "MONOCHROME2"),
        ("uint8", 8, "MONOCHROME2"),
        ("uint8", 8, "RGB"),
    ],
)
def test_stored_values_survive_pillow_for_every_depth(dtype, bits, pi):
    """Pillow scales 12-bit to 16 and offsets signed values: undone, the reduced image is the
    area average of the full one within a few stored values (the 5/3 wavelet's low pass)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rows, cols = 400, 300
    y, x = np.mgrid[0:rows, 0:cols]
    top = 2 ** (bits - 1) if dtype.startswith("int") else 2**bits
    smooth = (np.sin(y / 40.0) * np.cos(x / 30.0) * 0.45 + 0.5) * (top - 1)
    if dtype.startswith("int"):
        smooth = smooth * 2 - (top - 1)
    arr = smooth.astype(dtype)
    if pi == "RGB":
        arr = np.stack([arr, arr[::-1], arr[:, ::-1]], axis=-1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if pi == "RGB" else 1
    ds.PhotometricInterpretation = pi
    if pi == "RGB":
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelRepresentation = 1 if dtype.startswith("int") else 0
    ds.PixelData = arr.tobytes()
    ds.compress(pydicom.uid.JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ((image, k),) = list(iter_frames_reduced(ds, 2))
    assert k == 2
    small = image.pixels[0]
    assert small.dtype == arr.dtype
    expected = cv2.resize(arr.astype(np.float32), (cols // 4, rows // 4), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(np.float32) - expected).max() <= 0.05 * (top - 1)


def test_the_option_is_a_strict_boolean(registry):
    data = registry.models["cxr"].manifest.model_dump(mode="json")
    assert Manifest.model_validate({**data, "decode_reduced": True}).decode_reduced is True
    with pytest.raises(ValueError, match="decode_reduced"):
        Manifest.model_validate({**data, "decode_reduced": "yes"})


def test_the_node_s_preparation_uses_it_where_no_display_is_kept(registry, phantoms, tmp_path):
    """PrepareSpec (what jobs and the preparation processes run) takes the reduced decode for a
    file whose display it does not keep (series-level models decode their shown frames again),
    and the full decode where it keeps the full-resolution display."""
    from node.inference.prepared import PrepareSpec

    manifest = _on(registry.models["cxr"].manifest)
    path = tmp_path / "cxr.dcm"
    phantoms["cxr"][0].save_as(path)
    _, expected = _one(pydicom.dcmread(path), manifest)
    (lean,) = PrepareSpec(manifest, check_size=False, keep_display=False).prepare(path, 0)
    assert lean.display is None
    assert np.array_equal(lean.model_input.tensor, expected.tensor)
    (shown,) = PrepareSpec(manifest, check_size=False, keep_display=True).prepare(path, 0)
    _, full = _one(pydicom.dcmread(path), registry.models["cxr"].manifest)
    assert shown.display is not None and shown.display.shape == (shown.header.rows, shown.header.cols)
    assert np.array_equal(shown.model_input.tensor, full.tensor)
    assert not np.array_equal(lean.model_input.tensor, full.tensor)
    # a model that shows no image (heatmap: none) keeps no display, even of a data set handed in,
    # so its frames take the reduced decode at image level too
    (plain,) = PrepareSpec(manifest, check_size=False, shows=False).prepare(pydicom.dcmread(path), 0)
    assert plain.display is None and np.array_equal(plain.model_input.tensor, expected.tensor)
