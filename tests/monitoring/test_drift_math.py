"""node.monitoring.drift and the manifest's reference: PSI and KS on samples whose answer is
known, discrete statistics, and the reference written into (and read back from) a manifest."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from node.errors import ManifestError
from node.inference.registry import load_model
from node.monitoring import drift
from node.monitoring.inputs import InputStats
from node.monitoring.reference import build_reference, write_reference
from tests.helpers import REPO


def test_psi_is_zero_for_the_same_shares_and_large_for_disjoint_ones() -> None:
    assert drift.psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi([100, 0], [0, 100]) > 10
    # the textbook example: 10 % -> 20 % and 90 % -> 80 % gives 0.1 ln 2 + 0.1 ln(9/8)
    assert drift.psi([10, 90], [20, 80]) == pytest.approx(0.1 * np.log(2) + 0.1 * np.log(9 / 8))


def test_psi_against_quantiles_separates_a_shift_from_a_resample() -> None:
    rng = np.random.default_rng(0)
    reference = drift.quantiles(rng.normal(1000, 200, 2000))
    same = rng.normal(1000, 200, 300)
    assert drift.psi_against_quantiles(same, reference) < 0.1
    assert drift.psi_against_quantiles(same * 0.5, reference) > 2


def test_discrete_statistics_bin_per_value() -> None:
    reference = drift.quantiles([512] * 60 + [1024] * 40)
    assert drift.psi_against_quantiles([512] * 60 + [1024] * 40, reference) < 0.05
    assert drift.psi_against_quantiles([1024] * 100, reference) > 1
    assert drift.ks([512] * 60 + [1024] * 40, reference) == pytest.approx(0.0, abs=0.02)
    assert drift.ks([1024] * 100, reference) == pytest.approx(0.6, abs=0.02)


def test_ks_is_scipys_two_sample_statistic_against_the_quantiles() -> None:
    rng = np.random.default_rng(1)
    sample = rng.uniform(0, 1, 5000)
    live = rng.uniform(0.2, 1.0, 400)
    expected = stats.ks_2samp(live, sample).statistic
    assert drift.ks(live, drift.quantiles(sample)) == pytest.approx(expected, abs=0.02)
    assert drift.ks(live, drift.quantiles(sample)) == pytest.approx(0.2, abs=0.05)


def test_categorical_psi() -> None:
    assert drift.categorical_psi({"A": 50, "B": 50}, {"A": 50, "B": 50}) < 0.02
    assert drift.categorical_psi({"A": 100}, {"B": 40, "A": 60}) > 0.25


def test_manifests_load_without_a_reference_and_keep_one_written(tmp_path: Path) -> None:
    model = tmp_path / "cxr"
    shutil.copytree(REPO / "models" / "onnx" / "cxr", model)
    assert load_model(model).manifest.reference is None
    assert load_model(model).manifest.mode == "active"
    inputs = [
        InputStats(images=1, rows=512, columns=400, p1=10.0, p50=900.0 + i, p99=2000.0, manufacturer="X")
        for i in range(30)
    ]
    scores = {"tuberculosis": list(np.linspace(0, 1, 30)), "pneumonia": [0.1] * 30}
    ref = build_reference(
        scores, {"tuberculosis": 0.5, "pneumonia": 0.5}, inputs, "30 phantoms", dt.date(2026, 12, 1)
    )
    before = (model / "manifest.yaml").read_text()
    write_reference(model / "manifest.yaml", ref)
    write_reference(model / "manifest.yaml", ref)  # replaced, not appended twice
    text = (model / "manifest.yaml").read_text()
    assert text.count("\nreference:") == 1 and text.startswith(before.rstrip("\n"))
    loaded = load_model(model).manifest.reference
    assert loaded == ref
    assert loaded.scores["pneumonia"].positive_rate == 0.0
    assert loaded.scores["tuberculosis"].positive_rate == pytest.approx(15 / 30)
    assert loaded.manufacturers == {"X": 30} and "pixel_spacing_mm" not in loaded.inputs


def test_a_reference_whose_histogram_does_not_fit_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "cxr"
    shutil.copytree(REPO / "models" / "onnx" / "cxr", model)
    with (model / "manifest.yaml").open("a") as fh:
        fh.write(
            "reference:\n  data: x\n  created: 2026-12-01\n  cases: 3\n  scores:\n    pneumonia:\n"
            "      quantiles: [0.1, 0.5]\n      edges: [0, 0.5, 1]\n      counts: [3]\n"
            "      positive_rate: 0.3\n"
        )
    with pytest.raises(ManifestError, match="counts"):
        load_model(model)
