"""Preprocessing ops (pure functions on numpy arrays) and the executor that applies a manifest's steps.

Conventions: images are float32 (H, W) or (H, W, C). Ops that produce display values (window,
the 8-bit conversions) return float32 holding 0..255. ``run_steps`` returns the model tensor in
the manifest's layout plus the ``Geometry`` that maps model pixels back to source pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Literal

import cv2
import numpy as np

from node.errors import PreprocessError
from node.inference.manifest import GREY_OPS, WINDOW_PRESETS, Manifest
from node.types import VOI_LUT_FUNCTIONS, DecodedImage, Geometry, ImageHeader, LookupTable, ModelInput

log = logging.getLogger(__name__)

_INTERPOLATION = MappingProxyType(
    {
        "nearest": cv2.INTER_NEAREST,
        "linear": cv2.INTER_LINEAR,
        "cubic": cv2.INTER_CUBIC,
        "area": cv2.INTER_AREA,
    }
)


def _f32(arr: np.ndarray) -> np.ndarray:
    return np.asarray(arr, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# Intensity ops


def modality_lut(arr: np.ndarray, slope: float = 1.0, intercept: float = 0.0, *, xp: Any = np) -> np.ndarray:
    """Stored values to modality units (e.g. HU): ``arr * slope + intercept`` (float32).
    ``xp``, here and below: the array module of ``arr`` (CuPy for node/inference/gpu_prepare.py)."""
    out = arr.astype(xp.float64)
    out *= float(slope)  # in place: the same operations as ``arr * slope + intercept``, less memory
    out += float(intercept)
    return out.astype(xp.float32)


def _lut_indices(arr: np.ndarray, lut: LookupTable, xp: Any = np) -> np.ndarray:
    """Table indices as pydicom's ``apply_modality_lut``/``apply_voi`` compute them: values below
    the first mapped value take entry 0, values past the end the last entry, non-integer values
    truncate (pydicom's cast). Computed in 64 bits, so no stored value can wrap around."""
    wide = xp.float64 if np.issubdtype(arr.dtype, np.floating) else xp.int64
    idx = arr.astype(wide)
    idx -= lut.first_mapped
    xp.clip(idx, 0, lut.entries - 1, out=idx)
    return idx.astype(xp.intp)


def lut_lookup(arr: np.ndarray, lut: LookupTable, *, xp: Any = np) -> np.ndarray:
    """Apply a Modality or VOI LUT (PS3.3 C.11.1/C.11.2) as pydicom does: uint16 table values."""
    looked_up: np.ndarray = xp.asarray(lut.table())[_lut_indices(arr, lut, xp)]
    return looked_up


def lut_output_max(lut: LookupTable) -> float:
    """The top of a LUT's output range, ``2**bits - 1`` from LUT Descriptor (PS3.3 C.11.2.1.1).

    A table whose entries exceed it (a descriptor that says fewer bits than the data hold) is
    taken at the bit depth of its largest entry, so its output is not clipped."""
    top = float(2**lut.bits - 1)
    largest = int(lut.table().max()) if lut.entries else 0
    if largest > top:
        log.debug("LUT entries reach %d, beyond the %d bits of LUT Descriptor", largest, lut.bits)
        top = float(2 ** largest.bit_length() - 1)
    return top


def voi_lut(
    arr: np.ndarray, lut: LookupTable, out_min: float = 0.0, out_max: float = 255.0, *, xp: Any = np
) -> np.ndarray:
    """Apply a VOI LUT (pydicom's ``apply_voi``) and scale its output range (0 to
    ``lut_output_max``) to [out_min, out_max], float32."""
    scaled = lut.table().astype(np.float64) / lut_output_max(lut) * (out_max - out_min) + out_min
    looked_up: np.ndarray = xp.asarray(scaled.astype(np.float32))[_lut_indices(arr, lut, xp)]
    return looked_up


def window_preset(name: str) -> tuple[float, float]:
    """(center, width) of a named preset; PreprocessError for an unknown name."""
    try:
        return WINDOW_PRESETS[name]
    except KeyError:
        raise PreprocessError(
            f"unknown window preset {name!r}; known: {', '.join(sorted(WINDOW_PRESETS))}"
        ) from None


def _ramp(x: np.ndarray | np.float64, c: float, w: float, out_min: float, r: float) -> np.ndarray:
    """The linear ramp in place, in pydicom's order of operations: ``((x - c) / w + 0.5) * r + out_min``."""
    x -= c
    x /= w
    x += 0.5
    x *= r
    x += out_min
    return x  # type: ignore[return-value]


def _clip_is_exact(c: float, w: float, out_min: float, out_max: float) -> bool:
    """True when clipping the ramp gives, bit for bit, what the piecewise definition (pydicom's
    ``apply_windowing``) gives for every float64 input.

    Each step of the ramp is a correctly rounded monotone operation, so the ramp is monotone in x.
    The piecewise form sets ``x <= L = c - w/2`` to out_min and ``x > H = c + w/2`` to out_max and
    keeps the ramp between. Checking the ramp at L, at the float after L, at H and at the float
    after H therefore proves that the clip changes exactly the points the piecewise form replaces,
    to the same values (this holds for integer and half-integer windows, and for most others).
    """
    low, high = c - w / 2, c + w / 2

    def at(v: float) -> float:
        return float(_ramp(np.float64(v), c, w, out_min, out_max - out_min))

    return (
        at(low) <= out_min
        and at(np.nextafter(low, np.inf)) >= out_min
        and at(high) <= out_max
        and at(np.nextafter(high, np.inf)) >= out_max
    )


def window(
    arr: np.ndarray,
    center: float,
    width: float,
    out_min: float = 0.0,
    out_max: float = 255.0,
    function: str = "LINEAR",
    *,
    xp: Any = np,
) -> np.ndarray:
    """DICOM VOI window to [out_min, out_max], float32: pydicom's ``apply_windowing`` with its
    output range (the stored or rescaled range) scaled to [out_min, out_max].

    LINEAR (PS3.3 C.11.2.1.2.1): ``x <= c - 0.5 - (w - 1) / 2`` -> out_min; ``x > c - 0.5 + (w - 1) / 2``
    -> out_max; else ``((x - (c - 0.5)) / (w - 1) + 0.5) * (out_max - out_min) + out_min``; w >= 1.
    LINEAR_EXACT (C.11.2.1.3.2): the same with c and w as given; w > 0.
    SIGMOID (C.11.2.1.3.1): ``(out_max - out_min) / (1 + exp(-4 (x - c) / w)) + out_min``; w > 0.

    ``xp``: the array module of ``arr`` (NumPy; CuPy for node/inference/gpu_prepare.py): the
    same float64 operations on either.
    """
    function = function.upper()
    x = arr.astype(xp.float64)
    r = out_max - out_min
    if function == "SIGMOID":
        if width <= 0:
            raise PreprocessError(f"window width must be > 0 for SIGMOID (found {width})")
        t = x
        t -= float(center)
        t *= -4.0
        t /= float(width)
        with np.errstate(over="ignore"):
            xp.exp(t, out=t)
        t += 1.0
        y = r / t
        y += out_min
        return y.astype(xp.float32)
    if function == "LINEAR":
        if width < 1:
            raise PreprocessError(f"window width must be >= 1 (found {width})")
        c, w = float(center) - 0.5, float(width) - 1.0
    elif function == "LINEAR_EXACT":
        if width <= 0:
            raise PreprocessError(f"window width must be > 0 for LINEAR_EXACT (found {width})")
        c, w = float(center), float(width)
    else:
        raise PreprocessError(
            f"unsupported VOI LUT function {function!r} (known: {', '.join(VOI_LUT_FUNCTIONS)})"
        )
    if w == 0:  # LINEAR width 1: a threshold
        y = xp.where(x <= c, out_min, out_max)
    elif out_min < out_max and _clip_is_exact(c, w, out_min, out_max):
        # the clipped ramp is the piecewise definition here (see _clip_is_exact); in place
        # (2.6x faster than the piecewise form on a 3.7-Mpixel radiograph)
        y = _ramp(x, c, w, out_min, r)
        xp.clip(y, out_min, out_max, out=y)
    else:  # pydicom's piecewise form
        y = ((x - c) / w + 0.5) * r + out_min
        y = xp.where(x <= c - w / 2, out_min, xp.where(x > c + w / 2, out_max, y))
    return y.astype(xp.float32)


def header_window_problem(header: ImageHeader) -> str | None:
    """Why the header's window cannot be applied (naming the attribute and what was found), or
    None when it can or when the header has no window at all."""
    if not header.window_centers or not header.window_widths:
        return None
    function = header.voi_lut_function
    if function not in VOI_LUT_FUNCTIONS:
        return f"VOILUTFunction is {function!r} (known: {', '.join(VOI_LUT_FUNCTIONS)})"
    if header.window_width is None:
        need = ">= 1" if function == "LINEAR" else "> 0"
        return f"WindowWidth is {header.window_widths[0]:g}, {function} needs {need}"
    return None


def header_voi(arr: np.ndarray, header: ImageHeader, *, xp: Any = np) -> np.ndarray | None:
    """The header's VOI transform to 0..255 (float32), as pydicom's ``apply_voi_lut`` chooses it:
    the VOI LUT Sequence when present, else the first window with VOILUTFunction. None when the
    header has no usable VOI (``header_window_problem`` says why, if it has an unusable one)."""
    if header.voi_lut is not None:
        return voi_lut(arr, header.voi_lut, xp=xp)
    if header.window_center is None or header.window_width is None or header_window_problem(header):
        return None
    return window(arr, header.window_center, header.window_width, function=header.voi_lut_function, xp=xp)


def header_modality(arr: np.ndarray, header: ImageHeader) -> tuple[np.ndarray, tuple[float, float]]:
    """The header's modality transform (pydicom's ``apply_modality_lut``): the Modality LUT
    Sequence when present, else rescale slope/intercept. Returns float32 values and the output
    range of the stored value range (the LUT's 0..2**bits-1 for a LUT)."""
    if header.modality_lut is not None:
        lut = header.modality_lut
        return lut_lookup(arr, lut).astype(np.float32), (0.0, float(2**lut.bits - 1))
    lo, hi = header.stored_value_range
    a = lo * header.rescale_slope + header.rescale_intercept
    b = hi * header.rescale_slope + header.rescale_intercept
    return modality_lut(arr, header.rescale_slope, header.rescale_intercept), (min(a, b), max(a, b))


def invert(arr: np.ndarray, lo: float, hi: float, *, xp: Any = np) -> np.ndarray:
    """Mirror values within [lo, hi]: ``lo + hi - x`` (MONOCHROME1 -> MONOCHROME2)."""
    return (float(lo) + float(hi) - arr.astype(xp.float64)).astype(xp.float32)


def scale_to_8bit(arr: np.ndarray, lo: float, hi: float, *, xp: Any = np) -> np.ndarray:
    """Map [lo, hi] linearly to 0..255, clip, round half up (float32 holding integers)."""
    if hi <= lo:
        zeros: np.ndarray = xp.zeros(arr.shape, dtype=xp.float32)
        return zeros
    y = (arr.astype(xp.float64) - lo) / (hi - lo)
    scaled: np.ndarray = xp.floor(xp.clip(y, 0.0, 1.0) * 255.0 + 0.5).astype(xp.float32)
    return scaled


def to_8bit_naive(arr: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """(a) Naive: scale the full range representable with the bit depth (``value_range``) to 0..255."""
    return scale_to_8bit(arr, *value_range)


def to_8bit_global(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """(b) Global percentile bounds fixed in the manifest: map [low, high] to 0..255."""
    return scale_to_8bit(arr, low, high)


def to_8bit_image_percentile(
    arr: np.ndarray, low_percentile: float = 0.01, high_percentile: float = 99.99
) -> np.ndarray:
    """(c) Per-image percentile bounds (default 0.01 % / 99.99 %) mapped to 0..255."""
    lo, hi = np.percentile(arr, [low_percentile, high_percentile])
    if hi <= lo:
        log.debug("image percentile bounds collapse (%s); output is zero", lo)
    return scale_to_8bit(arr, float(lo), float(hi))


def to_8bit_mix(
    arr: np.ndarray,
    value_range: tuple[float, float],
    low: float,
    high: float,
    low_percentile: float = 0.01,
    high_percentile: float = 99.99,
) -> np.ndarray:
    """(d) 3-channel mix: (a) naive, (b) global bounds, (c) per-image percentiles as channels (H, W, 3)."""
    return np.stack(
        [
            to_8bit_naive(arr, value_range),
            to_8bit_global(arr, low, high),
            to_8bit_image_percentile(arr, low_percentile, high_percentile),
        ],
        axis=-1,
    )


# ------------------------------------------------------------------------------------------------
# Filters


def _per_channel(img: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    if img.ndim == 2:
        return fn(img)
    return np.stack([fn(img[..., c]) for c in range(img.shape[-1])], axis=-1)


def clahe(img: np.ndarray, clip_limit: float = 2.0, tile_grid: tuple[int, int] = (8, 8)) -> np.ndarray:
    """CLAHE (OpenCV) on an image holding 0..255 values; per channel; float32 out."""
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid[1]), int(tile_grid[0])))

    def one(ch: np.ndarray) -> np.ndarray:
        u8 = np.clip(np.floor(ch.astype(np.float64) + 0.5), 0, 255).astype(np.uint8)
        return op.apply(u8).astype(np.float32)

    return _per_channel(img, one)


def median(img: np.ndarray, ksize: int = 3) -> np.ndarray:
    """Median filter (square odd kernel, edges replicated), float32.

    ksize 3 and 5 work on any values; larger kernels need values within 0..255 (OpenCV limit).
    """
    if ksize < 3 or ksize % 2 == 0:
        raise PreprocessError(f"median ksize must be odd and >= 3 (found {ksize})")
    f = _f32(img)
    if ksize <= 5:
        return _per_channel(f, lambda ch: cv2.medianBlur(np.ascontiguousarray(ch), ksize))
    if f.min() < 0 or f.max() > 255:
        raise PreprocessError(f"median ksize {ksize} needs an 8-bit image: apply window or to_8bit first")

    def one(ch: np.ndarray) -> np.ndarray:
        u8 = np.floor(ch + 0.5).astype(np.uint8)
        return cv2.medianBlur(u8, ksize).astype(np.float32)

    return _per_channel(f, one)


def gaussian(img: np.ndarray, sigma: float, ksize: int = 0) -> np.ndarray:
    """Gaussian filter (OpenCV, reflect-101 borders); ksize 0 derives the kernel from sigma."""
    if sigma <= 0:
        raise PreprocessError(f"gaussian sigma must be > 0 (found {sigma})")
    return cv2.GaussianBlur(_f32(img), (ksize, ksize), sigmaX=float(sigma), sigmaY=float(sigma))


# ------------------------------------------------------------------------------------------------
# Geometry ops


def _interp(name: str) -> int:
    try:
        return _INTERPOLATION[name]
    except KeyError:
        raise PreprocessError(f"unknown interpolation {name!r}; known: {', '.join(_INTERPOLATION)}") from None


def resize(img: np.ndarray, size: tuple[int, int], interpolation: str = "area") -> np.ndarray:
    """Resize to (height, width), ignoring aspect; float32, channels kept."""
    h, w = int(size[0]), int(size[1])
    out = cv2.resize(_f32(img), (w, h), interpolation=_interp(interpolation))
    if img.ndim == 3 and out.ndim == 2:
        out = out[..., np.newaxis]
    return out


@dataclass(frozen=True)
class Letterbox:
    """Where a letterboxed image sits in its canvas."""

    scale_y: float
    scale_x: float
    pad_top: int
    pad_left: int
    inner_shape: tuple[int, int]


def letterbox_params(
    shape: tuple[int, int], size: tuple[int, int], align: Literal["center", "top_left"] = "center"
) -> Letterbox:
    """The resize and padding ``letterbox`` applies to an image of ``shape`` for a canvas ``size``."""
    h, w = shape
    th, tw = size
    s = min(th / h, tw / w)
    nh = min(th, max(1, round(h * s)))
    nw = min(tw, max(1, round(w * s)))
    if align == "center":
        top, left = (th - nh) // 2, (tw - nw) // 2
    else:
        top, left = 0, 0
    return Letterbox(scale_y=nh / h, scale_x=nw / w, pad_top=top, pad_left=left, inner_shape=(nh, nw))


def letterbox(
    img: np.ndarray,
    size: tuple[int, int],
    pad_value: float = 0.0,
    interpolation: str = "area",
    align: Literal["center", "top_left"] = "center",
) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping aspect ratio so the image fits (height, width), then pad with ``pad_value``."""
    params = letterbox_params((img.shape[0], img.shape[1]), size, align)
    inner = resize(img, params.inner_shape, interpolation)
    canvas = np.full((size[0], size[1], *img.shape[2:]), pad_value, dtype=np.float32)
    nh, nw = params.inner_shape
    canvas[params.pad_top : params.pad_top + nh, params.pad_left : params.pad_left + nw] = inner
    return canvas, params


# ------------------------------------------------------------------------------------------------
# Channel ops


def normalize(
    img: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    max_pixel_value: float = 255.0,
    *,
    xp: Any = np,
) -> np.ndarray:
    """``(img / max_pixel_value - mean[c]) / std[c]``; a single mean/std value broadcasts."""
    f = img.astype(xp.float32, copy=False) / np.float32(max_pixel_value)
    m = np.asarray(mean, dtype=np.float32)
    s = np.asarray(std, dtype=np.float32)
    channels = 1 if f.ndim == 2 else f.shape[-1]
    if m.size not in (1, channels) or s.size != m.size:
        raise PreprocessError(
            f"normalize has {m.size} mean / {s.size} std values for an image with {channels} channel(s)"
        )
    normalized: np.ndarray = (f - m[0]) / s[0] if f.ndim == 2 else (f - xp.asarray(m)) / xp.asarray(s)
    return normalized


def replicate_channels(img: np.ndarray, channels: int = 3, *, xp: Any = np) -> np.ndarray:
    """(H, W) or (H, W, 1) -> (H, W, channels)."""
    if img.ndim == 3 and img.shape[-1] != 1:
        raise PreprocessError(f"replicate_channels needs a single-channel image (found {img.shape[-1]})")
    base = img if img.ndim == 2 else img[..., 0]
    repeated: np.ndarray = xp.repeat(base[..., None], channels, axis=-1).astype(xp.float32, copy=False)
    return repeated


# ------------------------------------------------------------------------------------------------
# Colour ops: (H, W, 3) RGB holding 0..255


def _rgb_u8(img: np.ndarray) -> np.ndarray:
    """An RGB image holding 0..255 as uint8 (rounded half up, clipped)."""
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    return np.clip(np.floor(img.astype(np.float64) + 0.5), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class FieldOfView:
    """The square a fundus field-of-view disc fits in: top-left corner (may lie outside the
    image, which is then padded) and side, in source pixels; the disc is the inscribed circle."""

    top: int
    left: int
    side: int


def field_of_view(img: np.ndarray, threshold: float = 0.04, margin: float = 0.0) -> FieldOfView:
    """Where the field-of-view disc of an RGB fundus photograph is: the bounding box of the pixels
    whose BT.601 luminance exceeds ``threshold`` x the maximum luminance, made square (side = its
    larger extent, the disc's diameter, x (1 + 2 ``margin``)) around the disc: centred on the box,
    except along an axis where the box is shorter and touches one image edge (a disc cut off by
    the frame), where the disc is placed flush with the box's other end."""
    lum = cv2.cvtColor(_rgb_u8(img), cv2.COLOR_RGB2GRAY)
    top_lum = int(lum.max())
    mask = lum > threshold * top_lum
    if top_lum == 0 or not mask.any():
        raise PreprocessError("circular_crop found no field of view: the image is black")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    extent = max(r1 - r0, c1 - c0)
    side = max(1, round(extent * (1.0 + 2.0 * margin)))
    h, w = lum.shape
    top = _disc_start(r0, r1, h, extent) - (side - extent) // 2
    left = _disc_start(c0, c1, w, extent) - (side - extent) // 2
    return FieldOfView(top=top, left=left, side=side)


def _disc_start(lo: int, hi: int, n: int, extent: int) -> int:
    """Where a disc of diameter ``extent`` starts on an axis where the field of view spans
    [lo, hi) of n pixels: centred, unless the span is shorter and touches one edge of the image
    (a disc cut off there), then flush with its other end."""
    if hi - lo < extent and lo == 0 and hi < n:
        return hi - extent
    if hi - lo < extent and hi == n and lo > 0:
        return lo
    return (lo + hi - extent) // 2


def circular_crop(img: np.ndarray, fov: FieldOfView) -> np.ndarray:
    """The square ``fov`` cut out of ``img`` (zero-padded where it leaves the image), every pixel
    outside its inscribed circle set to 0; float32 (side, side, channels)."""
    h, w = img.shape[:2]
    side = fov.side
    out = np.zeros((side, side, *img.shape[2:]), dtype=np.float32)
    y0, x0 = max(fov.top, 0), max(fov.left, 0)
    y1, x1 = min(fov.top + side, h), min(fov.left + side, w)
    if y1 > y0 and x1 > x0:
        out[y0 - fov.top : y1 - fov.top, x0 - fov.left : x1 - fov.left] = img[y0:y1, x0:x1]
    centre = (side - 1) / 2.0
    yy, xx = np.ogrid[:side, :side]
    outside = (yy - centre) ** 2 + (xx - centre) ** 2 > (side / 2.0) ** 2
    out[outside] = 0.0
    return out


def clahe_luminance(img: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """CLAHE (OpenCV) on the L channel of OpenCV's 8-bit CIE Lab, a and b kept; RGB float32 out."""
    lab = cv2.cvtColor(_rgb_u8(img), cv2.COLOR_RGB2LAB)
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))
    lab[..., 0] = op.apply(np.ascontiguousarray(lab[..., 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB).astype(np.float32)


def illumination_correction(img: np.ndarray, sigma_fraction: float = 0.1) -> np.ndarray:
    """Graham's local average subtraction per channel: ``4 * (I - G) + 128`` clipped to 0..255,
    ``G`` the image blurred by a Gaussian (OpenCV, reflect-101 borders) of sigma
    ``sigma_fraction`` x the shorter side; float32 out."""
    f = _f32(img)
    sigma = float(sigma_fraction) * min(f.shape[0], f.shape[1])
    if sigma <= 0:
        raise PreprocessError(f"illumination_correction sigma must be > 0 (found {sigma})")
    background = cv2.GaussianBlur(f, (0, 0), sigmaX=sigma, sigmaY=sigma)
    if background.ndim == 2 and f.ndim == 3:
        background = background[..., np.newaxis]
    corrected: np.ndarray = np.clip(4.0 * (f - background) + 128.0, 0.0, 255.0).astype(np.float32)
    return corrected


# ------------------------------------------------------------------------------------------------
# Patch tiling and stitching


def tile_origins(
    shape: tuple[int, int], patch: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int]]:
    """Top-left corners of patches covering ``shape``: every ``stride``, plus one flush with the far
    edge when the stride does not land there. An image smaller than the patch gets one origin (0, 0)."""

    def axis(n: int, p: int, s: int) -> list[int]:
        if s <= 0 or p <= 0:
            raise PreprocessError(f"patch size and stride must be positive (found {p}, {s})")
        if n <= p:
            return [0]
        starts = list(range(0, n - p + 1, s))
        if starts[-1] != n - p:
            starts.append(n - p)
        return starts

    ys = axis(shape[0], patch[0], stride[0])
    xs = axis(shape[1], patch[1], stride[1])
    return [(y, x) for y in ys for x in xs]


def tile(
    img: np.ndarray, patch: tuple[int, int], stride: tuple[int, int], pad_value: float = 0.0
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Cut ``img`` (H, W[, C]) into patches (N, ph, pw[, C]); images smaller than a patch are padded
    (bottom/right) with ``pad_value``. Returns the patches and their top-left origins."""
    ph, pw = patch
    h, w = img.shape[:2]
    if h < ph or w < pw:
        padded = np.full((max(h, ph), max(w, pw), *img.shape[2:]), pad_value, dtype=img.dtype)
        padded[:h, :w] = img
        img = padded
    origins = tile_origins((img.shape[0], img.shape[1]), patch, stride)
    patches = np.stack([img[y : y + ph, x : x + pw] for y, x in origins])
    return patches, origins


def stitch(
    values: np.ndarray,
    origins: Sequence[tuple[int, int]],
    patch: tuple[int, int],
    shape: tuple[int, int],
) -> np.ndarray:
    """Stitch per-patch outputs into a (H, W) map, averaging overlaps.

    ``values``: (N,) scores (each fills its patch), or (N, h, w) maps (resized to the patch size
    when smaller). Pixels no patch covers are 0.
    """
    values = np.asarray(values, dtype=np.float32)
    if values.shape[0] != len(origins):
        raise PreprocessError(f"stitch got {values.shape[0]} values for {len(origins)} patches")
    ph, pw = patch
    h, w = shape
    acc = np.zeros((max(h, ph), max(w, pw)), dtype=np.float64)
    count = np.zeros_like(acc)
    for v, (y, x) in zip(values, origins, strict=True):
        if v.ndim == 0:
            block: np.ndarray | float = float(v)
        else:
            block = v if v.shape == (ph, pw) else cv2.resize(v, (pw, ph), interpolation=cv2.INTER_LINEAR)
        acc[y : y + ph, x : x + pw] += block
        count[y : y + ph, x : x + pw] += 1.0
    out = np.divide(acc, count, out=np.zeros_like(acc), where=count > 0)
    return out[:h, :w].astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Executor


@dataclass(frozen=True, eq=False)
class _State:
    image: np.ndarray
    value_range: tuple[float, float] | None
    geometry: Geometry


def _require_gray(state: _State, op: str) -> None:
    if state.image.ndim == 3 and state.image.shape[-1] != 1:
        raise PreprocessError(f"{op} needs a single-channel image (found {state.image.shape[-1]} channels)")


def _is_colour(state: _State) -> bool:
    return state.image.ndim == 3 and state.image.shape[-1] != 1


def _require_grey_source(state: _State, op: str, header: ImageHeader) -> None:
    """The greyscale pipeline's ops refuse a colour image, naming the image's colour."""
    if _is_colour(state):
        raise PreprocessError(
            f"{op} works on greyscale images; this image is colour ({header.photometric_interpretation}, "
            f"stored as {header.stored_photometric_interpretation}, {state.image.shape[-1]} channels): "
            "the model's preprocessing is for greyscale images"
        )


def _require_colour(state: _State, op: str) -> None:
    """The colour ops need an RGB image (H, W, 3) holding 0..255."""
    if state.image.ndim != 3 or state.image.shape[-1] != 3:
        channels = 1 if state.image.ndim == 2 else state.image.shape[-1]
        raise PreprocessError(f"{op} works on RGB images; this image has {channels} channel(s)")
    if state.value_range != (0.0, 255.0):
        raise PreprocessError(
            f"{op} needs 8-bit RGB values (0..255); the image's value range is {state.value_range}"
            " (place it before normalize)"
        )


def _require_8bit(state: _State, op: str) -> None:
    if state.value_range != (0.0, 255.0):
        raise PreprocessError(f"{op} needs an 8-bit image: apply window or to_8bit first")


def _require_range(state: _State, op: str) -> tuple[float, float]:
    if state.value_range is None:
        raise PreprocessError(f"{op} cannot follow normalize (the value range is no longer known)")
    return state.value_range


def _resized(state: _State, img: np.ndarray, sy: float, sx: float, oy: float, ox: float) -> _State:
    geom = state.geometry.then(sy, sx, oy, ox, (img.shape[0], img.shape[1]))
    return replace(state, image=img, geometry=geom)


def _apply_step(state: _State, step: Any, header: ImageHeader, index: int) -> _State:
    op = step.op
    img = state.image
    if op in GREY_OPS:
        _require_grey_source(state, op, header)
    if op == "modality_lut":
        lo, hi = _require_range(state, op)
        if header.modality_lut is not None:
            out, out_range = header_modality(img, header)
        else:  # rescale: the range follows the state's (which may differ from the stored range)
            a = lo * header.rescale_slope + header.rescale_intercept
            b = hi * header.rescale_slope + header.rescale_intercept
            out = modality_lut(img, header.rescale_slope, header.rescale_intercept)
            out_range = (min(a, b), max(a, b))
        return replace(state, image=out, value_range=out_range)
    if op == "window":
        _require_gray(state, op)
        if step.source == "preset":  # presets and explicit windows are LINEAR
            center, width = window_preset(step.preset)
        elif step.source == "explicit":
            center, width = step.center, step.width
        else:
            voi = header_voi(img, header)
            if voi is not None:
                return replace(state, image=voi, value_range=(0.0, 255.0))
            problem = header_window_problem(header)
            what = f"has an unusable window ({problem})" if problem else "has no WindowCenter/WindowWidth"
            if step.fallback != "minmax":
                raise PreprocessError(f"step {index} (window): instance {header.sop_instance_uid} {what}")
            lo, hi = float(img.min()), float(img.max())
            center, width = (lo + hi + 1) / 2, max(1.0, hi - lo + 1)
            log.debug("instance %s %s; using min/max (%s, %s)", header.sop_instance_uid, what, lo, hi)
        return replace(state, image=window(img, center, width), value_range=(0.0, 255.0))
    if op == "invert_monochrome1":
        if header.photometric_interpretation != "MONOCHROME1":
            return state
        lo, hi = _require_range(state, op)
        return replace(state, image=invert(img, lo, hi))
    if op == "to_8bit":
        _require_gray(state, op)
        vr = _require_range(state, op)
        if step.method == "naive":
            out = to_8bit_naive(img, vr)
        elif step.method == "global_percentile":
            out = to_8bit_global(img, step.low, step.high)
        elif step.method == "image_percentile":
            out = to_8bit_image_percentile(img, step.low_percentile, step.high_percentile)
        else:
            out = to_8bit_mix(img, vr, step.low, step.high, step.low_percentile, step.high_percentile)
        return replace(state, image=out, value_range=(0.0, 255.0))
    if op == "clahe":
        _require_8bit(state, op)
        return replace(state, image=clahe(img, step.clip_limit, tuple(step.tile_grid)))
    if op == "median":
        return replace(state, image=median(img, step.ksize))
    if op == "gaussian":
        return replace(state, image=gaussian(img, step.sigma, step.ksize))
    if op == "resize":
        h, w = step.size
        out = resize(img, (h, w), step.interpolation)
        return _resized(state, out, h / img.shape[0], w / img.shape[1], 0.0, 0.0)
    if op == "letterbox":
        out, lb = letterbox(img, tuple(step.size), step.pad_value, step.interpolation, step.align)
        return _resized(state, out, lb.scale_y, lb.scale_x, lb.pad_top, lb.pad_left)
    if op == "normalize":
        return replace(
            state, image=normalize(img, step.mean, step.std, step.max_pixel_value), value_range=None
        )
    if op == "replicate_channels":
        return replace(state, image=replicate_channels(img, step.channels))
    if op == "circular_crop":
        _require_colour(state, op)
        fov = field_of_view(img, step.threshold, step.margin)
        return _resized(state, circular_crop(img, fov), 1.0, 1.0, float(-fov.top), float(-fov.left))
    if op == "clahe_luminance":
        _require_colour(state, op)
        return replace(state, image=clahe_luminance(img, step.clip_limit, step.tile_grid))
    if op == "illumination_correction":
        _require_colour(state, op)
        return replace(state, image=illumination_correction(img, step.sigma_fraction))
    raise PreprocessError(f"step {index}: unknown op {op!r}")


def _initial_range(image: np.ndarray, header: ImageHeader | None) -> tuple[float, float]:
    if header is not None and np.issubdtype(image.dtype, np.integer):
        return header.stored_value_range
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        return float(info.min), float(info.max)
    return float(np.min(image)), float(np.max(image))


def _run(state: _State, steps: Sequence[Any], header: ImageHeader, start: int, stop: int) -> _State:
    """Apply ``steps[start:stop]``, each error named with its step."""
    for i in range(start, stop):
        step = steps[i]
        try:
            state = _apply_step(state, step, header, i)
        except PreprocessError as exc:
            msg = str(exc)
            raise PreprocessError(msg if msg.startswith("step ") else f"step {i} ({step.op}): {msg}") from exc
        except cv2.error as exc:
            raise PreprocessError(f"step {i} ({step.op}): OpenCV failed: {exc}") from exc
    return state


def run_steps(
    image: np.ndarray,
    header: ImageHeader,
    steps: Sequence[Any],
    *,
    layout: Literal["NCHW", "NHWC"] = "NCHW",
    dtype: str = "float32",
    expected_hw: tuple[int | None, int | None] | None = None,
    expected_channels: int | None = None,
    reduce: bool = True,
) -> ModelInput:
    """Apply manifest steps in order to one frame (H, W[, C]) of stored values.

    Returns a (1, C, H, W) or (1, H, W, C) tensor of ``dtype`` and the geometry from source to
    model pixels. ``expected_hw``/``expected_channels`` (from the manifest input) are checked at the
    end so that a pipeline that forgot a resize fails here, naming what differs. ``reduce``: where
    the steps allow it, area-reduce the stored integers before the intensity steps
    (:mod:`node.inference.reduce`; False runs every step at full resolution).
    """
    if image.ndim not in (2, 3):
        raise PreprocessError(f"expected one frame (H, W) or (H, W, C), found shape {image.shape}")
    state = _State(
        image=image,
        value_range=_initial_range(image, header),
        geometry=Geometry.identity((int(image.shape[0]), int(image.shape[1]))),
    )
    start = 0
    if reduce:
        from node.inference.reduce import reduce_early

        def run_prefix(values: np.ndarray, n: int) -> tuple[np.ndarray, tuple[float, float] | None]:
            probe = replace(state, image=values, geometry=Geometry.identity((1, int(values.shape[1]))))
            probe = _run(probe, steps, header, 0, n)
            return probe.image, probe.value_range

        reduced = reduce_early(image, header, steps, run_prefix)
        if reduced is not None:
            state = _State(image=reduced.image, value_range=reduced.value_range, geometry=reduced.geometry)
            start = reduced.next_step
    state = _run(state, steps, header, start, len(steps))
    return model_input(
        _f32(state.image),
        state.geometry,
        layout=layout,
        dtype=dtype,
        expected_hw=expected_hw,
        expected_channels=expected_channels,
    )


def model_input(
    img: Any,
    geometry: Geometry,
    *,
    layout: str,
    dtype: str,
    expected_hw: tuple[int | None, int | None] | None,
    expected_channels: int | None,
    xp: Any = np,
) -> ModelInput:
    """The prepared float32 image (H, W) or (H, W, C) checked against the model's channels and
    size, as a batch of one in ``layout`` and ``dtype`` (uint8 rounded half up and clipped);
    ``xp``: its array module (CuPy for node/inference/gpu_prepare.py)."""
    if img.ndim == 2:
        img = img[..., None]
    h, w, c = (int(n) for n in img.shape)
    if expected_channels is not None and c != expected_channels:
        raise PreprocessError(
            f"preprocessing produced {c} channel(s); the model input needs {expected_channels}"
        )
    if expected_hw is not None:
        eh, ew = expected_hw
        if (eh is not None and eh != h) or (ew is not None and ew != w):
            raise PreprocessError(f"preprocessing produced {h}x{w}; the model input needs {eh}x{ew}")
    tensor = img.transpose(2, 0, 1)[None] if layout == "NCHW" else img[None]
    if dtype == "uint8":
        tensor = xp.clip(xp.floor(tensor + 0.5), 0, 255).astype(xp.uint8)
    else:
        tensor = tensor.astype(np.dtype(dtype))
    return ModelInput(tensor=xp.ascontiguousarray(tensor), geometry=geometry, layout=layout)


def prepare(
    decoded: DecodedImage, manifest: Manifest, frame: int = 0, *, check_size: bool = True
) -> ModelInput:
    """Run ``manifest.preprocessing`` on one frame of a decoded image, checking the input spec.

    ``check_size=False`` skips the spatial check (patch models prepare the full image and tile it).
    A header that still holds per-frame functional group values is resolved for ``frame`` first
    (``ImageHeader.for_frame``); the frames ``iter_frames`` yields carry theirs already.
    """
    spec = manifest.input
    header = decoded.header
    if header.frame_values and decoded.frame_count == header.number_of_frames:
        header = header.for_frame(frame)
    return run_steps(
        decoded.frame(frame),
        header,
        manifest.preprocessing,
        layout=spec.slice_layout,  # a 3-D input's slices are prepared NCHW, then stacked
        dtype=spec.dtype,
        expected_hw=spec.spatial if check_size else None,
        expected_channels=spec.channels,
    )
