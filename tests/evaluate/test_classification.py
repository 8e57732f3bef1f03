"""Metric code against hand-computed confusion matrices, including degenerate sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from node.evaluate.classification import (
    Confusion,
    auc,
    bootstrap_intervals,
    confusion,
    roc_curve,
    threshold_for_sensitivity,
)


def test_hand_computed_confusion() -> None:
    # 10 cases: truth 4 positive / 6 negative; called: TP 3, FN 1, FP 2, TN 4
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    c = confusion(np.array(y, bool), np.array(p, bool))
    assert c == Confusion(tp=3, fp=2, tn=4, fn=1)
    assert c.accuracy == pytest.approx(7 / 10)
    assert c.sensitivity == pytest.approx(3 / 4)
    assert c.specificity == pytest.approx(4 / 6)
    assert c.ppv == pytest.approx(3 / 5)
    assert c.npv == pytest.approx(4 / 5)
    assert c.balanced_accuracy == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert c.f1 == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))


def test_all_positive_truth() -> None:
    c = confusion(np.ones(5, bool), np.array([1, 1, 1, 0, 0], bool))
    assert c == Confusion(tp=3, fp=0, tn=0, fn=2)
    assert c.sensitivity == pytest.approx(0.6)
    assert math.isnan(c.specificity) and c.npv == 0.0  # TN 0 of 2 called negative
    assert c.ppv == 1.0
    assert c.balanced_accuracy == pytest.approx(0.6)  # only sensitivity is defined
    assert c.f1 == pytest.approx(6 / 8)
    assert math.isnan(auc(np.ones(5, bool), np.linspace(0, 1, 5)))


def test_all_negative_truth_and_no_calls() -> None:
    c = confusion(np.zeros(4, bool), np.zeros(4, bool))
    assert c == Confusion(tp=0, fp=0, tn=4, fn=0)
    assert c.accuracy == 1.0 and c.specificity == 1.0 and c.npv == 1.0
    assert math.isnan(c.sensitivity) and math.isnan(c.ppv) and math.isnan(c.f1)
    assert c.balanced_accuracy == 1.0


def test_empty_set() -> None:
    c = confusion(np.zeros(0, bool), np.zeros(0, bool))
    assert all(math.isnan(v) for v in c.metrics().values())
    ci = bootstrap_intervals([], [], [], n_boot=10)
    assert all(math.isnan(lo) and math.isnan(hi) for lo, hi in ci.values())


def test_auc_hand_computed_with_ties() -> None:
    y = np.array([1, 1, 0, 0], bool)
    assert auc(y, [0.9, 0.8, 0.1, 0.2]) == 1.0
    assert auc(y, [0.1, 0.2, 0.9, 0.8]) == 0.0
    # pairs (pos, neg): (0.5,0.5)=0.5, (0.5,0.2)=1, (0.9,0.5)=1, (0.9,0.2)=1 -> 3.5/4
    assert auc(y, [0.5, 0.9, 0.5, 0.2]) == pytest.approx(3.5 / 4)


def test_roc_curve_ends() -> None:
    fpr, tpr, thr = roc_curve([1, 0, 1, 0], [0.9, 0.4, 0.6, 0.1])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.isinf(thr[0])
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_threshold_for_sensitivity() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    s = np.array([0.9, 0.7, 0.4, 0.2, 0.8, 0.3, 0.1, 0.05])
    op = threshold_for_sensitivity(y, s, 0.75)
    assert op is not None
    assert op.threshold == pytest.approx(0.4) and op.sensitivity == pytest.approx(0.75)
    assert op.specificity == pytest.approx(3 / 4)
    op = threshold_for_sensitivity(y, s, 1.0)
    assert op is not None and op.threshold == pytest.approx(0.2) and op.specificity == pytest.approx(2 / 4)
    assert threshold_for_sensitivity(np.zeros(3, bool), [0.1, 0.2, 0.3], 0.9) is None


def test_bootstrap_brackets_point_estimate() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.5
    s = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    p = s >= 0.5
    ci = bootstrap_intervals(y, s, p, n_boot=300, seed=3)
    point = confusion(y, p)
    for name in ("accuracy", "sensitivity", "specificity"):
        lo, hi = ci[name]
        assert lo <= getattr(point, name) <= hi and hi - lo < 0.3
    lo, hi = ci["auc"]
    assert lo <= auc(y, s) <= hi
    # perfectly separated, all-positive resamples: AUC undefined there, intervals still finite
    ci = bootstrap_intervals([1, 0], [0.9, 0.1], [1, 0], n_boot=50)
    assert ci["auc"] == (1.0, 1.0)
