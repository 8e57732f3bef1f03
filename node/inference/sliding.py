"""Sliding-window inference over an N-D volume in numpy, with the semantics of MONAI's
``monai.inferers.sliding_window_inference`` (the node's runtime does not import MONAI or torch).

Given a (C, *spatial) input, a window ``roi_size``, an ``overlap`` in [0, 1) and a blend mode:

- the input is padded (constant ``cval``, the pad split in halves, the larger half after) to at
  least ``roi_size`` along every axis;
- the windows start every ``int(roi * (1 - overlap))`` voxels (at least 1; a whole axis when the
  roi equals it), the last window of an axis moved back to end at the border (MONAI's
  ``dense_patch_slices``), in C order of the start grid;
- ``sw_batch_size`` windows go to the predictor at once; each (K, *roi) output is weighted by the
  importance map (``constant``: ones; ``gaussian``: a separable Gaussian with sigma
  ``sigma_scale * roi`` per axis, centred on the window, clamped below at max(min, 1e-3)), summed
  into the output, and the sum divided by the summed weights;
- the padding is cropped off again.

The predictor's output must have the window's spatial size (MONAI also allows a zoomed output; the
node does not).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from itertools import product
from typing import Literal

import numpy as np

from node.errors import InferenceError

log = logging.getLogger(__name__)

BlendMode = Literal["gaussian", "constant"]
SIGMA_SCALE = 0.125


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """The step between window starts per axis (MONAI ``_get_scan_interval``)."""
    out = []
    for image, roi in zip(image_size, roi_size, strict=True):
        if roi == image:
            out.append(int(roi))
        else:
            interval = int(roi * (1 - overlap))
            out.append(interval if interval > 0 else 1)
    return tuple(out)


def window_starts(
    image_size: Sequence[int], roi_size: Sequence[int], interval: Sequence[int]
) -> list[tuple[int, ...]]:
    """The start corner of every window, in C order of the per-axis starts (MONAI
    ``dense_patch_slices``); ``image_size`` is at least ``roi_size`` along every axis."""
    per_axis = []
    for image, roi, step in zip(image_size, roi_size, interval, strict=True):
        if step == 0:
            count = 1
        else:
            num = int(math.ceil(float(image) / step))
            count = next((d + 1 for d in range(num) if d * step + roi >= image), 1)
        starts = []
        for idx in range(count):
            start = idx * step
            start -= max(start + roi - image, 0)
            starts.append(start)
        per_axis.append(starts)
    return [tuple(int(s) for s in corner) for corner in product(*per_axis)]


def importance_map(
    roi_size: Sequence[int], mode: BlendMode = "gaussian", sigma_scale: float = SIGMA_SCALE
) -> np.ndarray:
    """The per-voxel weight of a window's output, float32 (MONAI ``compute_importance_map``)."""
    roi = tuple(int(r) for r in roi_size)
    if mode == "constant":
        weights = np.ones(roi, dtype=np.float32)
    elif mode == "gaussian":
        weights = np.ones((), dtype=np.float32)
        for size in roi:
            sigma = np.float32(size * sigma_scale)
            x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=np.float32)
            g = np.exp(x**2 / (np.float32(-2) * sigma**2)).astype(np.float32)
            weights = weights[..., np.newaxis] * g
    else:
        raise InferenceError(f"unknown blend mode {mode!r}")
    floor = max(float(weights.min()), 1e-3)
    return np.maximum(weights, np.float32(floor)).astype(np.float32)


def sliding_window_inference(
    volume: np.ndarray,
    roi_size: Sequence[int],
    predictor: Callable[[np.ndarray], np.ndarray],
    *,
    overlap: float = 0.25,
    mode: BlendMode = "gaussian",
    sw_batch_size: int = 1,
    sigma_scale: float = SIGMA_SCALE,
    cval: float = 0.0,
) -> np.ndarray:
    """Blend ``predictor`` over windows of ``volume`` (C, *spatial); return (K, *spatial) float32.

    ``predictor`` takes (B, C, *roi_size) float32 (B <= ``sw_batch_size``) and returns
    (B, K, *roi_size). See the module doc for the exact semantics.
    """
    volume = np.asarray(volume)
    spatial = volume.shape[1:]
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != len(spatial):
        raise InferenceError(f"roi {roi} has {len(roi)} axes; the volume {volume.shape} has {len(spatial)}")
    if not 0 <= overlap < 1:
        raise InferenceError(f"overlap must be in [0, 1) (found {overlap})")
    if sw_batch_size < 1:
        raise InferenceError(f"sw_batch_size must be positive (found {sw_batch_size})")
    pads = []
    for size, r in zip(spatial, roi, strict=True):
        diff = max(r - size, 0)
        pads.append((diff // 2, diff - diff // 2))
    if any(before or after for before, after in pads):
        volume = np.pad(volume, [(0, 0), *pads], mode="constant", constant_values=cval)
    image_size = volume.shape[1:]
    starts = window_starts(image_size, roi, scan_interval(image_size, roi, overlap))
    weights = importance_map(roi, mode, sigma_scale)
    count = np.zeros(image_size, dtype=np.float32)
    for corner in starts:
        count[tuple(slice(s, s + r) for s, r in zip(corner, roi, strict=True))] += weights
    out: np.ndarray | None = None
    log.debug("sliding window: %d windows of %s over %s", len(starts), roi, image_size)
    for first in range(0, len(starts), sw_batch_size):
        corners = starts[first : first + sw_batch_size]
        boxes = [tuple(slice(s, s + r) for s, r in zip(c, roi, strict=True)) for c in corners]
        batch = np.ascontiguousarray(
            np.stack([volume[(slice(None), *box)] for box in boxes]), dtype=np.float32
        )
        pred = np.asarray(predictor(batch))
        if pred.ndim != len(roi) + 2 or pred.shape[0] != len(boxes) or tuple(pred.shape[2:]) != roi:
            raise InferenceError(
                f"the model's output for {len(boxes)} window(s) of {roi} has shape {pred.shape}; "
                f"expected ({len(boxes)}, K, {', '.join(map(str, roi))})"
            )
        if out is None:
            out = np.zeros((pred.shape[1], *image_size), dtype=np.float32)
        for box, window in zip(boxes, pred, strict=True):
            out[(slice(None), *box)] += window.astype(np.float32) * weights
    assert out is not None
    out /= count
    crop = tuple(slice(before, before + size) for (before, _), size in zip(pads, spatial, strict=True))
    return np.ascontiguousarray(out[(slice(None), *crop)])
