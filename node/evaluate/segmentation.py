"""Dice of a segmentation model's masks against the phantom truth masks (``pacs-node evaluate``).

The truth of a phantom study (``truth.json`` beside the files, written by ``pacs-node synth``)
lists its lesions (id, label) and, per instance showing one, a PNG mask in stored pixels whose
value is the lesion id. A truth lesion label (e.g. ``malignant``) counts for the model label of
the same name, or the one ``label_map`` names (``--map-label malignant=mass``).

Per case and model label the node's masks (source pixels, every analysed frame) and the truth
give three voxel counts: the overlap, the predicted and the truth voxels. Over the cases:

- ``mean_dice``: the mean per-study Dice over the studies whose truth has that label;
- ``pooled_dice``: 2 x overlap / (predicted + truth), every voxel of every study pooled;
- ``false_positive_studies``: studies with predicted voxels of a label their truth lacks;
- ``lesion``: the same for any label vs background (the masks' union).

A study with lesions but no mask files (``synth --no-masks``) has no mask truth and is left out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from node.inference.manifest import Manifest
from node.types import AnalysisResult

log = logging.getLogger(__name__)

#: the union of every label (lesion vs background)
LESION = "lesion"


@dataclass(frozen=True)
class MaskCounts:
    """Voxel counts of one label in one case."""

    overlap: int
    predicted: int
    truth: int

    @property
    def dice(self) -> float:
        """Dice; 1.0 when both masks are empty."""
        total = self.predicted + self.truth
        return 1.0 if total == 0 else 2.0 * self.overlap / total


def parse_label_map(pairs: Sequence[str]) -> dict[str, str]:
    """``["malignant=mass", ...]`` -> ``{"malignant": "mass"}``; ValueError naming a bad pair."""
    out = {}
    for pair in pairs:
        truth, sep, model = pair.partition("=")
        if not sep or not truth.strip() or not model.strip():
            raise ValueError(f"a label mapping is TRUTH=MODEL (found {pair!r})")
        out[truth.strip()] = model.strip()
    return out


def _read_mask(path: Path) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"cannot read the truth mask {path}")
    return mask


def case_mask_counts(
    manifest: Manifest,
    result: AnalysisResult,
    truth: Mapping[str, Any] | None,
    truth_dir: Path | None,
    label_map: Mapping[str, str] | None = None,
) -> dict[str, MaskCounts] | None:
    """Per model label (and :data:`LESION`) the voxel counts of ``result``'s masks against the
    phantom ``truth`` (``truth.json`` as read, its folder ``truth_dir``); None when the case has no
    mask truth. Raises ValueError when a truth mask and a predicted mask differ in size."""
    segmentation = result.segmentation
    if segmentation is None or truth is None or truth_dir is None:
        return None
    label_map = dict(label_map or {})
    instances = {str(i["sop_instance_uid"]): i for i in truth.get("instances", [])}
    lesions = truth.get("lesions", [])
    if lesions and not any(i.get("mask") for i in instances.values()):
        log.info("study %s has lesions but no truth masks; no Dice", truth.get("study_instance_uid"))
        return None
    names = [lb.name for lb in manifest.labels]
    ids: dict[str, list[int]] = {name: [] for name in names}
    for lesion in lesions:
        name = label_map.get(str(lesion["label"]), str(lesion["label"]))
        if name in ids:
            ids[name].append(int(lesion["id"]))
    counts = {name: [0, 0, 0] for name in [*names, LESION]}
    for frame in segmentation.frames:
        inst = instances.get(frame.sop_instance_uid)
        if inst is None or (frame.frame is not None and frame.frame != 1):
            continue
        mask_name = inst.get("mask")
        truth_mask = _read_mask(truth_dir / mask_name) if mask_name else None
        if truth_mask is not None and truth_mask.shape != (frame.rows, frame.cols):
            raise ValueError(
                f"truth mask {mask_name} is {truth_mask.shape}; "
                f"the analysed frame is {(frame.rows, frame.cols)}"
            )
        any_pred = np.zeros((frame.rows, frame.cols), dtype=bool)
        any_truth = np.zeros_like(any_pred)
        for k, name in enumerate(names):
            pred = frame.masks[k] if frame.masks is not None else np.zeros_like(any_pred)
            true = (
                np.isin(truth_mask, ids[name])
                if truth_mask is not None and ids[name]
                else np.zeros_like(any_pred)
            )
            c = counts[name]
            c[0] += int(np.logical_and(pred, true).sum())
            c[1] += int(pred.sum())
            c[2] += int(true.sum())
            any_pred |= pred
            any_truth |= true
        c = counts[LESION]
        c[0] += int(np.logical_and(any_pred, any_truth).sum())
        c[1] += int(any_pred.sum())
        c[2] += int(any_truth.sum())
    return {name: MaskCounts(*c) for name, c in counts.items()}


def _clean(value: float) -> float | None:
    return None if math.isnan(value) else value


def dice_summary(
    labels: Sequence[str], per_case: Sequence[Mapping[str, MaskCounts] | None]
) -> dict[str, Any] | None:
    """The report's ``segmentation`` section from every case's counts (None: no case had mask
    truth): per label and for :data:`LESION`, the mean per-study and the pooled Dice."""
    cases = [c for c in per_case if c is not None]
    if not cases:
        return None
    rows = []
    for name in [*labels, LESION]:
        with_truth = [c[name] for c in cases if c[name].truth > 0]
        overlap = sum(c[name].overlap for c in cases)
        total = sum(c[name].predicted + c[name].truth for c in cases)
        rows.append(
            {
                "label": name,
                "studies": len(with_truth),
                "mean_dice": _clean(float(np.mean([m.dice for m in with_truth])) if with_truth else math.nan),
                "min_dice": _clean(float(min(m.dice for m in with_truth)) if with_truth else math.nan),
                "pooled_dice": _clean(2.0 * overlap / total if total else math.nan),
                "false_positive_studies": sum(
                    1 for c in cases if c[name].truth == 0 and c[name].predicted > 0
                ),
                "predicted_voxels": sum(c[name].predicted for c in cases),
                "truth_voxels": sum(c[name].truth for c in cases),
            }
        )
    return {"cases_with_masks": len(cases), "labels": rows}
