"""`POST /feedback`: ground-truth labels for served predictions (online accuracy).

    curl -H 'content-type: application/json' localhost:8000/feedback \\
         -d '{"request_id": "3f2a...", "label": "Sneaker"}'
    curl ... -d '[{"request_id": "3f2a.../0", "label": 7}, {"request_id": "3f2a.../1", "label": 0}]'

A request with one input is named by its request id (the `request_id` of the answer, or the
`X-Request-ID` sent); the inputs of a batch by `<request id>/<position>`. Labels are class names
or class indices. Each label is joined to the logged prediction and counted once, in the
accuracy window of the version that made the prediction.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Request
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from dlpipe.serving.deps import AUTH_PARAMETERS, error_responses
from dlpipe.serving.errors import ModelUnavailable

router = APIRouter(tags=["feedback"], responses=error_responses(400, 401, 408, 413, 429, 503))
MAX_ITEMS = 1000


def _number_only(value: object) -> object:
    """An index is a JSON number (7 or 7.0, as JSON Schema's integer): never a string, which
    lax parsing would turn into one (a too-long "000..." label would pass as class 0)."""
    if isinstance(value, str | bool):
        raise ValueError("a class index is a number")
    return value


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200)
    """The prediction's id: a request id, or `<request id>/<position>` within a batch."""
    label: (
        Annotated[str, Field(strict=True, min_length=1, max_length=1000)]
        | Annotated[int, Field(ge=0), BeforeValidator(_number_only)]
    )
    """The true class: its name, or its index."""


class FeedbackOutcome(BaseModel):
    request_id: str
    outcome: Literal["correct", "incorrect", "unknown", "duplicate", "invalid_label"]
    """`unknown`: no recorded prediction has this id (never made, not sampled, or forgotten);
    `duplicate`: it was labeled before (the first label counts); `invalid_label`: not one of
    the version's classes."""
    model_version: str | None = None
    """The version that made the prediction (when known)."""
    predicted: str | None = None
    """Its top-1 class."""


class FeedbackReply(BaseModel):
    joined: int
    """Labels counted (correct + incorrect)."""
    results: list[FeedbackOutcome]
    """One per item, in order."""


FeedbackBody = Annotated[
    FeedbackItem | Annotated[list[FeedbackItem], Field(min_length=1, max_length=MAX_ITEMS)],
    Body(description=f"one label, or a list of up to {MAX_ITEMS}"),
]


@router.post("/feedback", openapi_extra={"parameters": AUTH_PARAMETERS})
async def feedback(request: Request, body: FeedbackBody) -> FeedbackReply:
    """Join ground-truth labels to logged predictions (online accuracy per version)."""
    monitor = getattr(request.app.state, "quality", None)
    if monitor is None:
        raise ModelUnavailable("the server is still starting", retry_after_s=1.0)
    items = body if isinstance(body, list) else [body]
    pairs = [(item.request_id, item.label) for item in items]
    # Off the event loop: the join may wait for the log's writer and read other workers' files.
    results = await asyncio.to_thread(monitor.feedback, pairs)
    outcomes = [FeedbackOutcome(**vars(r)) for r in results]
    joined = sum(o.outcome in ("correct", "incorrect") for o in outcomes)
    return FeedbackReply(joined=joined, results=outcomes)
