"""Label vocabulary of the synthetic phantoms and how a requested label is normalised."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KINDS: tuple[str, ...] = ("cxr", "mammo", "ct", "mr", "fundus", "derm", "smear")

#: Study-level labels per kind. ``cxr`` is multi-label (a study may carry none, either or both);
#: the other kinds carry exactly one label.
LABELS: dict[str, tuple[str, ...]] = {
    "cxr": ("tuberculosis", "pneumonia"),
    "mammo": ("normal", "benign", "malignant"),
    "ct": ("normal", "benign", "malignant"),
    "mr": ("normal", "tumour"),
    "fundus": ("normal", "referable_dr"),
    "derm": ("naevus", "melanoma"),
    "smear": ("normal", "plasmodium"),
}

MULTI_LABEL: frozenset[str] = frozenset({"cxr"})

#: Spellings accepted for "no finding" in the multi-label vocabulary.
_NONE_WORDS = frozenset({"", "none", "normal", "negative"})

LabelRequest = str | Sequence[str] | None


def check_kind(kind: str) -> str:
    """Return ``kind`` lower-cased, or raise ValueError naming the accepted kinds."""
    k = str(kind).lower()
    if k not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {', '.join(KINDS)}")
    return k


def label_choices(kind: str) -> list[tuple[str, ...]]:
    """All label sets a study of ``kind`` can carry (for balanced sampling)."""
    kind = check_kind(kind)
    if kind in MULTI_LABEL:
        a, b = LABELS[kind]
        return [(), (a,), (b,), (a, b)]
    return [(label,) for label in LABELS[kind]]


def normalise_labels(kind: str, label: LabelRequest) -> tuple[str, ...]:
    """Turn a requested label into the canonical study label tuple.

    ``label`` may be a single label, a ``+``/``,`` separated string (cxr), or a sequence of labels.
    For cxr an empty tuple means no finding; for the other kinds the tuple has one element.
    Raises ValueError for a label outside the vocabulary.
    """
    kind = check_kind(kind)
    if label is None:
        raise ValueError("label is None; draw one with random_labels()")
    if isinstance(label, str):
        parts = [p.strip().lower() for p in label.replace(",", "+").split("+")]
    else:
        parts = [str(p).strip().lower() for p in label]
    vocab = LABELS[kind]
    if kind in MULTI_LABEL:
        found = {p for p in parts if p not in _NONE_WORDS}
        unknown = found - set(vocab)
        if unknown:
            raise ValueError(f"unknown {kind} label(s) {sorted(unknown)}; expected any of {vocab} or none")
        return tuple(v for v in vocab if v in found)
    if len(parts) != 1 or parts[0] not in vocab:
        raise ValueError(f"{kind} takes exactly one label out of {vocab}, got {label!r}")
    return (parts[0],)


def random_labels(kind: str, rng: np.random.Generator) -> tuple[str, ...]:
    """Draw a label set uniformly from :func:`label_choices` (so each choice is equally likely)."""
    choices = label_choices(kind)
    return choices[int(rng.integers(len(choices)))]


def balanced_labels(kind: str, count: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """``count`` label sets, as evenly spread over the choices as ``count`` allows, in random order."""
    choices = label_choices(kind)
    pool = choices * (count // len(choices))
    rest = count - len(pool)
    if rest:
        pool += [choices[i] for i in sorted(rng.choice(len(choices), size=rest, replace=False))]
    return [pool[i] for i in rng.permutation(len(pool))]
