"""The monitoring figures of each model over a recent window: daily counts and positive rate,
score drift (PSI, KS) against the manifest's validation reference, input drift, the shadow
models' agreement with the active ones, and PPV/agreement from radiologists' feedback."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from node.evaluate.feedback import agreement as feedback_agreement
from node.evaluate.feedback import agreement_figures
from node.inference.manifest import Manifest
from node.monitoring import drift
from node.monitoring.inputs import NUMERIC
from node.store import feedback as store_feedback
from node.store.tables import ModelRun

log = logging.getLogger(__name__)

#: Days of runs the figures cover, and the fewest runs for which drift is computed at all.
WINDOW_DAYS = 7
MIN_RUNS = 50


@dataclass
class LabelFigures:
    """One label of one model over the window."""

    label: str
    runs: int
    positive_rate: float | None
    reference_positive_rate: float | None = None
    psi: float | None = None
    ks: float | None = None
    scores: list[float] = field(default_factory=list)
    reference_quantiles: list[float] = field(default_factory=list)


@dataclass
class ShadowFigures:
    """A shadow model against the active model run on the same subjects, per shared label."""

    active_model: str
    label: str
    pairs: int
    agreement: float | None
    shadow_scores: list[float] = field(default_factory=list)
    active_scores: list[float] = field(default_factory=list)


@dataclass
class ModelFigures:
    """Everything the page, the API and the gauges show for one model."""

    model_id: str
    version: str
    shadow: bool
    runs: int
    has_reference: bool
    daily: list[tuple[str, int, int]] = field(default_factory=list)  # (date, runs, runs with a positive)
    labels: list[LabelFigures] = field(default_factory=list)
    inputs: dict[str, float] = field(default_factory=dict)  # statistic -> PSI against the reference
    input_medians: dict[str, float] = field(default_factory=dict)
    manufacturers: dict[str, int] = field(default_factory=dict)
    shadow_vs: list[ShadowFigures] = field(default_factory=list)
    feedback: dict[str, Any] | None = None

    def as_dict(self, samples: bool = False) -> dict:
        """JSON-ready figures (``samples``: with the scores behind the plots)."""
        labels = []
        for lf in self.labels:
            d = {k: v for k, v in lf.__dict__.items() if k not in ("scores", "reference_quantiles")}
            if samples:
                d["scores"] = lf.scores
            labels.append(d)
        shadows = []
        for sf in self.shadow_vs:
            d = {k: v for k, v in sf.__dict__.items() if k not in ("shadow_scores", "active_scores")}
            if samples:
                d["shadow_scores"], d["active_scores"] = sf.shadow_scores, sf.active_scores
            shadows.append(d)
        return {
            "model_id": self.model_id,
            "version": self.version,
            "mode": "shadow" if self.shadow else "active",
            "runs": self.runs,
            "has_reference": self.has_reference,
            "daily": [{"date": d, "runs": n, "positive_runs": p} for d, n, p in self.daily],
            "labels": labels,
            "input_drift_psi": self.inputs,
            "input_medians": self.input_medians,
            "manufacturers": self.manufacturers,
            "shadow_agreement": shadows,
            "feedback": self.feedback,
        }


def recent_runs(session: Session, since: datetime) -> list[ModelRun]:
    """Model runs recorded since ``since``, oldest first."""
    query = select(ModelRun).where(col(ModelRun.recorded_at) >= since).order_by(col(ModelRun.id))
    return list(session.exec(query))


def run_scores(run: ModelRun) -> dict[str, tuple[float, bool]]:
    """A run's ``{label: (probability, positive)}`` (the one place its JSON is read)."""
    return {k: (float(v[0]), bool(v[1])) for k, v in json.loads(run.scores or "{}").items()}


def _label_figures(manifest: Manifest | None, runs: Sequence[ModelRun]) -> list[LabelFigures]:
    per_label: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for run in runs:
        for label, value in run_scores(run).items():
            per_label[label].append(value)
    ref = manifest.reference if manifest is not None else None
    out = []
    for label in sorted(per_label):
        values = per_label[label]
        scores = [p for p, _ in values]
        lf = LabelFigures(
            label=label,
            runs=len(values),
            positive_rate=sum(1 for _, pos in values if pos) / len(values) if values else None,
            scores=scores,
        )
        sref = ref.scores.get(label) if ref is not None else None
        if sref is not None:
            lf.reference_positive_rate = sref.positive_rate
            lf.reference_quantiles = list(sref.quantiles)
            if len(scores) >= MIN_RUNS:
                lf.psi = drift.psi_against_quantiles(scores, sref.quantiles)
                lf.ks = drift.ks(scores, sref.quantiles)
        out.append(lf)
    return out


