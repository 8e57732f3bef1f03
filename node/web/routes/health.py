"""GET /healthz (the process is alive) and /readyz (it can take work), always open."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from node.web.deps import NodeDep
from node.web.health import database_writable
from node.web.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(node: NodeDep) -> JSONResponse:
    """The database answers and takes a write, the DICOM port is listening and the spool has room."""
    checks = node.ready()
    checks["database_writable"] = database_writable(node.engine)
    ok = all(checks.values())
    body = Health(status="ready" if ok else "not ready", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
