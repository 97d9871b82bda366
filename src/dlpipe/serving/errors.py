"""Errors the server answers with, and the JSON shape they take.

{"error": {"type": "invalid_input", "message": "...", "request_id": "..."}}
{"error": "..."}                      on the Open Inference Protocol routes (/v2/...), as its
                                      clients (tritonclient, KServe) expect
Messages say what was wrong with the request; internal detail goes to the log, never here.
"""

from __future__ import annotations

import math
from typing import Any


class ServingError(Exception):
    """An error with an HTTP status; `error_type` is the metrics label and the body's `type`."""

    status_code = 500
    error_type = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class InvalidRequest(ServingError):
    """The request itself is malformed (bad JSON, wrong field, unreadable image)."""

    status_code = 400
    error_type = "invalid_input"


class Unauthorized(ServingError):
    status_code = 401
    error_type = "unauthorized"


class NotFound(ServingError):
    status_code = 404
    error_type = "not_found"


class VersionNotServed(NotFound):
    error_type = "version_not_found"


class PayloadTooLarge(ServingError):
    status_code = 413
    error_type = "payload_too_large"


class UnsupportedMediaType(ServingError):
    status_code = 415
    error_type = "unsupported_media_type"


class RateLimited(ServingError):
    status_code = 429
    error_type = "rate_limited"


class InferenceFailed(ServingError):
    status_code = 500
    error_type = "inference_failed"


class ModelUnavailable(ServingError):
    """No model is loaded (or the one asked for failed to load)."""

    status_code = 503
    error_type = "model_unavailable"


class Overloaded(ServingError):
    """Load shedding: the queue is full or the request could not meet its deadline."""

    status_code = 503
    error_type = "overloaded"


class ResourceExhausted(ServingError):
    """The device ran out of memory for this one input, even alone (its batch was split first)."""

    status_code = 503
    error_type = "resource_exhausted"


class DeadlineExceeded(ServingError):
    status_code = 504
    error_type = "timeout"


class BatcherClosed(RuntimeError):
    """Raised by a batcher that is draining; the caller re-routes to the current version."""


def error_body(error_type: str, message: str, request_id: str, path: str = "") -> dict[str, Any]:
    """The error body of a route: dlpipe's shape, or the protocol's on /v2 routes."""
    if path == "/v2" or path.startswith("/v2/"):
        return {"error": message}
    return {"error": {"type": error_type, "message": message, "request_id": request_id}}
