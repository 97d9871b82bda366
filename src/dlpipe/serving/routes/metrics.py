"""Prometheus text exposition of the server's own registry."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from dlpipe.serving.deps import error_responses

router = APIRouter(tags=["metrics"])
_TEXT = "text/plain; version=0.0.4"


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition, or the JSON snapshot with ?format=json",
            "content": {
                _TEXT: {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "object"}},
            },
        },
        **error_responses(400, 401),
    },
)
async def metrics(
    request: Request,
    format: Literal["prometheus", "json"] = Query("prometheus"),
) -> Response:
    """Prometheus text exposition; `?format=json` gives the design's JSON snapshot instead
    (counts, p50/p95/p99 over a recent window, errors by type, throughput in requests/s)."""
    manager = getattr(request.app.state, "manager", None)
    if manager is not None:
        manager.update_gauges()
    collector = request.app.state.collector
    if format == "json":
        return JSONResponse(collector.get_metrics())
    body, content_type = collector.render()
    return Response(body, media_type=content_type)
