"""Run a model over labelled cases through the node's own path and compute the results.

Each case goes through ``node.runner.analyse.analyse`` (decode -> preprocess -> infer -> aggregate,
the path a routed job takes), so the figures are those of the node, not of a re-implementation.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from node.evaluate.classification import (
    all_metrics,
    bootstrap_intervals,
    confusion,
    roc_curve,
    threshold_for_sensitivity,
)
from node.evaluate.dataset import Case
from node.evaluate.segmentation import MaskCounts, case_mask_counts, dice_summary
from node.inference.manifest import Manifest
from node.inference.registry import LoadedModel
from node.inference.runtime import ModelSession
from node.runner.analyse import Stopwatch, analyse
from node.types import AnalysisResult

log = logging.getLogger(__name__)


@dataclass
class CaseOutcome:
    """One analysed case: its truth and the node's aggregated scores and decisions."""

    key: str
    labels: set[str]
    group: str | None
    scores: dict[str, float]
    positive: dict[str, bool]
    seconds: float
    error: str | None = None
    #: segmentation models: voxel counts per label against the truth masks (None: no mask truth)
    masks: dict[str, MaskCounts] | None = None


@dataclass
class Example:
    """A heatmap overlay kept for the report (PNG bytes, base64)."""

    case: str
    label: str
    probability: float
    truth: bool
    png_base64: str


