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
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


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
    return keep[labels]


def _find(parent: list[int], a: int) -> int:
    while parent[a] != a:
        parent[a] = parent[parent[a]]
        a = parent[a]
    return a


def remove_small_volumes(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` (D, H, W) without its 26-connected components of fewer than ``min_voxels`` voxels;
    a bool array.

    No SciPy at runtime: each slice is labelled 8-connected by OpenCV, the 2-D components of
    neighbouring slices that touch across the 3x3 in-plane neighbourhood are joined (union-find),
    and a 3-D component's size is the sum of its slices' areas. Only the bounding box of the mask
    is worked on."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise InferenceError(f"a 3-D mask is (D, H, W); found shape {mask.shape}")
    if min_voxels <= 1 or not mask.any():
        return mask
    rows = np.flatnonzero(mask.any(axis=(0, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 1)))
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = mask[:, r0:r1, c0:c1]
    depth, height, width = box.shape
    labels = np.zeros(box.shape, dtype=np.int32)  # global component ids, 0 = background
    areas: list[int] = [0]
    for z in range(depth):
        if not box[z].any():
            continue
        count, lab, stats, _ = cv2.connectedComponentsWithStats(box[z].astype(np.uint8), connectivity=8)
        offset = len(areas) - 1
        labels[z] = np.where(lab > 0, lab + offset, 0)
        areas.extend(int(a) for a in stats[1:, cv2.CC_STAT_AREA])
    parent = list(range(len(areas)))
    for z in range(depth - 1):
        a, b = labels[z], labels[z + 1]
        if not (a.any() and b.any()):
            continue
        pairs = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ya, yb = slice(max(0, -dy), height - max(0, dy)), slice(max(0, dy), height - max(0, -dy))
                xa, xb = slice(max(0, -dx), width - max(0, dx)), slice(max(0, dx), width - max(0, -dx))
                sa, sb = a[ya, xa], b[yb, xb]
                touch = (sa > 0) & (sb > 0)
                if touch.any():
                    pairs.append(sa[touch].astype(np.int64) * len(areas) + sb[touch])
        if pairs:
            for code in np.unique(np.concatenate(pairs)).tolist():
                ra, rb = _find(parent, code // len(areas)), _find(parent, code % len(areas))
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([_find(parent, i) for i in range(len(areas))], dtype=np.int64)
    size = np.bincount(roots, weights=np.asarray(areas, dtype=np.float64), minlength=len(areas))
    keep = size[roots] >= min_voxels
    keep[0] = False
    out = np.zeros_like(mask)
    out[:, r0:r1, c0:c1] = keep[labels]
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
    winner = np.argmax(probs, axis=0) if spec.background_index is not None else None
    out = np.zeros((len(manifest.labels), *probs.shape[1:]), dtype=bool)
    for i, label in enumerate(manifest.labels):
        mask = probs[label.index] >= label.threshold
        if winner is not None:
            mask &= winner == label.index
        out[i] = remove_small_components(mask, int(np.ceil(spec.min_area_px * source_per_model_pixel)))
    return out


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two masks; 1.0 when both are empty."""
    a, b = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
