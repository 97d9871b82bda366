"""`Annotated` dependency aliases shared by the routers, and the plain functions behind them.

The prediction routes call the plain functions directly: each FastAPI dependency costs a
`solve_dependencies` pass per request, which is measurable next to a 1 ms request path.
Headers are read from the request rather than declared as FastAPI `Header` parameters for the
same reason (pydantic validation per declared parameter); they are documented in OpenAPI below.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from dlpipe.serving.errors import ModelUnavailable
from dlpipe.serving.manager import ModelManager
from dlpipe.serving.settings import ServeSettings


def manager_of(request: Request) -> ModelManager:
    manager: ModelManager | None = getattr(request.app.state, "manager", None)
    if manager is None:
        raise ModelUnavailable("the server is still starting")
    return manager


def routing_of(request: Request) -> tuple[str | None, str | None]:
    """(pinned version, sticky key) from `X-Model-Version` / `?version=` and `X-Request-Key`."""
    headers = request.headers
    version = headers.get("x-model-version") or request.query_params.get("version")
    return version, headers.get("x-request-key")


# Dependencies are `async def`: a plain `def` dependency would cost two thread hops.
async def current_settings(request: Request) -> ServeSettings:
    """The settings the app was built with (`get_settings()` when none were passed)."""
    settings: ServeSettings = request.app.state.settings
    return settings


async def get_manager(request: Request) -> ModelManager:
    return manager_of(request)


async def get_request_id(request: Request) -> str:
    return str(request.state.request_id)


async def get_routing(request: Request) -> tuple[str | None, str | None]:
    return routing_of(request)


SettingsDep = Annotated[ServeSettings, Depends(current_settings)]
ManagerDep = Annotated[ModelManager, Depends(get_manager)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
RoutingDep = Annotated[tuple[str | None, str | None], Depends(get_routing)]


def _header(name: str, description: str, where: str = "header") -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


ROUTING_PARAMETERS = [
    _header("X-Model-Version", "serve exactly this version (404 when it is not served)"),
    _header("version", "same as X-Model-Version", where="query"),
    _header("X-Request-Key", "sticky A/B assignment: one key always reaches one version"),
    _header("X-Request-ID", "your request id, echoed back (generated otherwise)"),
]
AUTH_PARAMETERS = [
    _header("X-API-Key", "API key (or `Authorization: Bearer <key>`) when keys are configured"),
]
