"""Radiologists' feedback as reference labels: what a verdict says the truth is, the agreement
figures per model, version and finding, and the evaluation summary ``pacs-node evaluate --labels
feedback`` reports (the node's recorded scores and decisions against the feedback).

A verdict's reference label: *agree* -> the model's decision; *disagree* -> the correct label
(``positive`` or the finding's own label: present; ``negative`` or another class's label: absent;
none given: the opposite of the model's decision); *unsure* -> no reference (left out).

Pure functions of rows with the attributes of :class:`node.store.tables.Feedback` (the table's rows,
or the API's listing items); only numpy and :mod:`node.evaluate.classification` are imported at module level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from node.evaluate.classification import confusion

VERDICTS = ("agree", "disagree", "unsure")
#: correct_label values for a present / absent finding (besides a class's label, for multi-class)
PRESENT, ABSENT = "positive", "negative"


class FeedbackRow(Protocol):
    """What the figures read of one verdict."""

    job_id: int
    label: str
    model_id: str
    model_version: str
    threshold: float | None
    score: float
    positive: bool
    verdict: str
    correct_label: str | None
    user_name: str


def reference(verdict: str, positive: bool, correct_label: str | None, label: str) -> bool | None:
    """The reference label a verdict gives the finding ``label``: True present, False absent,
    None (unsure: no reference)."""
    if verdict == "unsure":
        return None
    if verdict == "agree":
        return positive
    if verdict != "disagree":
        raise ValueError(f"verdict {verdict!r}: one of {', '.join(VERDICTS)}")
    if not correct_label:
        return not positive
    return correct_label in (PRESENT, label)


def row_reference(row: FeedbackRow) -> bool | None:
    """:func:`reference` of a stored verdict."""
    return reference(row.verdict, row.positive, row.correct_label, row.label)


def _num(value: float) -> float | None:
    return None if math.isnan(value) else value


def _key(row: FeedbackRow) -> tuple[str, str, str]:
    return (row.model_id, row.model_version, row.label)


def group_rows(rows: Iterable[FeedbackRow]) -> dict[tuple[str, str, str], list[FeedbackRow]]:
    """The rows per (model id, model version, finding label), sorted by key."""
    groups: dict[tuple[str, str, str], list[FeedbackRow]] = {}
    for row in rows:
        groups.setdefault(_key(row), []).append(row)
    return dict(sorted(groups.items()))


def agreement(rows: Sequence[FeedbackRow]) -> dict[str, Any]:
    """The agreement figures of one finding's verdicts: counts per verdict; agreement rate
    (agree / (agree + disagree)); against the reference labels, the model's PPV, NPV, sensitivity
    and specificity (None where undefined, e.g. PPV with no positive decision rated)."""
    counts = {v: sum(1 for r in rows if r.verdict == v) for v in VERDICTS}
    rated = [(ref, r.positive) for r in rows if (ref := row_reference(r)) is not None]
    cm = confusion([ref for ref, _ in rated], [p for _, p in rated])
    decided = counts["agree"] + counts["disagree"]
    return {
        "ratings": len(rows),
        **counts,
        "agreement_rate": counts["agree"] / decided if decided else None,
        "model_positive": cm.tp + cm.fp,
        "reference_positive": cm.tp + cm.fn,
        "confusion": cm.as_dict(),
        "ppv": _num(cm.ppv),
        "npv": _num(cm.npv),
        "sensitivity": _num(cm.sensitivity),
        "specificity": _num(cm.specificity),
    }


def agreement_figures(rows: Iterable[FeedbackRow]) -> list[dict[str, Any]]:
    """:func:`agreement` per model id, model version and finding label."""
    return [
        {"model_id": model_id, "model_version": version, "label": label, **agreement(members)}
        for (model_id, version, label), members in group_rows(rows).items()
    ]


def _threshold(rows: Sequence[FeedbackRow]) -> float | None:
    """The threshold in force at the latest verdict that knows it."""
    known = [r.threshold for r in rows if r.threshold is not None]
    return known[-1] if known else None


def feedback_summary(
    model: dict[str, Any],
    rows: Sequence[FeedbackRow],
    *,
    target_sensitivity: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    filters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluation summary (``report.json``; :func:`node.evaluate.report.write_report`) of one
    model's recorded results against the feedback ``rows``: per version and finding, the metrics of
    ``pacs-node evaluate`` (accuracy at the model's decision is the agreement rate) with bootstrap
    intervals, and ``agreement``: :func:`agreement_figures`. Each rated verdict is one case;
    unsure verdicts are left out (counted)."""
    from node.evaluate.run import CaseOutcome, finding_results  # numpy, the node's analysis path

    findings = []
    for (_, version, label), members in group_rows(rows).items():
        outcomes = [
            CaseOutcome(
                key=f"job {r.job_id} {label} by {r.user_name}",
                labels={label} if ref else set(),
                group=None,
                scores={label: r.score},
                positive={label: r.positive},
                seconds=0.0,
            )
            for r in members
            if (ref := row_reference(r)) is not None
        ]
        if not outcomes:
            continue
        result = finding_results(
            outcomes,
            label,
            _threshold(members),
            target_sensitivity=target_sensitivity,
            n_boot=n_boot,
            seed=seed,
        )
        findings.append({"model_version": version, **result})
    unsure = sum(1 for r in rows if r.verdict == "unsure")
    return {
        "source": "feedback",
        "model": model,
        "level": "finding",
        "cases": len(rows) - unsure,
        "excluded_unsure": unsure,
        "versions": sorted({r.model_version for r in rows}),
        "filters": filters or {},
        "failed": [],
        "seconds": 0.0,
        "bootstrap": {"resamples": n_boot, "level": 0.95, "seed": seed},
        "agreement": agreement_figures(rows),
        "findings": findings,
    }
