"""POST /api/v1/infer (one uploaded DICOM file through the pipeline's analysis path) and the
heatmap PNGs it made. Refusals (``InferRefused``) become their HTTP status in the app's handler."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from node.web.deps import HeatmapsDep, api_router, upload_body_limit
from node.web.infer import infer
from node.web.schemas import ErrorOut, FindingOut, HeatmapLink, InferModelOut, InferOut

if TYPE_CHECKING:
    from node.web.deps import WebNode


def router(node: WebNode) -> APIRouter:
    """The inference routes; the upload's body limit comes from the node's web.max_upload_mb."""
    r = api_router()

    @r.post(
        "/infer",
        response_model=InferOut,
        tags=["inference"],
        max_body_size=upload_body_limit(node),  # counted while reading: chunked bodies too
        responses={
            400: {"model": ErrorOut, "description": "not a DICOM file, or no file"},
            403: {"model": ErrorOut, "description": "the token's role is not enough, or another site's page"},
            413: {"model": ErrorOut, "description": "the file is larger than web.max_upload_mb"},
            415: {"model": ErrorOut, "description": "unsupported transfer syntax"},
            422: {"model": ErrorOut, "description": "no pixel data, or no route for the image"},
            504: {"model": ErrorOut, "description": "over web.infer_timeout_s"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    }
                },
            }
        },
    )
    async def infer_upload(request: Request, heatmaps: HeatmapsDep) -> InferOut:
        """Run the pipeline's routing, preprocessing and model on one DICOM file (multipart field
        ``file``); findings with probabilities and links to heatmap PNGs (kept for a while)."""
        web = node.settings.web
        limit = int(web.max_upload_mb * 2**20)
        # A body over the limit never gets here whole: the guard refuses a declared Content-Length
        # above it, and FastAPI's max_body_size stops reading (413) once more arrived.
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "send the DICOM file as the multipart form field 'file'")
        data = await upload.read(limit + 1)
        await form.close()
        if len(data) > limit:
            raise HTTPException(413, f"the file is larger than the limit of {limit} bytes")
        deadline = time.monotonic() + web.infer_timeout_s
        loop = asyncio.get_running_loop()
        try:
            rule, outcomes = await asyncio.wait_for(
                loop.run_in_executor(None, infer, node, data, heatmaps, deadline), timeout=web.infer_timeout_s
            )
        except TimeoutError as exc:
            raise HTTPException(504, f"inference did not finish within {web.infer_timeout_s:g} s") from exc
        results = [
            InferModelOut(
                model_id=o.result.algorithm.model_id,
                model_version=o.result.algorithm.version,
                findings=[
                    FindingOut(
                        label=f.label,
                        probability=round(f.probability, 4),
                        positive=f.positive,
                        triage=f.triage,
                        normal=f.normal,
                    )
                    for f in o.result.findings
                ],
                heatmaps=[
                    HeatmapLink(label=label, url=f"/api/v1/heatmaps/{key}.png") for label, key in o.heatmaps
                ],
            )
            for o in outcomes
        ]
        return InferOut(rule=rule, results=results)

    @r.get("/heatmaps/{key}.png", tags=["inference"], response_class=Response)
    def heatmap(key: str, heatmaps: HeatmapsDep) -> Response:
        """A heatmap PNG made by POST /api/v1/infer (gone after web.heatmap_ttl_s)."""
        png = heatmaps.get(key)
        if png is None:
            raise HTTPException(404, "no such heatmap (they are kept for a short while only)")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    return r
