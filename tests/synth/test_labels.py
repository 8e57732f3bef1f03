from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from node.synth.labels import LABELS, balanced_labels, label_choices, normalise_labels, random_labels


def test_vocabulary():
    assert LABELS["cxr"] == ("tuberculosis", "pneumonia")
    assert LABELS["mammo"] == ("normal", "benign", "malignant")
    assert LABELS["ct"] == ("normal", "benign", "malignant")
    assert LABELS["mr"] == ("normal", "tumour")
    assert label_choices("cxr") == [(), ("tuberculosis",), ("pneumonia",), ("tuberculosis", "pneumonia")]


@pytest.mark.parametrize(
    ("kind", "request_", "expected"),
    [
        ("cxr", "none", ()),
        ("cxr", "normal", ()),
        ("cxr", "pneumonia+tuberculosis", ("tuberculosis", "pneumonia")),
        ("cxr", ["Pneumonia"], ("pneumonia",)),
        ("cxr", (), ()),
        ("mammo", "Malignant", ("malignant",)),
        ("ct", ["benign"], ("benign",)),
        ("mr", "tumour", ("tumour",)),
    ],
)
def test_normalise(kind, request_, expected):
    assert normalise_labels(kind, request_) == expected


@pytest.mark.parametrize(
    ("kind", "bad"), [("cxr", "cancer"), ("mammo", "tumour"), ("ct", "benign+malignant"), ("mr", "")]
)
def test_normalise_rejects(kind, bad):
    with pytest.raises(ValueError):
        normalise_labels(kind, bad)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown phantom kind"):
        normalise_labels("pet", "normal")


@pytest.mark.parametrize("count", [0, 1, 5, 12])
def test_balanced(count):
    labels = balanced_labels("mammo", count, np.random.default_rng(0))
    assert len(labels) == count
    tally = Counter(labels)
    assert max(tally.values(), default=0) - min(tally.values(), default=0) <= 1
    if count >= 3:
        assert set(tally) == set(label_choices("mammo"))


def test_random_labels_cover_choices():
    rng = np.random.default_rng(1)
    seen = {random_labels("cxr", rng) for _ in range(60)}
    assert seen == set(label_choices("cxr"))
