"""Liveness and readiness (also the KServe v2 forms)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


def _readiness(request: Request) -> JSONResponse:
    manager = getattr(request.app.state, "manager", None)
    body: dict[str, Any] = {"ready": False}
    if manager is not None:
        state = manager.state
        body = {
            "ready": state is not None,
            "model_name": manager.model_name,
            "versions": sorted(state.models) if state else [],
        }
        if state is None:
            body["reason"] = manager.last_error or "models are loading"
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once a model version is loaded and warmed up, 503 before."""
    return _readiness(request)


@router.get("/v2/health/live")
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def v2_ready(request: Request) -> JSONResponse:
    return _readiness(request)
