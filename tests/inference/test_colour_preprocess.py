"""The colour preprocessing ops (issue 20) against independent computations (NumPy, SciPy, OpenCV
called directly), the executor on RGB input, and the refusals: greyscale ops on colour, colour ops
on greyscale, in the manifest and at run time."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from node.errors import ManifestError, PreprocessError
from node.inference import preprocess as pp
from node.inference.manifest import (
    CircularCropStep,
    ClaheLuminanceStep,
    IlluminationCorrectionStep,
    ModalityLutStep,
    NormalizeStep,
    ResizeStep,
    WindowStep,
    parse_manifest,
)

from .conftest import example_manifest_dict
from .conftest import make_header as header

MEAN = [0.5, 0.4, 0.3]
STD = [0.25, 0.2, 0.15]


def rgb_header(rows: int, cols: int, **kw):
    """An 8-bit RGB photograph's header (Ophthalmic Photography)."""
    base = dict(
        modality="OP",
        rows=rows,
        cols=cols,
        samples_per_pixel=3,
        photometric_interpretation="RGB",
        stored_photometric_interpretation="YBR_FULL_422",
        bits_allocated=8,
        bits_stored=8,
    )
    base.update(kw)
    return header(**base)


def fundus_like(rows: int = 90, cols: int = 120, seed: int = 3) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An RGB picture with a bright textured disc (the field of view) on black, clipped at the top
    (as real fundus photographs often are); returns it and the disc's (centre row, centre col, radius)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:rows, :cols]
    cy, cx, r = 40, 66, 44  # reaches row -4: clipped at the top
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img = np.zeros((rows, cols, 3), dtype=np.uint8)
    base = np.stack([170 + 40 * np.sin(xx / 9.0), 80 + 30 * np.cos(yy / 7.0), 40 + 0 * xx], axis=-1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    img[disc] = noisy[disc]
    return img, (cy, cx, r)


# ------------------------------------------------------------------------------------------------
# circular_crop


def _reference_crop(img: np.ndarray, threshold: float, margin: float) -> tuple[np.ndarray, int, int, int]:
    """The crop as the manifest documents it, in NumPy alone."""
    f = img.astype(np.float64)
    lum = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
    ys, xs = np.nonzero(lum > threshold * lum.max())
    r0, r1, c0, c1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    diameter = max(r1 - r0, c1 - c0)
    side = int(round(diameter * (1 + 2 * margin)))
    grow = (side - diameter) // 2

    def start(lo, hi, n):  # a disc cut off at one edge of the frame sits flush with the other end
        if hi - lo < diameter and lo == 0 and hi < n:
            return hi - diameter
        if hi - lo < diameter and hi == n and lo > 0:
            return lo
        return (lo + hi - diameter) // 2

    top = start(r0, r1, img.shape[0]) - grow
    left = start(c0, c1, img.shape[1]) - grow
    out = np.zeros((side, side, 3))
    for y in range(side):
        for x in range(side):
            sy, sx = top + y, left + x
            inside = (y - (side - 1) / 2) ** 2 + (x - (side - 1) / 2) ** 2 <= (side / 2) ** 2
            if inside and 0 <= sy < img.shape[0] and 0 <= sx < img.shape[1]:
                out[y, x] = img[sy, sx]
    return out, top, left, side


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_circular_crop_matches_the_documented_computation(margin):
    img, (cy, cx, r) = fundus_like()
    fov = pp.field_of_view(img, 0.04, margin)
    got = pp.circular_crop(img, fov)
    expected, top, left, side = _reference_crop(img, 0.04, margin)
    assert (fov.top, fov.left, fov.side) == (top, left, side)
    np.testing.assert_array_equal(got, expected)
    # the disc found is the one drawn (side = its diameter when margin is 0), clipped top padded
    if margin == 0.0:
        assert side == 2 * r + 1 and top == cy - r and left == cx - r
    assert top < 0 and np.all(got[:-top, side // 2] == 0)


def test_circular_crop_threshold_and_black_image():
    img, _ = fundus_like()
    dim = img.copy()
    dim[80:86, 2:6] = 12  # a faint patch outside the disc
    lum_max = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).max()
    assert 0.04 * lum_max < 12  # taken into the field of view at 0.04 ...
    assert pp.field_of_view(dim, 0.04).side > pp.field_of_view(img, 0.04).side
    assert pp.field_of_view(dim, 12.5 / lum_max) == pp.field_of_view(img, 0.04)  # ... not above it
    with pytest.raises(PreprocessError, match="no field of view"):
        pp.field_of_view(np.zeros((8, 8, 3), np.uint8))


def test_circular_crop_in_the_executor_keeps_the_geometry():
    """The crop is an offset in the geometry: the model pixel at the disc's centre maps back to
    the drawn centre (heatmaps land on the source image where the model looked)."""
    img, (cy, cx, r) = fundus_like()
    steps = [CircularCropStep(op="circular_crop"), ResizeStep(op="resize", size=(45, 45))]
    out = pp.run_steps(img, rgb_header(*img.shape[:2]), steps, expected_hw=(45, 45), expected_channels=3)
    assert out.tensor.shape == (1, 3, 45, 45)
    row, col = out.geometry.to_source(22, 22)
    assert abs(row - cy) < 1.0 and abs(col - cx) < 1.0
    top_row, mid_col = out.geometry.to_model(cy - r, cx)  # the disc's top edge: the model's first row
    assert abs(top_row) < 0.5 and abs(mid_col - 22) < 0.5


# ------------------------------------------------------------------------------------------------
# clahe_luminance


@pytest.mark.parametrize(("clip", "grid"), [(2.0, 8), (4.0, 3)])
def test_clahe_luminance_equals_opencv_on_the_lab_l_channel(clip, grid):
    img, _ = fundus_like(seed=5)
    lab = cv2.cvtColor(img, cv2.COLOR_RGB2Lab)
    l_chan, a_chan, b_chan = cv2.split(lab)
    l_eq = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(l_chan)
    expected = cv2.cvtColor(cv2.merge([l_eq, a_chan, b_chan]), cv2.COLOR_Lab2RGB)
    got = pp.clahe_luminance(img.astype(np.float32), clip, grid)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    # luminance contrast rises, the hue of the disc stays (a and b are kept; the RGB round trip clips)
    got_lab = cv2.cvtColor(got.astype(np.uint8), cv2.COLOR_RGB2Lab)
    assert got_lab[..., 0].std() > lab[..., 0].std()
    assert np.abs(got_lab[..., 1].astype(int) - a_chan).mean() < 6.0  # gamut clipping only


# ------------------------------------------------------------------------------------------------
# illumination_correction


def test_illumination_correction_equals_graham_with_scipy_gaussian():
    """4 * (I - G) + 128, G from SciPy's Gaussian (mirror = OpenCV's reflect-101 borders)."""
    img, _ = fundus_like(seed=8)
    rows, cols = img.shape[:2]
    sigma = 0.1 * min(rows, cols)
    f = img.astype(np.float64)
    blurred = np.stack(
        [ndimage.gaussian_filter(f[..., c], sigma, mode="mirror", truncate=4.0) for c in range(3)], axis=-1
    )
    expected = np.clip(4 * (f - blurred) + 128, 0, 255)
    got = pp.illumination_correction(img, 0.1)
    assert got.shape == img.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=0.25)
    # an uneven illumination (a ramp) is taken out: the two halves of a flat disc come out alike
    flat = np.full((64, 64, 3), 100.0)
    flat *= np.linspace(0.6, 1.4, 64)[None, :, None]
    corrected = pp.illumination_correction(flat, 0.05)
    inner = corrected[16:48, 16:48]
    assert abs(inner[:, :16].mean() - inner[:, 16:].mean()) < 1.0
    assert abs(flat[16:48, 16:32].mean() - flat[16:48, 32:48].mean()) > 10


# ------------------------------------------------------------------------------------------------
# The executor: resize and per-channel normalize on colour, NCHW


def test_colour_pipeline_end_to_end_against_direct_computation():
    img, _ = fundus_like(seed=11)
    steps = [
        CircularCropStep(op="circular_crop", threshold=0.04),
        ClaheLuminanceStep(op="clahe_luminance", clip_limit=2.0, tile_grid=8),
        IlluminationCorrectionStep(op="illumination_correction", sigma_fraction=0.1),
        ResizeStep(op="resize", size=(32, 32), interpolation="area"),
        NormalizeStep(op="normalize", mean=MEAN, std=STD, max_pixel_value=255),
    ]
    out = pp.run_steps(img, rgb_header(*img.shape[:2]), steps, expected_hw=(32, 32), expected_channels=3)
    assert out.tensor.shape == (1, 3, 32, 32) and out.tensor.dtype == np.float32 and out.layout == "NCHW"

    crop, *_ = _reference_crop(img, 0.04, 0.0)
    lab = cv2.cvtColor(crop.astype(np.uint8), cv2.COLOR_RGB2Lab)
    lab[..., 0] = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(lab[..., 0])
    eq = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB).astype(np.float32)
    sigma = 0.1 * eq.shape[0]
    graham = np.clip(4 * (eq - cv2.GaussianBlur(eq, (0, 0), sigma)) + 128, 0, 255)
    small = cv2.resize(graham, (32, 32), interpolation=cv2.INTER_AREA)
    expected = ((small / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(out.tensor[0], expected, atol=1e-4)
    # the channels are not mixed up: red (the bright channel of a fundus) stays in channel 0
    plain = pp.run_steps(img, rgb_header(*img.shape[:2]), steps[-2:], expected_channels=3)
    means = img.reshape(-1, 3).mean(axis=0)
    got_means = (plain.tensor[0].mean(axis=(1, 2)) * np.array(STD) + np.array(MEAN)) * 255
    np.testing.assert_allclose(got_means, means, rtol=1e-3)


def test_nhwc_layout_and_uint8_dtype_on_colour():
    img, _ = fundus_like()
    steps = [ResizeStep(op="resize", size=(16, 20))]
    out = pp.run_steps(img, rgb_header(*img.shape[:2]), steps, layout="NHWC", dtype="uint8")
    assert out.tensor.shape == (1, 16, 20, 3) and out.tensor.dtype == np.uint8
    ref = cv2.resize(img.astype(np.float32), (20, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(out.tensor[0], np.clip(np.floor(ref + 0.5), 0, 255))


# ------------------------------------------------------------------------------------------------
# Refusals at run time


@pytest.mark.parametrize(
    "step",
    [
        ModalityLutStep(op="modality_lut"),
        WindowStep(op="window", source="explicit", center=128, width=256),
    ],
    ids=["modality_lut", "window"],
)
def test_grey_ops_refuse_colour_images(step):
    img, _ = fundus_like()
    with pytest.raises(
        PreprocessError, match=r"step 0 \(.*\): .* works on greyscale images; this image is colour"
    ):
        pp.run_steps(img, rgb_header(*img.shape[:2]), [step])


@pytest.mark.parametrize("op", ["circular_crop", "clahe_luminance", "illumination_correction"])
def test_colour_ops_refuse_greyscale_images(op):
    grey = np.full((8, 8), 100, dtype=np.uint8)
    step = {"circular_crop": CircularCropStep, "clahe_luminance": ClaheLuminanceStep}.get(
        op, IlluminationCorrectionStep
    )(op=op)
    with pytest.raises(
        PreprocessError, match=rf"step 0 \({op}\): {op} works on RGB images; this image has 1 channel"
    ):
        pp.run_steps(grey, header(rows=8, cols=8, bits_allocated=8, bits_stored=8), [step])


def test_colour_op_after_normalize_is_refused():
    img, _ = fundus_like()
    steps = [NormalizeStep(op="normalize", mean=MEAN, std=STD), ClaheLuminanceStep(op="clahe_luminance")]
    with pytest.raises(PreprocessError, match=r"step 1 \(clahe_luminance\): .*needs 8-bit RGB values"):
        pp.run_steps(img, rgb_header(*img.shape[:2]), steps)


# ------------------------------------------------------------------------------------------------
# Refusals in the manifest (3-channel input)


def colour_manifest(steps: list[dict], channels: int = 3) -> dict:
    data = example_manifest_dict()
    data["input"]["shape"] = [None, channels, 32, 32]
    data["preprocessing"] = steps
    return data


COLOUR_STEPS = [
    {"op": "circular_crop", "threshold": 0.04, "margin": 0.0},
    {"op": "clahe_luminance", "clip_limit": 2.0, "tile_grid": 8},
    {"op": "illumination_correction", "sigma_fraction": 0.1},
    {"op": "resize", "size": [32, 32]},
    {"op": "normalize", "mean": MEAN, "std": STD, "max_pixel_value": 255},
]


def test_a_colour_manifest_is_accepted_with_defaults():
    m = parse_manifest(colour_manifest(COLOUR_STEPS), "m.yaml")
    assert [s.op for s in m.preprocessing][:3] == [
        "circular_crop",
        "clahe_luminance",
        "illumination_correction",
    ]
    bare = parse_manifest(
        colour_manifest(
            [{"op": "circular_crop"}, {"op": "clahe_luminance"}, {"op": "illumination_correction"}]
        )
    )
    crop, clahe, illum = bare.preprocessing
    assert (crop.threshold, crop.margin, clahe.clip_limit, clahe.tile_grid, illum.sigma_fraction) == (
        0.04,
        0.0,
        2.0,
        8,
        0.1,
    )


def refused(data: dict) -> str:
    with pytest.raises(ManifestError) as info:
        parse_manifest(data, "m.yaml")
    return str(info.value)


def test_manifest_refuses_grey_ops_after_colour_ops():
    msg = refused(colour_manifest([COLOUR_STEPS[0], {"op": "window", "source": "header"}, *COLOUR_STEPS[3:]]))
    assert msg == (
        "m.yaml: preprocessing.1.op: window works on greyscale images; preprocessing.0 (circular_crop) "
        "works on RGB (found 'window')"
    )


def test_manifest_refuses_colour_ops_after_grey_ops():
    msg = refused(colour_manifest([{"op": "modality_lut"}, COLOUR_STEPS[1], *COLOUR_STEPS[3:]]))
    assert msg == (
        "m.yaml: preprocessing.1.op: clahe_luminance works on RGB images; preprocessing.0 (modality_lut) "
        "reads greyscale values (found 'clahe_luminance')"
    )


def test_manifest_refuses_colour_ops_for_a_single_channel_input():
    steps = [COLOUR_STEPS[2], COLOUR_STEPS[3], {"op": "normalize", "mean": [0.5], "std": [0.2]}]
    msg = refused(colour_manifest(steps, channels=1))
    assert msg.startswith(
        "m.yaml: preprocessing.0.op: illumination_correction works on RGB images; the model input has 1"
    )


def test_manifest_refuses_a_normalize_of_the_wrong_width():
    steps = [*COLOUR_STEPS[:4], {"op": "normalize", "mean": [0.5, 0.5], "std": [0.2, 0.2]}]
    assert refused(colour_manifest(steps)) == (
        "m.yaml: preprocessing.4.mean: needs 1 value or one per input channel (3) (found [0.5, 0.5])"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("threshold", 1.5, "Input should be less than 1"),
        ("margin", -0.1, "Input should be greater than or equal to 0"),
    ],
)
def test_manifest_refuses_bad_colour_op_parameters(field, value, message):
    steps = [{"op": "circular_crop", field: value}, *COLOUR_STEPS[3:]]
    assert message in refused(colour_manifest(steps))
