"""Reduce early: area-resize the stored integers before the intensity steps (issue 16).

A radiograph of 2500 x 2048 stored values becomes a 224 x 224 model input. The steps run pixel
by pixel at full resolution (modality rescale, window, inversion, each in float64) and only then
average areas down: ~80 % of the preparation went to pixels the model never sees.

When the steps before the first area resize are pointwise and together form, over the image's own
range of stored values, one monotone affine map between two plateaus (a rescale and a LINEAR
window do, an inversion keeps it so; a non-linear VOI LUT, a SIGMOID window, 8-bit quantisation
or CLAHE do not), the order can be changed without changing the result:

1. ``F`` (the steps) is evaluated on every stored value between the image's minimum and maximum
   (at most 65,536 values, through the executor's own step code) and written as
   ``slope * clip(v, v_lo, v_hi) + offset``, checked on every one of those values;
2. the stored values are clipped to ``[v_lo, v_hi]`` (so ``F`` is affine on what is left), area
   resized to the resize step's size, and ``slope * x + offset`` applied to the averages. An
   affine map commutes with an area average (its weights sum to one), so this is the same
   average of ``F``'s outputs, computed on 224 x 182 values instead of 5 million;
3. the resize step then finds the image at its size (a copy) and pads it as before.

The difference is float rounding only (measured on full-size chest phantoms: < 1e-4 grey levels
out of 255). ``reduce_early`` returns None, and the full-resolution path runs, whenever a
condition does not hold.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from node.types import DecodedImage, Geometry, ImageHeader, ModelInput

log = logging.getLogger(__name__)

POINTWISE = frozenset({"modality_lut", "window", "invert_monochrome1"})
RESIZES = frozenset({"resize", "letterbox"})
#: F is taken as affine between its plateaus when no stored value departs from the line by more
#: than this fraction of F's span
AFFINE_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Reduced:
    """The image after the pointwise steps, area-reduced by ``factor``, and where to go on."""

    image: np.ndarray  #: float32 at the resize step's size, the pointwise steps applied
    value_range: tuple[float, float] | None  #: the state's value range after those steps
    geometry: Geometry  #: source -> reduced image
    next_step: int  #: the resize step, which then finds the image at its size already


#: runs the steps [0, next_step) over an image, returning (image, value range)
RunPrefix = Callable[[np.ndarray, int], tuple[np.ndarray, tuple[float, float] | None]]


def _target_shape(step: Any, shape: tuple[int, int]) -> tuple[int, int]:
    """The size the resize/letterbox step averages the image down to (letterbox: its inner part)."""
    if step.op == "resize":
        return int(step.size[0]), int(step.size[1])
    from node.inference.preprocess import letterbox_params

    return letterbox_params(shape, tuple(step.size), step.align).inner_shape


def _affine_between_plateaus(values: np.ndarray, vmin: int) -> tuple[float, float, float, float] | None:
    """``F`` as ``slope * clip(v, v_lo, v_hi) + offset`` over the stored values ``vmin + i``, or
    None when it is not that (non-monotone, non-linear between its plateaus).

    The line is fitted through the points strictly between the plateaus (the points next to a
    plateau may sit on the clip); the clip bounds are where that line meets the plateaus, so
    they may fall between two stored values. Every stored value is then checked."""
    f = values.astype(np.float64)
    diffs = np.diff(f)
    if not (np.all(diffs >= 0) or np.all(diffs <= 0)):
        return None
    moving = np.flatnonzero(diffs != 0)
    v = np.arange(vmin, vmin + f.size, dtype=np.float64)
    if moving.size == 0:
        return 0.0, float(f[0]), float(vmin), float(vmin)  # constant
    lo, hi = int(moving[0]), int(moving[-1]) + 1  # f[:lo + 1] and f[hi:] are the plateaus
    inner = slice(lo + 1, hi) if hi - lo >= 3 else slice(lo, hi + 1)
    if inner.stop - inner.start < 2:
        return None
    slope, offset = np.polyfit(v[inner], f[inner], 1)
    if slope == 0:
        return None
    v_lo = (f[0] - offset) / slope if lo > 0 else float(vmin)
    v_hi = (f[-1] - offset) / slope if hi < f.size - 1 else float(v[-1])
    v_lo, v_hi = min(v_lo, v_hi), max(v_lo, v_hi)
    predicted = slope * np.clip(v, v_lo, v_hi) + offset
    span = float(np.max(f) - np.min(f))
    if np.max(np.abs(predicted - f)) > AFFINE_TOLERANCE * max(span, 1.0):
        return None
    return float(slope), float(offset), float(v_lo), float(v_hi)


def reduce_early(
    image: np.ndarray, header: ImageHeader, steps: Sequence[Any], run_prefix: RunPrefix
) -> Reduced | None:
    """The reduced state to continue from, or None when the exact full-resolution path must run.

    ``run_prefix(values, n)`` must run the first ``n`` steps exactly as the executor does (it
    is the executor); ``F`` is measured through it, so the reduction follows the steps' own code.
    """
    if image.ndim != 2 or not np.issubdtype(image.dtype, np.integer) or image.dtype.itemsize > 2:
        return None
    first = next((i for i, s in enumerate(steps) if s.op not in POINTWISE), None)
    if first is None or steps[first].op not in RESIZES or steps[first].interpolation != "area":
        return None
    shape = (int(image.shape[0]), int(image.shape[1]))
    target = _target_shape(steps[first], shape)
    if target[0] > shape[0] or target[1] > shape[1]:
        return None  # an enlargement: nothing to save
    from node.inference.decode import stored_range

    vmin, vmax = stored_range(image)  # one pass (numpy's min and max make two), shared
    # every stored value the image holds, through the steps' own code (a minmax window sees the
    # image's own minimum and maximum here, as it does on the image)
    values = np.arange(vmin, vmax + 1, dtype=image.dtype).reshape(1, -1)
    mapped, value_range = run_prefix(values, first)
    curve = np.asarray(mapped, dtype=np.float64).reshape(-1)
    found = _affine_between_plateaus(curve, vmin)
    if found is None:
        log.debug("reduce early: the steps before the resize are not affine here; exact path")
        return None
    slope, offset, v_lo, v_hi = found
    small = area_reduce_clipped(image, v_lo, v_hi, target)
    out = small.astype(np.float64)
    out *= slope
    out += offset
    geometry = Geometry.identity(shape).then(target[0] / shape[0], target[1] / shape[1], 0.0, 0.0, target)
    return Reduced(
        image=out.astype(np.float32),
        value_range=value_range,
        geometry=geometry,
        next_step=first,
    )


@functools.lru_cache(maxsize=64)
def area_weights(ssize: int, dsize: int) -> tuple[tuple[int, int, np.ndarray], ...]:
    """OpenCV's INTER_AREA weights along one axis (``computeResizeAreaTab`` in resize.cpp, for a
    reduction): per output index, the first and one-past-last source index it averages and
    their float32 weights (the source cell's overlap with the output cell over its width)."""
    scale = 1.0 / (dsize / ssize)  # OpenCV: scale = 1 / inv_scale, inv_scale = dsize / ssize
    out = []
    for d in range(dsize):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, ssize - f1)
        s2 = min(math.floor(f2), ssize - 1)
        s1 = min(math.ceil(f1), s2)
        first = s1
        weights = []
        if s1 - f1 > 1e-3:
            first = s1 - 1
            weights.append((s1 - f1) / cell)
        weights.extend([1.0 / cell] * (s2 - s1))
        if f2 - s2 > 1e-3:
            weights.append(min(f2 - s2, 1.0, cell) / cell)
        w = np.asarray(weights, dtype=np.float32)
        w.flags.writeable = False
        out.append((first, first + w.size, w))
    return tuple(out)


