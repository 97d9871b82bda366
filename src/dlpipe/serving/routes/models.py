"""Served versions and the routing between them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from dlpipe.serving.deps import ManagerDep, error_responses

router = APIRouter(tags=["models"], responses=error_responses(401, 503))


@router.get("/models")
async def models(manager: ManagerDep) -> dict[str, Any]:
    """Served versions, the routing plan (champion / A/B) with its generation and digest, this
    server's heartbeat to the registry, and the last load error."""
    return manager.describe()
