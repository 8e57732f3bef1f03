"""What the web's routes share: the node and a database session as FastAPI dependencies, the
parameter types and limits, and the one page renderer.

The node a route sees is the running :class:`node.app.Node` (``app.state.node``, set by the app
factory); templates see only :class:`Site` (who the node is, its upload limits), never the node.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlmodel import Session

from node.web import auth
from node.web.infer import PngStore
from node.web.schemas import ErrorOut

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from node.audit import AuditTrail
    from node.dicom.scp import StorageSCP
    from node.dicom.spool import Spool
    from node.prometheus import NodeMetrics
    from node.runner import Models
    from node.runner.one_file import Outcome, Progress
    from node.settings import Settings


class WebNode(Protocol):
    """What the web needs of the running node (:class:`node.app.Node` is one): its settings, the
    database, the spool and DICOM listener (STOW-RS files through them), the models, the metrics and
    audit trail, its readiness and the one-file analysis. Nothing else of the node reaches a route."""

    settings: Settings
    engine: Engine
    spool: Spool
    scp: StorageSCP
    models: Models
    metrics: NodeMetrics
    audit: AuditTrail
    started_at: float
    version: str

    def ready(self) -> dict[str, bool]:
        """Readiness of each dependency."""
        ...

    def gpu_description(self) -> str:
        """The GPU's name and memory; empty without one."""
        ...

    def analyse_upload(
        self, data: bytes, deadline: float, progress: Progress | None = None
    ) -> tuple[str, list[Outcome]]:
        """One uploaded file through routing, the models and heatmap rendering."""
        ...


TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
STATIC = Path(__file__).parent / "static"
#: The largest row id and offset the database takes (SQLite and PostgreSQL integers are 64-bit).
MAX_INT = 2**63 - 1
#: the id columns are SQL INTEGER: 32 bits on PostgreSQL (a larger id is a 422, not a database error)
MAX_ID = 2**31 - 1
JobId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="a job's id")]
Offset = Annotated[int, Query(ge=0, le=MAX_INT)]
#: Largest body of a request other than the uploads (the forms: sign-in, retry). Set on the routers,
#: not the app: an app-wide limit would replace the guard's own 413 answers with a plain-text one.
FORM_BODY_LIMIT = 64 * 1024
#: What multipart adds around an uploaded file (boundaries, part headers).
MULTIPART_SLACK = 64 * 1024
INFER_PATH = "/api/v1/infer"
#: The answers every API route may give besides its own.
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no token, or a token that is not valid"},
    403: {"model": ErrorOut, "description": "the token's role is not enough"},
}


def api_router() -> APIRouter:
    """A router of the JSON API: under /api/v1, read role at least, form-sized bodies."""
    return APIRouter(
        prefix="/api/v1",
        dependencies=[Depends(auth.require_read)],
        responses=ERRORS,
        max_body_size=FORM_BODY_LIMIT,
    )


def get_node(request: Request) -> WebNode:
    """The running node the app was made for."""
    node: WebNode = request.app.state.node  # set by the factory
    return node


def _session(request: Request) -> Iterator[Session]:
    with Session(get_node(request).engine) as session:
        yield session


def heatmap_store(request: Request) -> PngStore:
    """The heatmap PNGs POST /api/v1/infer made (kept for web.heatmap_ttl_s)."""
    store: PngStore = request.app.state.heatmaps  # set by the factory
    return store


if TYPE_CHECKING:
    NodeDep = Annotated[WebNode, Depends(get_node)]
else:  # FastAPI reads the annotation at run time, where the node's class is not imported
    NodeDep = Annotated[Any, Depends(get_node)]
SessionDep = Annotated[Session, Depends(_session)]
HeatmapsDep = Annotated[PngStore, Depends(heatmap_store)]


def upload_body_limit(node: WebNode) -> int:
    """The most bytes POST /api/v1/infer reads: web.max_upload_mb plus the multipart framing."""
    return int(node.settings.web.max_upload_mb * 2**20) + MULTIPART_SLACK


@dataclass(frozen=True)
class Site:
    """What the pages show of the node: who it is and its upload limits."""

    ae_title: str
    version: str
    max_upload_mb: float
    heatmap_ttl_s: float

    @classmethod
    def of(cls, node: WebNode) -> Site:
        """The node's identity and limits as its settings give them."""
        web = node.settings.web
        return cls(node.settings.dicom.ae_title, node.version, web.max_upload_mb, web.heatmap_ttl_s)


def human_bytes(size: float) -> str:
    """A byte count in kB/MB/GB (decimal units), for the pages."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    """A page from ``templates/``: ``context`` plus who is signed in, their role, the CSRF token
    (remembered in its cookie) and the node's :class:`Site`."""
    node = get_node(request)
    principal = getattr(request.state, "principal", None)
    context.update(
        site=Site.of(node),
        principal=principal,
        auth_enabled=bool(node.settings.web.tokens),
        is_admin=principal is not None and principal.can("admin"),
        human_bytes=human_bytes,
        csrf_token=auth.csrf_token(request),
    )
    response = TEMPLATES.TemplateResponse(request, name, context, status_code=status_code)
    auth.remember_csrf(request, response)
    return response