#: source rows converted to float32 at a time (a strip of a 2048-column image: ~1 MB, in cache)
_STRIP_ROWS = 128


def area_reduce_clipped(image: np.ndarray, lo: float, hi: float, target: tuple[int, int]) -> np.ndarray:
    """``cv2.resize(clip(image as float32, lo, hi), target, INTER_AREA)`` for a reduction (target
    no larger than the image), float32, computed without a full-resolution float32 image.

    The rows are averaged first, strip by strip: a strip of stored values is converted and
    clipped in a small float32 buffer and each output row is the dot product of OpenCV's area
    weights (:func:`area_weights`) with the source rows it covers; OpenCV then averages the
    columns of the (target rows x source columns) result. The weights are OpenCV's, so the
    result is the same average; only float32 summation order differs (measured on 2500 x 2048
    12-bit radiographs: <= 2.5e-3 stored units out of 4000, ~10 ulps, as close to a float64
    average as OpenCV's). ~4x faster than the float32 conversion and OpenCV's general
    INTER_AREA path on such an image (one core)."""
    rows, cols = int(image.shape[0]), int(image.shape[1])
    th, tw = target
    lo32, hi32 = np.float32(lo), np.float32(hi)
    from node.inference.decode import stored_range

    vmin, vmax = stored_range(image)  # the clip is a no-op where the window spans the image
    clip = not (float(lo32) <= vmin and vmax <= float(hi32))
    tab = area_weights(rows, th)
    longest = max(b - a for a, b, _ in tab)
    strip = np.empty((max(_STRIP_ROWS, longest), cols), dtype=np.float32)
    vertical = np.empty((th, cols), dtype=np.float32)
    i = 0
    while i < th:
        start = tab[i][0]
        j = i + 1  # the output rows whose source rows fit in one strip with row i's
        while j < th and tab[j][1] - start <= strip.shape[0]:
            j += 1
        stop = tab[j - 1][1]
        block = strip[: stop - start]
        np.copyto(block, image[start:stop])
        if clip:
            np.clip(block, lo32, hi32, out=block)
        for k in range(i, j):
            a, b, w = tab[k]
            np.dot(w, block[a - start : b - start], out=vertical[k])
        i = j
    if tw == cols:
        return vertical
    return cv2.resize(vertical, (tw, th), interpolation=cv2.INTER_AREA)


