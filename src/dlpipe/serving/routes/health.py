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
    """200 while a version serves and the server is not draining, else 503.

    With API keys configured, a caller without a valid key gets a bare `{"ready": bool}`;
    operators (and everyone when auth is off) also get the versions and short reasons. Details
    with paths or hosts stay in the log.
    """
    app = request.app
    manager = getattr(app.state, "manager", None)
    worker = app.state.worker  # one of several server processes: all of them must serve
    draining = bool(getattr(app.state, "draining", False)) or (
        worker is not None and worker.draining()
    )
    ready = manager is not None and manager.ready and not draining
    ready = ready and (worker is None or worker.server_ready())
    body: dict[str, Any] = {"ready": ready}
    headers = request.headers
    if manager is not None and app.state.guard.is_authenticated(
        headers.get("authorization"), headers.get("x-api-key")
    ):
        state = manager.state
        body["model_name"] = manager.model_name
        body["versions"] = sorted(state.models) if state else []
        unavailable = manager.unavailable()
        if unavailable:
            body["unavailable"] = unavailable
        if manager.registry_error is not None:
            body["registry"] = manager.registry_error
        if draining:
            body["reason"] = "shutting down"
        elif not ready:
            body["reason"] = manager.not_ready_reason()
    return JSONResponse(body, status_code=200 if ready else 503)


READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a version serves",
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
    503: {
        "description": "not ready (loading, failing, or shutting down)",
        "content": {"application/json": {"schema": {"type": "object"}}},
    },
}


@router.get("/ready", response_class=JSONResponse, responses=READY_RESPONSES)
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once a model version is loaded and warmed up, 503 before."""
    return _readiness(request)


@router.get("/v2/health/live")
async def v2_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", response_class=JSONResponse, responses=READY_RESPONSES)
async def v2_ready(request: Request) -> JSONResponse:
    return _readiness(request)
