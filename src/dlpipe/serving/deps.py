"""`Annotated` dependency aliases shared by the routers, and the plain functions behind them.

The prediction routes call the plain functions directly: each FastAPI dependency costs a
`solve_dependencies` pass per request, which is measurable next to a 1 ms request path.
Headers are read from the request rather than declared as FastAPI `Header` parameters for the
same reason (pydantic validation per declared parameter); they are documented in OpenAPI below.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel

from dlpipe.serving.errors import InvalidRequest, ModelUnavailable
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
    header = headers.get("x-model-version")
    query = request.query_params.get("version")
    if header == "" or query == "":
        raise InvalidRequest("X-Model-Version / ?version must name a version when given")
    if header is not None and query is not None and header != query:
        raise InvalidRequest(f"X-Model-Version {header!r} and ?version={query!r} disagree")
    return header or query, headers.get("x-request-key") or None


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


class ErrorDetail(BaseModel):
    type: str
    """Machine-readable kind (also the `error_type` label of `dlpipe_errors_total`)."""
    message: str
    """What was wrong with the request."""
    request_id: str


class ErrorBody(BaseModel):
    """The error shape of every route outside /v2."""

    error: ErrorDetail


class ProtocolErrorBody(BaseModel):
    """The Open Inference Protocol's error shape (the /v2 routes)."""

    error: str


_WHY = {
    400: "malformed request: the message says what was wrong",
    401: "API key missing or wrong (when keys are configured)",
    404: "unknown model or version",
    408: "the request body did not arrive in time",
    413: "body, image or text beyond the configured limits",
    415: "unsupported content type",
    422: "the model's output is not finite for these inputs",
    429: "rate limit or failed-key limit reached (see Retry-After)",
    503: "no version loaded yet, or the server sheds load (see Retry-After)",
    504: "no answer within the request deadline",
}
INFERENCE_ERRORS = (400, 401, 404, 408, 413, 415, 429, 503, 504)
READ_ERRORS = (401, 404, 503)


def error_responses(*codes: int, protocol: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses, with the error body's schema."""
    model = ProtocolErrorBody if protocol else ErrorBody
    return {code: {"model": model, "description": _WHY[code]} for code in codes}
