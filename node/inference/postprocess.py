"""From raw model outputs to per-label probabilities (activation as the manifest says) and label scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

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
