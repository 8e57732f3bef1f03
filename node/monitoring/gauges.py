"""Prometheus gauges of the monitoring figures, computed at scrape time (cached a few seconds so
that several scrapers do not each recompute them). Labels carry model ids, label names and
statistic names only."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from node.inference.manifest import Manifest
from node.monitoring.report import ModelFigures, model_figures
from node.prometheus import PREFIX
from node.store.tables import utcnow

log = logging.getLogger(__name__)
#: Seconds a computation is reused by the next scrape.
CACHE_S = 5.0


class MonitoringCollector(Collector):
    """Per model and label: runs, positive rate, score PSI and KS against the validation
    reference, input drift per statistic, a shadow model's agreement with the active one and
    the feedback's PPV and agreement."""

    def __init__(self, engine: Engine, manifests: Callable[[], Mapping[str, Manifest]]) -> None:
        self._engine = engine
        self._manifests = manifests
        self._lock = threading.Lock()
        self._cached: tuple[float, list[ModelFigures]] | None = None

    def describe(self) -> list[Metric]:
        """Nothing up front (collect reads the database)."""
        return []

    def figures(self) -> list[ModelFigures]:
        """The current figures (recomputed when older than CACHE_S)."""
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached[0] < CACHE_S:
                return self._cached[1]
            with Session(self._engine) as session:
                figures = model_figures(session, self._manifests(), utcnow())
            self._cached = (time.monotonic(), figures)
            return figures

    def collect(self) -> Iterator[Metric]:
        """The gauges of every model with runs (or loaded)."""
        try:
            figures = self.figures()
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot read the monitoring rows: %s", type(exc).__name__)
            return
        g = {
            "runs": GaugeMetricFamily(
                f"{PREFIX}_model_runs",
                "Analysed jobs of the model version in the monitoring window (7 days)",
                labels=["model", "version", "mode"],
            ),
            "positive_rate": GaugeMetricFamily(
                f"{PREFIX}_model_positive_rate",
                "Share of the window's runs positive for the label",
                labels=["model", "label", "mode"],
            ),
            "reference_positive_rate": GaugeMetricFamily(
                f"{PREFIX}_model_reference_positive_rate",
                "Share of the validation cases positive for the label (the manifest's reference)",
                labels=["model", "label", "mode"],
            ),
            "psi": GaugeMetricFamily(
                f"{PREFIX}_model_score_psi",
                "Population stability index of the label's scores against the validation reference",
                labels=["model", "label", "mode"],
            ),
            "ks": GaugeMetricFamily(
                f"{PREFIX}_model_score_ks",
                "Kolmogorov-Smirnov statistic of the label's scores against the validation reference",
                labels=["model", "label", "mode"],
            ),
            "input": GaugeMetricFamily(
                f"{PREFIX}_model_input_drift",
                "PSI of an input statistic (rows, columns, pixel_spacing_mm, p1, p50, p99, manufacturer) "
                "against the validation reference",
                labels=["model", "statistic", "mode"],
            ),
            "agreement": GaugeMetricFamily(
                f"{PREFIX}_model_shadow_agreement",
                "Share of a shadow model's runs whose positive flag agrees with the active model's",
                labels=["model", "active_model", "label"],
            ),
            "verdicts": GaugeMetricFamily(
                f"{PREFIX}_model_feedback_verdicts",
                "Radiologists' current verdicts on the model version's findings given in the window",
                labels=["model"],
            ),
            "ppv": GaugeMetricFamily(
                f"{PREFIX}_model_feedback_ppv",
                "PPV from feedback: share of the model's rated positive findings the radiologists confirmed",
                labels=["model"],
            ),
            "feedback_agreement": GaugeMetricFamily(
                f"{PREFIX}_model_feedback_agreement",
                "Agreement rate from feedback: agree / (agree + disagree) over the model's findings",
                labels=["model"],
            ),
        }
        for f in figures:
            mode = "shadow" if f.shadow else "active"
            g["runs"].add_metric([f.model_id, f.version, mode], float(f.runs))
            for lf in f.labels:
                labels = [f.model_id, lf.label, mode]
                if lf.positive_rate is not None:
                    g["positive_rate"].add_metric(labels, lf.positive_rate)
                if lf.reference_positive_rate is not None:
                    g["reference_positive_rate"].add_metric(labels, lf.reference_positive_rate)
                if lf.psi is not None:
                    g["psi"].add_metric(labels, lf.psi)
                if lf.ks is not None:
                    g["ks"].add_metric(labels, lf.ks)
            for statistic, value in sorted(f.inputs.items()):
                g["input"].add_metric([f.model_id, statistic, mode], value)
            for sf in f.shadow_vs:
                if sf.agreement is not None:
                    g["agreement"].add_metric([f.model_id, sf.active_model, sf.label], sf.agreement)
            if f.feedback is not None:  # node/monitoring/report.py feedback_figures
                g["verdicts"].add_metric([f.model_id], float(f.feedback["verdicts"]))
                if f.feedback["ppv"] is not None:
                    g["ppv"].add_metric([f.model_id], float(f.feedback["ppv"]))
                if f.feedback["agreement"] is not None:
                    g["feedback_agreement"].add_metric([f.model_id], float(f.feedback["agreement"]))
        yield from g.values()
