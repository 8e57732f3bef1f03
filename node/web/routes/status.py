"""GET /api/v1/worklist, /models, /outbox and /stats: what the node holds and how it is doing."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from node.store import repo
from node.web import views
from node.web.deps import NodeDep, Offset, SessionDep, api_router
from node.web.schemas import ModelsOut, OutboxItemOut, OutboxPage, StatsOut, WorklistOut

router = api_router()


@router.get("/worklist", response_model=WorklistOut, tags=["worklist"])
def worklist(db: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> WorklistOut:
    """The most recent studies in reading order: urgent first by suspicion, never any study
    below the position arrival order gives it."""
    return views.worklist(db, limit)


@router.get("/models", response_model=ModelsOut, tags=["models"])
def models(node: NodeDep) -> ModelsOut:
    """Loaded models with versions, labels and triage flags; refused ones with why."""
    return views.models_out(node)


@router.get("/outbox", response_model=OutboxPage, tags=["outbox"])
def outbox(
    db: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Offset = 0,
    state: Annotated[str | None, Query(pattern="^(pending|sent|failed)$")] = None,
) -> OutboxPage:
    """Outputs and their delivery, most recent first."""
    items = [
        OutboxItemOut.model_validate(i, from_attributes=True)
        for i in repo.list_outbox(db, limit, offset, state)
    ]
    return OutboxPage(counts=repo.outbox_state_counts(db), limit=limit, offset=offset, items=items)


@router.get("/stats", response_model=StatsOut, tags=["stats"])
def stats(node: NodeDep, db: SessionDep) -> StatsOut:
    """Counts: arrivals last hour/day, series/job/outbox states, priorities."""
    return views.stats(node, db)
