"""Binary classification metrics from labels, scores and decisions, with bootstrap intervals.

ROC and AUC are scikit-learn's, the bootstrap's ranks SciPy's. Every ratio whose denominator is
zero (e.g. sensitivity when there is no positive case) is NaN, never a division error; balanced
accuracy is the mean of the defined ones among sensitivity and specificity.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

#: The metrics reported for one finding, in report order.
METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "balanced_accuracy",
    "f1",
    "auc",
)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


@dataclass(frozen=True)
class Confusion:
    """A 2x2 confusion matrix: true/false positives/negatives."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        """Number of cases."""
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        """(TP + TN) / N."""
        return _ratio(self.tp + self.tn, self.n)

    @property
    def sensitivity(self) -> float:
        """TP / (TP + FN) (recall, true-positive rate)."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """TN / (TN + FP) (true-negative rate)."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float:
        """TP / (TP + FP) (precision)."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        """TN / (TN + FN)."""
        return _ratio(self.tn, self.tn + self.fn)

    @property
    def balanced_accuracy(self) -> float:
        """Mean of sensitivity and specificity (of the defined one when a class is absent)."""
        defined = [v for v in (self.sensitivity, self.specificity) if not math.isnan(v)]
        return sum(defined) / len(defined) if defined else math.nan

    @property
    def f1(self) -> float:
        """2 TP / (2 TP + FP + FN)."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def metrics(self) -> dict[str, float]:
        """Every threshold metric by name (no AUC)."""
        return {name: getattr(self, name) for name in METRIC_NAMES if name != "auc"}

    def as_dict(self) -> dict[str, int]:
        """``{"tp": .., "fp": .., "tn": .., "fn": ..}``."""
        return asdict(self)


def confusion(truth: Sequence[bool] | np.ndarray, predicted: Sequence[bool] | np.ndarray) -> Confusion:
    """The confusion matrix of boolean ``predicted`` decisions against boolean ``truth``."""
    y = np.asarray(truth, dtype=bool)
    p = np.asarray(predicted, dtype=bool)
    if y.shape != p.shape:
        raise ValueError(f"truth and predictions differ in shape: {y.shape} vs {p.shape}")
    return Confusion(
        tp=int(np.sum(p & y)), fp=int(np.sum(p & ~y)), tn=int(np.sum(~p & ~y)), fn=int(np.sum(~p & y))
    )


def auc(truth: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC (scikit-learn's; ties count half, as in the Mann-Whitney statistic); NaN when a class
    is missing."""
    y = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if not y.any() or y.all():
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def roc_curve(
    truth: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates, thresholds), from (0, 0) at +inf to (1, 1).

    Predicting positive when ``score >= threshold``, one point per distinct score (scikit-learn's
    curve without dropping collinear points); NaN rates for an absent class."""
    y = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.size == 0:
        return np.array([np.nan]), np.array([np.nan]), np.array([np.inf])
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import roc_curve as sk_roc_curve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # an absent class: NaN rates
        fpr, tpr, thresholds = sk_roc_curve(y, s, drop_intermediate=False)
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)


@dataclass(frozen=True)
class OperatingPoint:
    """The highest threshold reaching a requested sensitivity, and what it gives."""

    target_sensitivity: float
    threshold: float
    sensitivity: float
    specificity: float


def threshold_for_sensitivity(
    truth: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray, target: float
) -> OperatingPoint | None:
    """The highest threshold ``t`` with sensitivity(score >= t) >= ``target``; None without positives."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos = np.sort(s[y])[::-1]
    if pos.size == 0:
        return None
    k = max(1, math.ceil(target * pos.size - 1e-9))
    t = float(pos[k - 1])
    c = confusion(y, s >= t)
    return OperatingPoint(target, t, c.sensitivity, c.specificity)


def all_metrics(truth: np.ndarray, scores: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Threshold metrics of ``predicted`` plus the AUC of ``scores``."""
    out = confusion(truth, predicted).metrics()
    out["auc"] = auc(truth, scores)
    return out


#: Resampled cases held in memory at once by :func:`bootstrap_intervals` (resamples x cases).
_BOOT_CELLS = 2_000_000


def _ratios(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _resampled_metrics(y: np.ndarray, s: np.ndarray, p: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of each row of resampled cases (rows of ``y``, ``s``, ``p``), NaN where
    undefined: the same figures :func:`all_metrics` gives one row, for all rows at once."""
    from scipy.stats import rankdata

    tp = np.sum(p & y, axis=1).astype(np.float64)
    fp = np.sum(p & ~y, axis=1).astype(np.float64)
    tn = np.sum(~p & ~y, axis=1).astype(np.float64)
    fn = np.sum(~p & y, axis=1).astype(np.float64)
    sens, spec = _ratios(tp, tp + fn), _ratios(tn, tn + fp)
    balanced = np.where(np.isnan(sens), spec, np.where(np.isnan(spec), sens, (sens + spec) / 2))
    n_pos = tp + fn
    n_neg = tn + fp
    rank_sum = np.sum(rankdata(s, axis=1) * y, axis=1)  # average ranks over ties
    return {
        "accuracy": _ratios(tp + tn, tp + fp + tn + fn),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": _ratios(tp, tp + fp),
        "npv": _ratios(tn, tn + fn),
        "balanced_accuracy": balanced,
        "f1": _ratios(2 * tp, 2 * tp + fp + fn),
        "auc": _ratios(rank_sum - n_pos * (n_pos + 1) / 2.0, n_pos * n_neg),
    }


def bootstrap_intervals(
    truth: Sequence[bool] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    predicted: Sequence[bool] | np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals (cases resampled with replacement) for every metric.

    Resamples where a metric is undefined (NaN) are left out of its interval; a metric undefined in
    every resample gets (NaN, NaN). The resamples are computed together (in blocks of at most
    ``_BOOT_CELLS`` cases), not one by one."""
    y = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    p = np.asarray(predicted, dtype=bool)
    n = len(y)
    if n == 0 or n_boot <= 0:
        return {name: (math.nan, math.nan) for name in METRIC_NAMES}
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, _BOOT_CELLS // n))
    parts: dict[str, list[np.ndarray]] = {name: [] for name in METRIC_NAMES}
    for start in range(0, n_boot, block):
        idx = rng.integers(0, n, (min(block, n_boot - start), n))
        for name, values in _resampled_metrics(y[idx], s[idx], p[idx]).items():
            parts[name].append(values)
    alpha = (1.0 - level) / 2.0
    out = {}
    for name in METRIC_NAMES:
        values = np.concatenate(parts[name])
        values = values[~np.isnan(values)]
        if values.size:
            lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
            out[name] = (float(lo), float(hi))
        else:
            out[name] = (math.nan, math.nan)
    return out