def _input_figures(
    manifest: Manifest | None, runs: Sequence[ModelRun]
) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    ref = manifest.reference if manifest is not None else None
    psis: dict[str, float] = {}
    medians: dict[str, float] = {}
    for name in NUMERIC:
        values = [float(v) for r in runs if (v := getattr(r, name)) is not None]
        if values:
            medians[name] = float(sorted(values)[len(values) // 2])
        if ref is not None and name in ref.inputs and len(values) >= MIN_RUNS:
            psis[name] = drift.psi_against_quantiles(values, ref.inputs[name])
    mix = Counter((r.manufacturer or "(none)") for r in runs)
    if ref is not None and ref.manufacturers and len(runs) >= MIN_RUNS:
        psis["manufacturer"] = drift.categorical_psi(ref.manufacturers, mix)
    return psis, medians, dict(mix)


def _daily(runs: Iterable[ModelRun]) -> list[tuple[str, int, int]]:
    days: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for run in runs:
        day = days[run.recorded_at.date().isoformat()]
        day[0] += 1
        day[1] += any(pos for _, pos in run_scores(run).values())
    return [(d, n, p) for d, (n, p) in sorted(days.items())]


def _shadow_figures(shadow: Sequence[ModelRun], active: Sequence[ModelRun]) -> list[ShadowFigures]:
    by_subject: dict[str, list[ModelRun]] = defaultdict(list)
    for run in active:
        by_subject[run.subject].append(run)
    pairs: dict[tuple[str, str], list[tuple[tuple[float, bool], tuple[float, bool]]]] = defaultdict(list)
    for run in shadow:
        mine = run_scores(run)
        for other in by_subject.get(run.subject, ()):
            theirs = run_scores(other)
            for label in sorted(set(mine) & set(theirs)):
                pairs[(other.model_id, label)].append((mine[label], theirs[label]))
    out = []
    for (model_id, label), values in sorted(pairs.items()):
        agree = sum(1 for s, a in values if s[1] == a[1])
        out.append(
            ShadowFigures(
                active_model=model_id,
                label=label,
                pairs=len(values),
                agreement=agree / len(values) if values else None,
                shadow_scores=[s[0] for s, _ in values],
                active_scores=[a[0] for _, a in values],
            )
        )
    return out


def feedback_figures(session: Session, model_id: str, version: str | None, since: datetime) -> dict[str, Any]:
    """The radiologists' figures of one model version over the current verdicts given since
    ``since``: the pooled figures of all its findings and, per finding, the ones
    ``GET /api/v1/feedback/summary`` reports, both :func:`node.evaluate.feedback.agreement`
    (agreement rate: agree / (agree + disagree); PPV: of its rated positive decisions, how many
    the verdicts confirm). ``verdicts`` counts them (unsure included); ``ppv``/``agreement`` are
    None while no verdict decides them. ``version`` None: every version."""
    rows = store_feedback.list_feedback(
        session, store_feedback.FeedbackFilter(model_id=model_id, model_version=version, since=since)
    )
    pooled = feedback_agreement(rows)
    return {
        "verdicts": pooled["ratings"],
        "ppv": pooled["ppv"],
        "agreement": pooled["agreement_rate"],
        "since": since.isoformat(),
        **{k: pooled[k] for k in ("agree", "disagree", "unsure", "model_positive", "npv", "confusion")},
        "labels": agreement_figures(rows),
    }


def model_figures(
    session: Session, manifests: Mapping[str, Manifest], now: datetime, days: int = WINDOW_DAYS
) -> list[ModelFigures]:
    """The figures of every model that is loaded or has runs in the last ``days`` days."""
    since = now - timedelta(days=days)
    runs = recent_runs(session, since)
    by_model: dict[str, list[ModelRun]] = defaultdict(list)
    for run in runs:
        by_model[run.model_id].append(run)
    active_runs = [r for r in runs if not r.shadow]
    out = []
    for model_id in sorted(set(manifests) | set(by_model)):
        mine = by_model.get(model_id, [])
        manifest = manifests.get(model_id)
        shadow = manifest.mode == "shadow" if manifest is not None else any(r.shadow for r in mine)
        version = manifest.version if manifest is not None else (mine[-1].model_version if mine else "")
        current = [r for r in mine if r.model_version == version] if manifest is not None else mine
        psis, medians, mix = _input_figures(manifest, current)
        out.append(
            ModelFigures(
                model_id=model_id,
                version=version,
                shadow=shadow,
                runs=len(current),
                has_reference=manifest is not None and manifest.reference is not None,
                daily=_daily(mine),
                labels=_label_figures(manifest, current),
                inputs=psis,
                input_medians=medians,
                manufacturers=mix,
                shadow_vs=_shadow_figures(current, active_runs) if shadow else [],
                feedback=feedback_figures(session, model_id, version or None, since),
            )
        )
    return out
