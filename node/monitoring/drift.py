"""Drift of live values against the validation reference: the population stability index (PSI)
and the Kolmogorov-Smirnov statistic (scipy.stats.kstest against the reference's CDF)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats
from scipy.special import rel_entr

#: Share given to an empty bin so that the PSI stays finite.
EPSILON = 1e-4
#: Pseudo-count added to each bin of the live counts (Jeffreys): tempers the small-sample bias
#: of the PSI (an empty bin would otherwise weigh ln(share / EPSILON)).
PSEUDO_COUNT = 0.5
#: The customary PSI reading: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 significant shift.
PSI_SIGNIFICANT = 0.25
#: Equal-mass bins of the PSI: quintiles of the reference. Ten (deciles) is the textbook choice,
#: but its small-sample bias, about (bins - 1) * (1/n_live + 1/n_reference), reaches the 0.25
#: alert level at the 50-100 runs a week one model sees on one node; five keeps it near 0.1.
BINS = 5
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 101)


#: Counts per bin: a list, or an array as the binning functions return.
Counts = Sequence[float] | np.ndarray


def _shares(counts: Counts) -> np.ndarray:
    arr = np.asarray(counts, dtype=np.float64)
    total = arr.sum()
    shares = arr / total if total > 0 else np.full(arr.shape, 1.0 / max(1, arr.size))
    shares = np.clip(shares, EPSILON, None)
    return shares / shares.sum()


def psi(expected_counts: Counts, actual_counts: Counts) -> float:
    """Population stability index of two binnings of the same bins:
    sum((a - e) * ln(a / e)), i.e. the symmetric Kullback-Leibler divergence."""
    e, a = _shares(expected_counts), _shares(actual_counts)
    return float(np.sum(rel_entr(a, e) + rel_entr(e, a)))


def histogram(values: Sequence[float], edges: Sequence[float]) -> np.ndarray:
    """Counts of ``values`` in the bins ``edges`` (values outside fall in the outer bins)."""
    edges_arr = np.asarray(edges, dtype=np.float64)
    clipped = np.clip(np.asarray(values, dtype=np.float64), edges_arr[0], edges_arr[-1])
    return np.histogram(clipped, bins=edges_arr)[0]


def quantiles(values: Sequence[float]) -> list[float]:
    """The 101 quantiles (0 %, 1 %, ..., 100 %) a reference keeps of a sample."""
    return [float(q) for q in np.quantile(np.asarray(values, dtype=np.float64), QUANTILE_LEVELS)]


def quantile_edges(reference_quantiles: Sequence[float], bins: int = BINS) -> np.ndarray:
    """Bin edges at the reference's quantiles (``bins`` equal-mass bins), repeated edges merged (a
    discrete statistic such as rows gets one bin per value), open on both sides."""
    q = np.asarray(reference_quantiles, dtype=np.float64)
    levels = np.linspace(0, 1, bins + 1)[1:-1]
    inner = np.unique(np.quantile(q, levels, method="inverted_cdf"))
    return np.concatenate(([-np.inf], inner, [np.inf]))


def _binned(values: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Counts per bin [e_i, e_i+1) (a value equal to an edge falls in the bin above it)."""
    idx = np.searchsorted(edges[1:-1], np.asarray(values, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=edges.size - 1).astype(np.float64)


def ks(values: Sequence[float], reference_quantiles: Sequence[float]) -> float:
    """Kolmogorov-Smirnov statistic of ``values`` against the reference (its 101 quantiles as
    the reference sample: the largest gap between the two cumulative distributions, ties and
    discrete statistics included)."""
    live = np.asarray(values, dtype=np.float64)
    return float(stats.ks_2samp(live, np.asarray(reference_quantiles, dtype=np.float64)).statistic)


def psi_against_quantiles(values: Sequence[float], reference_quantiles: Sequence[float]) -> float:
    """PSI of ``values`` over the reference's decile bins; each bin's expected share is that of
    the reference's quantiles falling in it (so merged bins keep their mass)."""
    edges = quantile_edges(reference_quantiles)
    expected = _binned(reference_quantiles, edges)
    actual = _binned(values, edges) + PSEUDO_COUNT
    return psi(expected, actual)


def categorical_psi(expected: Mapping[str, int], actual: Mapping[str, int]) -> float:
    """PSI of two category mixes (e.g. manufacturers); categories absent on one side count as empty."""
    keys = sorted(set(expected) | set(actual))
    return psi([expected.get(k, 0) for k in keys], [actual.get(k, 0) + PSEUDO_COUNT for k in keys])
