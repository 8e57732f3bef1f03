"""ROC, AUC and bootstrap intervals: scikit-learn's figures on random data, and on a fixed example
the figures the hand-written (quadratic) code gave before it was replaced (recorded from d6f430c)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from node.evaluate import classification as metrics
from node.evaluate.classification import all_metrics, auc, bootstrap_intervals, roc_curve

# fmt: off
Y = np.array([0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1], bool)
S = np.array([0.3, 0.9, 0.9, 0.9, 0.0, 0.1, 0.2, 0.1, 0.1, 0.9, 0.4, 0.6, 0.9, 0.0, 0.5, 0.3, 0.3, 0.3,
              0.4, 0.3, 0.3, 0.8, 0.8, 0.0, 0.2, 0.8, 0.4, 0.0, 0.4, 0.0])
OLD_FPR = [0.0, 0.058823529411764705, 0.17647058823529413, 0.17647058823529413, 0.23529411764705882,
           0.4117647058823529, 0.7058823529411765, 0.7647058823529411, 0.8235294117647058, 1.0]
OLD_TPR = [0.0, 0.3076923076923077, 0.38461538461538464, 0.46153846153846156, 0.46153846153846156,
           0.5384615384615384, 0.6153846153846154, 0.6923076923076923, 0.8461538461538461, 1.0]
OLD_THRESHOLDS = [math.inf, 0.9, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
OLD_INTERVALS = {  # bootstrap_intervals(Y, S, S >= 0.5, n_boot=200, seed=3)
    "accuracy": (0.5, 0.8),
    "sensitivity": (0.19954545454545464, 0.8004545454545456),
    "specificity": (0.5, 0.9474342105263157),
    "ppv": (0.3333333333333333, 0.8891666666666667),
    "npv": (0.44427083333333334, 0.8668750000000001),
    "balanced_accuracy": (0.4795220588235294, 0.7779505582137162),
    "f1": (0.23529411764705882, 0.75),
    "auc": (0.33238970588235295, 0.7848028273809524),
}
# fmt: on


def test_fixed_example_gives_the_old_figures() -> None:
    assert auc(Y, S) == pytest.approx(0.581447963800905, rel=1e-12)
    fpr, tpr, thresholds = roc_curve(Y, S)
    assert fpr.tolist() == pytest.approx(OLD_FPR, rel=1e-12)
    assert tpr.tolist() == pytest.approx(OLD_TPR, rel=1e-12)
    assert thresholds.tolist() == OLD_THRESHOLDS
    ci = bootstrap_intervals(Y, S, S >= 0.5, n_boot=200, seed=3)
    assert ci.keys() == OLD_INTERVALS.keys()
    for name, (lo, hi) in OLD_INTERVALS.items():
        assert ci[name] == pytest.approx((lo, hi), rel=1e-12), name


def test_blocks_of_resamples_draw_and_count_as_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = bootstrap_intervals(Y, S, S >= 0.5, n_boot=200, seed=3)
    monkeypatch.setattr(metrics, "_BOOT_CELLS", 7 * len(Y))  # blocks of 7 resamples, the last of 4
    assert bootstrap_intervals(Y, S, S >= 0.5, n_boot=200, seed=3) == whole


@pytest.mark.parametrize("seed", range(5))
def test_random_data_equals_scikit_learn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    s = np.round(rng.random(n) + 0.3 * y, int(rng.integers(1, 4)))  # informative, with ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    fpr, tpr, thresholds = roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, rtol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, rtol=1e-12)
    np.testing.assert_array_equal(thresholds, sk_thr)
    # the vectorised resample figures are all_metrics' (AUC: scikit-learn's) row by row
    idx = rng.integers(0, n, (25, n))
    rows = metrics._resampled_metrics(y[idx], s[idx], (s >= 0.5)[idx])
    for r in range(idx.shape[0]):
        expected = all_metrics(y[idx[r]], s[idx[r]], (s >= 0.5)[idx[r]])
        for name, value in expected.items():
            got = rows[name][r]
            assert (math.isnan(got) and math.isnan(value)) or got == pytest.approx(value, rel=1e-12), name


def test_absent_class_and_empty_input() -> None:
    y = np.zeros(6, bool)
    s = np.linspace(0, 1, 6)
    assert math.isnan(auc(y, s))
    fpr, tpr, thresholds = roc_curve(y, s)
    assert np.isnan(tpr).all() and fpr[-1] == 1.0 and thresholds[0] == math.inf
    ci = bootstrap_intervals(y, s, s >= 0.5, n_boot=50)
    assert all(math.isnan(v) for v in ci["sensitivity"] + ci["auc"])
    assert ci["specificity"][1] <= 1.0
    fpr, tpr, thresholds = roc_curve([], [])
    assert np.isnan(fpr).all() and np.isnan(tpr).all() and thresholds.tolist() == [math.inf]
