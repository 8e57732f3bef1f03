"""GET /metrics: the node's Prometheus metrics (its own registry, see node/prometheus.py).

Open when ``web.metrics_open`` (the default), otherwise any valid bearer token (node/web/auth.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from node.web.auth import metrics_guard

router = APIRouter()


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_guard)])
def metrics(request: Request) -> Response:
    """The node's metrics in the Prometheus text format."""
    registry = request.app.state.node.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
