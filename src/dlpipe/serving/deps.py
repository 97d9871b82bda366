"""`Annotated` dependency aliases shared by the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from dlpipe.serving.errors import ModelUnavailable
from dlpipe.serving.manager import ModelManager
from dlpipe.serving.settings import ServeSettings, get_settings

SettingsDep = Annotated[ServeSettings, Depends(get_settings)]


def get_manager(request: Request) -> ModelManager:
    manager: ModelManager | None = getattr(request.app.state, "manager", None)
    if manager is None:
        raise ModelUnavailable("the server is still starting")
    return manager


def get_request_id(request: Request) -> str:
    return str(request.state.request_id)


def authenticate(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> str | None:
    """The caller's key id (None when auth is off); enforces the rate limit per key or client."""
    state = request.app.state
    caller = state.auth.identify(authorization, x_api_key)
    if state.rate_limit.item is not None:
        client = request.client.host if request.client else "unknown"
        state.rate_limit.check(caller or f"ip:{client}")
    return caller


ManagerDep = Annotated[ModelManager, Depends(get_manager)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
CallerDep = Annotated[str | None, Depends(authenticate)]
VersionHeader = Annotated[str | None, Header(alias="X-Model-Version")]
RequestKeyHeader = Annotated[str | None, Header(alias="X-Request-Key")]
