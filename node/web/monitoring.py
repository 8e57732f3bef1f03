"""Live model monitoring on the web: the /monitoring page (plots rendered on the server as inline
SVG), GET /api/v1/monitoring (the same figures as JSON) and the drift gauges on /metrics
(registered on the node's registry when the router is built)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from sqlmodel import Session

from node.monitoring.gauges import MonitoringCollector
from node.monitoring.report import MIN_RUNS, WINDOW_DAYS, ModelFigures, model_figures
from node.store.tables import utcnow
from node.web import auth
from node.web.deps import render

if TYPE_CHECKING:
    from node.inference.manifest import Manifest
    from node.web.deps import WebNode

Days = Annotated[int, Query(ge=1, le=366, description="days of runs the figures cover")]


def _manifests(node: WebNode) -> dict[str, Manifest]:
    return {model_id: m.manifest for model_id, m in node.models.registry.models.items()}


def _figures(node: WebNode, days: int) -> list[ModelFigures]:
    with Session(node.engine) as session:
        return model_figures(session, _manifests(node), utcnow(), days)


def _plots(figures: list[ModelFigures]) -> dict[str, Any]:
    """Inline SVGs per model: daily runs, each label's score CDF, each shadow comparison's scatter."""
    from node.monitoring import plots  # matplotlib only when the page is asked for

    out: dict[str, Any] = {}
    for f in figures:
        out[f.model_id] = {
            "daily": plots.daily_svg(f.daily, f"{f.model_id}: runs per day") if f.daily else "",
            "labels": {
                lf.label: plots.scores_svg(lf.scores, lf.reference_quantiles, f"{lf.label}: scores")
                for lf in f.labels
            },
            "shadow": [
                plots.scatter_svg(sf.shadow_scores, sf.active_scores, f"{sf.label} vs {sf.active_model}")
                for sf in f.shadow_vs
            ],
        }
    return out


def _watch(node: WebNode) -> None:
    """Register the monitoring gauges on the node's /metrics registry (once per node)."""
    if getattr(node.metrics, "_monitoring_collector", None) is None:
        collector = MonitoringCollector(node.engine, lambda: _manifests(node))
        node.metrics.registry.register(collector)
        node.metrics._monitoring_collector = collector  # type: ignore[attr-defined]


def router(node: WebNode) -> APIRouter:
    """The monitoring page and API of ``node``; registers its gauges on /metrics."""
    _watch(node)
    r = APIRouter()

    @r.get("/api/v1/monitoring", tags=["monitoring"], dependencies=[Depends(auth.require_read)])
    def monitoring_api(days: Days = WINDOW_DAYS, samples: bool = False) -> dict[str, Any]:
        """Per model: runs per day, positive rate, score drift (PSI, KS) and input drift against
        the manifest's validation reference, a shadow model's agreement with the active model,
        feedback PPV and agreement. ``samples``: with the scores behind the plots."""
        figures = _figures(node, days)
        return {
            "window_days": days,
            "generated_at": utcnow().isoformat(),
            "models": [f.as_dict(samples) for f in figures],
        }

    @r.get(
        "/monitoring",
        response_class=HTMLResponse,
        include_in_schema=False,
        dependencies=[Depends(auth.page_read)],
    )
    def monitoring_page(request: Request, days: Days = WINDOW_DAYS) -> HTMLResponse:
        """The monitoring page."""
        figures = _figures(node, days)
        return render(
            request, "monitoring.html", figures=figures, plots=_plots(figures), days=days, min_runs=MIN_RUNS
        )

    return r