def decode_reduction(steps: Sequence[Any], shape: tuple[int, int]) -> int:
    """The k for which a ``shape`` image may be decoded at ``1 / 2**k`` of its size before
    ``steps`` (JPEG 2000 / HTJ2K resolution levels): the largest ``2**k`` at most the factor by
    which the first area resize/letterbox reduces it, when only pointwise steps come before
    that resize (the model never sees the full resolution); 0 otherwise."""
    first = next((i for i, s in enumerate(steps) if s.op not in POINTWISE), None)
    if first is None or steps[first].op not in RESIZES or steps[first].interpolation != "area":
        return 0
    target = _target_shape(steps[first], shape)
    factor = min(shape[0] / max(target[0], 1), shape[1] / max(target[1], 1))
    k = 0
    while 2 ** (k + 1) <= factor:
        k += 1
    return k


def from_source(geometry: Geometry, source_shape: tuple[int, int], k: int) -> Geometry:
    """``geometry`` (reduced image -> model) as source -> model, the reduced image having been
    decoded at ``1 / 2**k`` (its pixel ``i`` spans source pixels ``[i * 2**k, (i + 1) * 2**k)``)."""
    if k == 0:
        return geometry
    step = float(2**k)
    return Geometry(
        source_shape=source_shape,
        model_shape=geometry.model_shape,
        scale_y=geometry.scale_y / step,
        scale_x=geometry.scale_x / step,
        offset_y=geometry.offset_y,
        offset_x=geometry.offset_x,
    )


def prepare_frames(
    source: Any, manifest: Any, budget: Any = None, *, check_size: bool = True
) -> Iterator[tuple[DecodedImage, ModelInput]]:
    """Decode ``source`` frame by frame and prepare each for ``manifest``: (frame, model input).

    With ``manifest.decode_reduced`` a JPEG 2000 / HTJ2K frame is decoded at the resolution
    :func:`decode_reduction` allows (``decode.iter_frames_reduced``: full decode where it
    cannot) and the model input's geometry maps back to the source's pixels; otherwise (the
    default) this is ``iter_frames`` then ``preprocess.prepare``, as the node runs today. The
    budget is checked before anything is decoded either way. A reduced frame's pixels are at
    the reduced size."""
    from node.budget import DEFAULT_BUDGET
    from node.inference import decode as dec
    from node.inference import preprocess as pp

    budget = DEFAULT_BUDGET if budget is None else budget
    ds = dec.read_dataset(source)
    k = 0
    if manifest.decode_reduced:
        header = dec.check_budget(ds, budget)
        k = decode_reduction(manifest.preprocessing, (header.rows, header.cols))
    if k == 0:
        for decoded in dec.iter_frames(ds, budget):
            yield decoded, pp.prepare(decoded, manifest, check_size=check_size)
        return
    for decoded, got in dec.iter_frames_reduced(ds, k, budget):
        model_input = pp.prepare(decoded, manifest, check_size=check_size)
        source_shape = (decoded.header.rows, decoded.header.cols)
        geometry = from_source(model_input.geometry, source_shape, got)
        yield decoded, ModelInput(tensor=model_input.tensor, geometry=geometry, layout=model_input.layout)
