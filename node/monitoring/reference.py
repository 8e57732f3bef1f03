"""The validation reference a manifest keeps for drift monitoring (``reference:``), built by
``pacs-node evaluate --write-reference`` from the evaluation's scores and input statistics."""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from node.errors import NodeError
from node.inference.manifest import Manifest, Reference, ScoreReference
from node.monitoring import drift
from node.monitoring.inputs import NUMERIC, InputStats, input_stats

if TYPE_CHECKING:
    from node.evaluate.dataset import Case
    from node.evaluate.run import CaseOutcome

log = logging.getLogger(__name__)

#: Histogram bins of the scores (equal width over [0, 1]).
SCORE_BINS = 10
_NOTE = "# validation distribution for drift monitoring"
_TOP_KEY = re.compile(r"^[A-Za-z_][\w-]*\s*:")


def build_reference(
    scores: Mapping[str, Sequence[float]],
    thresholds: Mapping[str, float],
    inputs: Sequence[InputStats],
    data: str,
    today: dt.date | None = None,
) -> Reference:
    """A reference from the validation cases' scores per label and their input statistics."""
    edges = [float(e) for e in np.linspace(0.0, 1.0, SCORE_BINS + 1)]
    per_label = {}
    for label, values in scores.items():
        if not values:
            continue
        threshold = thresholds.get(label, 0.5)
        per_label[label] = ScoreReference(
            quantiles=drift.quantiles(values),
            edges=edges,
            counts=[int(c) for c in drift.histogram(values, edges)],
            positive_rate=sum(1 for v in values if v >= threshold) / len(values),
        )
    numeric = {}
    for name in NUMERIC:
        values = [float(v) for s in inputs if (v := getattr(s, name)) is not None]
        if values:
            numeric[name] = drift.quantiles(values)
    cases = max([len(v) for v in scores.values()] + [len(inputs), 1])
    return Reference(
        data=data[:200] or "evaluation data",
        created=today or dt.date.today(),
        cases=cases,
        scores=per_label,
        inputs=numeric,
        manufacturers=dict(Counter(s.manufacturer or "(none)" for s in inputs)),
    )


def _without_reference(text: str) -> str:
    """The manifest text without its top-level ``reference:`` block (comments elsewhere kept)."""
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith(_NOTE):
            continue
        if _TOP_KEY.match(line):
            skipping = line.startswith("reference:")
        elif skipping and line.strip() and not line[:1].isspace():
            skipping = False  # a top-level comment after the block
        if not skipping:
            out.append(line)
    return "".join(out).rstrip("\n") + "\n"


def write_reference(manifest_path: Path, reference: Reference) -> None:
    """Replace (or add) the ``reference:`` section of a manifest file, leaving the rest of the
    text as it was."""
    body = yaml.safe_dump(
        {"reference": reference.model_dump(mode="json")}, sort_keys=False, default_flow_style=None, width=100
    )
    text = _without_reference(manifest_path.read_text(encoding="utf-8"))
    note = f"{_NOTE}: written by `pacs-node evaluate --write-reference`\n"
    tmp = manifest_path.with_suffix(".yaml.tmp")
    tmp.write_text(text + note + body, encoding="utf-8")
    tmp.replace(manifest_path)


def reference_from_evaluation(
    manifest: Manifest, cases: Sequence[Case], outcomes: Sequence[CaseOutcome], data: str
) -> Reference:
    """The reference of an evaluation run: the scores of every case analysed without error and
    the input statistics of its files (a case whose files cannot be read again is left out of
    the input statistics)."""
    scores: dict[str, list[float]] = {lb.name: [] for lb in manifest.labels}
    stats: list[InputStats] = []
    for case, outcome in zip(cases, outcomes, strict=True):
        if outcome.error:
            continue
        for label, value in outcome.scores.items():
            scores.setdefault(label, []).append(float(value))
        try:
            stats.append(input_stats(case.files))
        except (NodeError, OSError, ValueError) as exc:
            log.warning("case %s: no input statistics for the reference: %s", case.key, type(exc).__name__)
    thresholds = {lb.name: lb.threshold for lb in manifest.labels}
    return build_reference(scores, thresholds, stats, data)
