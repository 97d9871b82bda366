"""Prometheus text exposition of the server's own registry."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

router = APIRouter(tags=["metrics"])


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text format 0.0.4)."""
    manager = getattr(request.app.state, "manager", None)
    if manager is not None:
        manager.update_gauges()
    body, content_type = request.app.state.collector.render()
    return Response(body, media_type=content_type)
