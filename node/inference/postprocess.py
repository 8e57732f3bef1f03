"""From raw model outputs to per-label probabilities (activation as the manifest says) and label scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

from node.errors import InferenceError
from node.inference.manifest import Manifest
from node.types import Code, LabelScore


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float32."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out.astype(np.float32)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis`` (max-subtracted), float32."""
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    probabilities: np.ndarray = (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
    return probabilities


def activate(raw: np.ndarray, activation: Literal["none", "sigmoid", "softmax"]) -> np.ndarray:
    """Apply the manifest's activation to a (N, n_outputs) output; 'none' returns it as float32."""
    if activation == "sigmoid":
        return sigmoid(raw)
    if activation == "softmax":
        return softmax(raw, axis=-1)
    return np.asarray(raw, dtype=np.float32)


def probabilities(manifest: Manifest, raw: np.ndarray) -> np.ndarray:
    """(N, n_outputs) raw output -> (N, n_labels) probabilities in the manifest's label order."""
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.shape[1] < manifest.n_outputs:
        raise InferenceError(
            f"model {manifest.id}: output {manifest.outputs.probabilities} has shape {raw.shape}; "
            f"expected (N, >= {manifest.n_outputs})"
        )
    probs = activate(raw, manifest.outputs.activation)
    return probs[:, [label.index for label in manifest.labels]]


def label_scores(manifest: Manifest, probs: Sequence[float] | np.ndarray) -> list[LabelScore]:
    """One LabelScore per manifest label from a row of ``probabilities`` (label order).

    A label is positive (reported "Present") when its probability reaches its threshold; this
    holds for the normal class of a multi-class model too (a softmax result whose "Normal" class
    has 0.9999 says Normal: Present and every finding Absent, instead of contradicting itself).
    The normal class never raises triage."""
    values = np.asarray(probs, dtype=np.float64).reshape(-1)
    if values.size != len(manifest.labels):
        raise InferenceError(
            f"model {manifest.id}: {values.size} probabilities for {len(manifest.labels)} labels"
        )
    out = []
    for label, p in zip(manifest.labels, values, strict=True):
        positive = bool(p >= label.threshold)
        out.append(
            LabelScore(
                label=label.name,
                code=Code(label.code.value, label.code.scheme_designator, label.code.meaning),
                probability=float(p),
                threshold=label.threshold,
                positive=positive,
                triage=positive and label.triage and not label.normal,
                normal=label.normal,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------
# Segmentation (``kind: segmentation``)


def pixel_probabilities(manifest: Manifest, raw: np.ndarray) -> np.ndarray:
    """(N, C, h, w) raw per-pixel output -> (N, C, h, w) probabilities (activation over the class
    axis for softmax, per channel for sigmoid), float32."""
    raw = np.asarray(raw)
    if raw.ndim != 4 or raw.shape[1] < manifest.n_outputs:
        raise InferenceError(
            f"model {manifest.id}: output {manifest.outputs.probabilities} has shape {raw.shape}; "
            f"expected (N, >= {manifest.n_outputs}, h, w)"
        )
    if manifest.outputs.activation == "softmax":
        return softmax(raw, axis=1)
    if manifest.outputs.activation == "sigmoid":
        return sigmoid(raw)
    return np.asarray(raw, dtype=np.float32)


def remove_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    """``mask`` (H, W) without its 8-connected components of fewer than ``min_area`` pixels
    (OpenCV ``connectedComponentsWithStats``); a bool array."""
    mask = np.asarray(mask, dtype=bool)
    if min_area <= 1 or not mask.any():
        return mask
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(count, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    kept: np.ndarray = keep[labels]
    return kept


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest node id of each node's component in the graph of ``n`` nodes and the edges
    (a[i], b[i]), in numpy: every round hooks the larger root of each edge whose ends differ onto
    the smaller, then compresses the pointers until every node points at its root."""
    lab = np.arange(n, dtype=np.int64)
    while a.size:
        ra, rb = lab[a], lab[b]
        differ = ra != rb
        if not differ.any():
            break
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        np.minimum.at(lab, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            jumped = lab[lab]
            if np.array_equal(jumped, lab):
                break
            lab = jumped
    return lab


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
_SQUARE = np.ones((3, 3), dtype=np.uint8)


def remove_small_volumes(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` (D, H, W) without its 26-connected components of fewer than ``min_voxels`` voxels;
    a bool array.

    No SciPy at runtime: each slice is labelled 8-connected by OpenCV, the 2-D components of
    neighbouring slices that touch across the 3x3 in-plane neighbourhood are joined, and a 3-D
    component's size is the sum of its slices' areas. A pixel of the next slice touches a
    component either straight above one of its pixels or diagonally next to one of its boundary
    pixels (an interior pixel's 8 neighbours are all in the component), so only the boundary
    pixels are looked up diagonally. Only the bounding box of the mask is worked on."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise InferenceError(f"a 3-D mask is (D, H, W); found shape {mask.shape}")
    if min_voxels <= 1 or not mask.any():
        return mask
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = np.ascontiguousarray(mask[:, r0:r1, c0:c1])
    depth, height, width = box.shape
    planes: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None] = [
        None
    ] * depth
    areas: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]  # per global component id; 0 = background
    count = 1
    for z in range(depth):
        if not box[z].any():
            continue
        _, lab, stats, _ = cv2.connectedComponentsWithStats(box[z].view(np.uint8), connectivity=8)
        offset = count - 1
        ys, xs = np.nonzero(lab)
        plane = box[z].view(np.uint8)
        boundary = (plane & ~cv2.erode(plane, _SQUARE).astype(bool))[ys, xs].astype(bool)
        planes[z] = (lab, offset, ys, xs, lab[ys, xs].astype(np.int64) + offset, boundary)
        areas.append(stats[1:, cv2.CC_STAT_AREA].astype(np.int64))
        count += len(areas[-1])
    edges_a, edges_b = [], []
    for z in range(depth - 1):
        here, there = planes[z], planes[z + 1]
        if here is None or there is None:
            continue
        _, _, ys, xs, ids, boundary = here
        lab_b, offset_b = there[0], there[1]
        above = lab_b[ys, xs]
        touch = above > 0
        edges_a.append(ids[touch])
        edges_b.append(above[touch].astype(np.int64) + offset_b)
        ys, xs, ids = ys[boundary], xs[boundary], ids[boundary]
        for dy, dx in _NEIGHBOURS:
            y, x = ys + dy, xs + dx
            inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
            other = lab_b[y[inside], x[inside]]
            touch = other > 0
            edges_a.append(ids[inside][touch])
            edges_b.append(other[touch].astype(np.int64) + offset_b)
    n = count
    a = np.concatenate(edges_a) if edges_a else np.zeros(0, dtype=np.int64)
    b = np.concatenate(edges_b) if edges_b else np.zeros(0, dtype=np.int64)
    if a.size:
        unique = np.unique(a * n + b)
        a, b = unique // n, unique % n
    component = _components(n, a, b)
    size = np.bincount(component, weights=np.concatenate(areas).astype(np.float64), minlength=n)
    keep = size[component] >= min_voxels
    keep[0] = False
    out = np.zeros_like(mask)
    for z, plane in enumerate(planes):
        if plane is not None:
            _, _, ys, xs, ids, _ = plane
            kept = keep[ids]
            out[z, ys[kept] + r0, xs[kept] + c0] = True
    return out


def segment_masks(manifest: Manifest, probs: np.ndarray, source_per_model_pixel: float = 1.0) -> np.ndarray:
    """Per-label masks (n_labels, H, W) bool, in manifest label order, from one image's per-pixel
    probabilities (C, H, W) (see :class:`~node.inference.manifest.SegmentationSpec`): argmax and
    the label's threshold when the model has a background channel, else the threshold alone; then
    components under ``min_area_px`` model-input pixels removed (``source_per_model_pixel``: how
    many pixels of ``probs`` one model-input pixel covers, when ``probs`` are in source pixels)."""
    spec = manifest.segmentation
    if spec is None:
        raise InferenceError(f"model {manifest.id} is not a segmentation model")
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] < manifest.n_outputs:
        raise InferenceError(f"model {manifest.id}: per-pixel probabilities of shape {probs.shape}")
    argmax = spec.background_index is not None
    out = np.zeros((len(manifest.labels), *probs.shape[1:]), dtype=bool)
    for i, label in enumerate(manifest.labels):
        k = label.index
        mask = probs[k] >= label.threshold
        if argmax:  # channel k wins the argmax (the first of equal maxima, as np.argmax)
            if k > 0:
                mask &= probs[k] > np.max(probs[:k], axis=0)
            if k + 1 < probs.shape[0]:
                mask &= probs[k] >= np.max(probs[k + 1 :], axis=0)
        out[i] = remove_small_components(mask, int(np.ceil(spec.min_area_px * source_per_model_pixel)))
    return out


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two masks; 1.0 when both are empty."""
    a, b = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
