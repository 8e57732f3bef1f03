"""The web application: the JSON API under /api/v1 (``node.web.routes``), the HTML pages
(``node.web.pages``, ``analyse``, ``monitoring``, ``feedback``), DICOMweb (``dicomweb``), the health
probes and /metrics, behind the guard (``node.web.guard``: Host and Origin checks, body limits,
security headers).

Authentication: see ``node.web.auth`` (bearer tokens by hash, read and admin roles; pages accept
the sign-in cookie set by /login; every form carries a CSRF token). /healthz and /readyz are always
open. The web reads the store; the retry buttons only update rows (the runner's requeue functions
put failed work back in the queue, and the runner's threads pick it up).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from node.web import analyse, auth, dicomweb, metrics, monitoring, pages
from node.web.deps import FORM_BODY_LIMIT, INFER_PATH, STATIC, upload_body_limit
from node.web.feedback import router as feedback_router
from node.web.guard import WebGuard
from node.web.infer import InferRefused, PngStore
from node.web.routes import health, jobs, status, studies
from node.web.routes import infer as infer_routes

if TYPE_CHECKING:
    from node.web.deps import WebNode


def create_web_app(node: WebNode) -> FastAPI:
    """Build the FastAPI application for a node: API docs (Swagger UI at /api/docs, ReDoc at
    /api/redoc) from a local package, never a CDN; bodies limited while they are read."""
    upload_limit = upload_body_limit(node)
    stow_limit = dicomweb.stow_body_limit(node)

    def body_limit(path: str) -> int:
        if path == INFER_PATH:
            return upload_limit
        if path == analyse.UPLOAD_PATH:
            return analyse.upload_body_limit(node)
        return stow_limit if dicomweb.is_stow_path(path) else FORM_BODY_LIMIT

    app = FastAPIOffline(
        title="pacs-node",
        version=node.version,
        docs_url="/api/docs",
        redoc_url="/api/redoc",
        static_url="/api/docs-static",
        openapi_url="/api/openapi.json",
    )
    app.state.node = node
    app.state.heatmaps = PngStore(ttl_s=node.settings.web.heatmap_ttl_s)
    app.add_middleware(
        WebGuard,
        web=node.settings.web,
        body_limit=body_limit,
        docs_paths=["/api/docs", "/api/redoc"],
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(auth.LoginRequired)
    async def _to_login(request: Request, exc: auth.LoginRequired) -> RedirectResponse:
        return RedirectResponse(f"/login?next={quote(exc.next_url)}", status_code=303)

    @app.exception_handler(OverflowError)
    async def _out_of_range(request: Request, exc: OverflowError) -> JSONResponse:
        # a number the database cannot hold that no parameter's bounds caught: the client's fault
        return JSONResponse({"detail": "a number in the request is out of range"}, status_code=422)

    @app.exception_handler(InferRefused)
    async def _refused(request: Request, exc: InferRefused) -> JSONResponse:
        # an upload the pipeline will not take (not DICOM, unsupported, no route...): its status
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    app.include_router(health.router)
    for resource in (studies, jobs, status):
        app.include_router(resource.router)
    app.include_router(infer_routes.router(node))
    app.include_router(pages.router)
    app.include_router(dicomweb.router(node))
    app.include_router(feedback_router(node))
    app.include_router(analyse.router(node))
    app.include_router(monitoring.router(node))
    app.include_router(metrics.router)
    return app