def overlay_png(display: np.ndarray, heat: np.ndarray, max_side: int = 256) -> str:
    """The windowed image with a JET heatmap blended on it, as base64 PNG (at most ``max_side``).

    ``display`` is greyscale (rows, cols) or RGB (rows, cols, 3), as ``display_image`` gives it;
    OpenCV works in BGR, so an RGB display is converted before blending and encoding."""
    if display.ndim == 2:
        grey = cv2.cvtColor(display, cv2.COLOR_GRAY2BGR)
    else:
        grey = cv2.cvtColor(display, cv2.COLOR_RGB2BGR)
    colour = cv2.applyColorMap(np.clip(heat * 255.0, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    if colour.shape[:2] != grey.shape[:2]:
        colour = cv2.resize(colour, (grey.shape[1], grey.shape[0]))
    blended = cv2.addWeighted(grey, 0.6, colour, 0.4, 0.0)
    scale = max_side / max(blended.shape[:2])
    if scale < 1:
        blended = cv2.resize(blended, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", blended)
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else ""


def _examples_from(case: Case, manifest: Manifest, result: AnalysisResult) -> list[Example]:
    out = []
    findings = {f.label: f for f in result.findings}
    for image in result.images[:1]:
        for hm in image.heatmaps:
            if image.display is None or hm.label not in findings:
                continue
            out.append(
                Example(
                    case=case.key,
                    label=hm.label,
                    probability=findings[hm.label].probability,
                    truth=hm.label in case.labels,
                    png_base64=overlay_png(image.display, hm.values),
                )
            )
    return out


def analyse_cases(
    model: LoadedModel,
    session: ModelSession,
    cases: Sequence[Case],
    *,
    examples: int = 4,
    progress: Callable[[int, CaseOutcome], None] | None = None,
    timeout_s: float = 600.0,
    label_map: Mapping[str, str] | None = None,
) -> tuple[list[CaseOutcome], list[Example]]:
    """Analyse every case; keep up to ``examples`` heatmap overlays (true findings first). For a
    segmentation model, each case's masks are also scored against its truth masks
    (:func:`~node.evaluate.segmentation.case_mask_counts`, truth labels renamed by ``label_map``)."""
    manifest = model.manifest
    outcomes: list[CaseOutcome] = []
    kept: list[Example] = []
    spare: list[Example] = []
    for i, case in enumerate(cases):
        t0 = time.monotonic()
        try:
            result, _ = analyse(
                model,
                session,
                case.files,
                level=manifest.aggregation.level,
                uid_seed=f"evaluate-{case.key}",
                watch=Stopwatch(deadline=time.monotonic() + timeout_s),
            )
        except Exception as exc:  # one bad case is reported, not fatal
            outcome = CaseOutcome(case.key, case.labels, case.group, {}, {}, time.monotonic() - t0, str(exc))
        else:
            outcome = CaseOutcome(
                case.key,
                case.labels,
                case.group,
                {f.label: f.probability for f in result.findings},
                {f.label: f.positive for f in result.findings},
                time.monotonic() - t0,
            )
            if manifest.kind == "segmentation":
                try:
                    outcome.masks = case_mask_counts(manifest, result, case.truth, case.truth_dir, label_map)
                except ValueError as exc:  # a truth mask that does not fit: no Dice for this case
                    log.warning("case %s: no Dice: %s", case.key, exc)
            if len(kept) < examples:
                for ex in _examples_from(case, manifest, result):
                    (kept if ex.truth and len(kept) < examples else spare).append(ex)
                spare = spare[:examples]
        outcomes.append(outcome)
        if progress is not None:
            progress(i, outcome)
    kept += spare[: max(0, examples - len(kept))]
    return outcomes, kept


def _clean(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def finding_results(
    outcomes: Sequence[CaseOutcome],
    label: str,
    threshold: float | None,
    *,
    target_sensitivity: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics, 95% intervals, confusion matrix, ROC and operating point for one finding;
    ``threshold`` (the one in force, None when unknown) is recorded, not applied."""
    ok = [o for o in outcomes if o.error is None]
    y = np.array([label in o.labels for o in ok], dtype=bool)
    s = np.array([o.scores[label] for o in ok], dtype=np.float64)
    p = np.array([o.positive[label] for o in ok], dtype=bool)
    cm = confusion(y, p)
    metrics = all_metrics(y, s, p)
    ci = bootstrap_intervals(y, s, p, n_boot=n_boot, seed=seed)
    fpr, tpr, thr = roc_curve(y, s)
    out: dict[str, Any] = {
        "label": label,
        "threshold": threshold,
        "cases": len(ok),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        "confusion": cm.as_dict(),
        "metrics": {k: _clean(v) for k, v in metrics.items()},
        "ci95": {k: [_clean(lo), _clean(hi)] for k, (lo, hi) in ci.items()},
        "roc": {
            "fpr": [_clean(float(v)) for v in fpr],
            "tpr": [_clean(float(v)) for v in tpr],
            "thresholds": [None if not np.isfinite(v) else float(v) for v in thr],
        },
    }
    if target_sensitivity is not None:
        op = threshold_for_sensitivity(y, s, target_sensitivity)
        out["operating_point"] = (
            None
            if op is None
            else {
                "target_sensitivity": op.target_sensitivity,
                "threshold": op.threshold,
                "sensitivity": _clean(op.sensitivity),
                "specificity": _clean(op.specificity),
            }
        )
    return out


def summarise(
    model: LoadedModel,
    outcomes: Sequence[CaseOutcome],
    *,
    target_sensitivity: float | None = None,
    per_group: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    label_map: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON-ready results: per finding overall and (optionally) per group; for a segmentation
    model also ``segmentation``: Dice against the truth masks per label (see
    :func:`~node.evaluate.segmentation.dice_summary`; None when no case had mask truth)."""
    manifest = model.manifest
    findings = [lb for lb in manifest.labels if not lb.normal]
    summary: dict[str, Any] = {
        "model": {
            "id": manifest.id,
            "name": manifest.name,
            "version": manifest.version,
            "sha256": manifest.model.sha256,
            "research_use_only": manifest.research_use_only,
        },
        "level": manifest.aggregation.level,
        "cases": len(outcomes),
        "failed": [{"case": o.key, "error": o.error} for o in outcomes if o.error is not None],
        "seconds": sum(o.seconds for o in outcomes),
        "bootstrap": {"resamples": n_boot, "level": 0.95, "seed": seed},
        "findings": [
            finding_results(
                outcomes,
                lb.name,
                lb.threshold,
                target_sensitivity=target_sensitivity,
                n_boot=n_boot,
                seed=seed,
            )
            for lb in findings
        ],
    }
    if label_map:
        summary["label_map"] = dict(label_map)
    if manifest.kind == "multi_class":
        summary["class_accuracy"] = _clean(class_accuracy(manifest, outcomes))
    if manifest.kind == "segmentation":
        summary["segmentation"] = dice_summary(
            [lb.name for lb in manifest.labels], [o.masks for o in outcomes if o.error is None]
        )
    if per_group:
        groups: dict[str, list[CaseOutcome]] = {}
        for o in outcomes:
            groups.setdefault(o.group or "(none)", []).append(o)
        summary["groups"] = {
            name: [
                finding_results(members, lb.name, lb.threshold, n_boot=n_boot, seed=seed) for lb in findings
            ]
            for name, members in sorted(groups.items())
        }
    return summary


def class_accuracy(manifest: Manifest, outcomes: Sequence[CaseOutcome]) -> float:
    """Multi-class: how often the node's decision (most probable finding over its threshold, else the
    normal class) is the case's class."""
    normal = next((lb.name for lb in manifest.labels if lb.normal), "normal")
    findings = [lb.name for lb in manifest.labels if not lb.normal]
    hits = []
    for o in outcomes:
        if o.error is not None:
            continue
        called = [f for f in findings if o.positive.get(f)]
        decision = max(called, key=o.scores.__getitem__) if called else normal
        truth = next((f for f in findings if f in o.labels), normal)
        hits.append(decision == truth)
    return float(np.mean(hits)) if hits else math.nan


@dataclass
class EvaluationRun:
    """Everything a report needs."""

    summary: dict[str, Any]
    examples: list[Example] = field(default_factory=list)
