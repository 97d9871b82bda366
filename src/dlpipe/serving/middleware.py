"""Per-request plumbing as plain ASGI (cheaper than BaseHTTPMiddleware): request id, body-size
limit while reading, in-flight gauge, latency metrics and one JSON access-log line per request.

Whether a request may come in at all is `dlpipe.serving.admission`'s decision; this module only
asks it, before any parsing, and hands the admitted request its ticket.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dlpipe.monitoring import MetricsCollector
from dlpipe.monitoring.logging import request_id_var
from dlpipe.serving.admission import Admission
from dlpipe.serving.errors import PayloadTooLarge, error_body

access_log = logging.getLogger("dlpipe.serving.access")
log = logging.getLogger("dlpipe.serving")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class RequestContextMiddleware:
    """Wraps every HTTP request; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        collector: MetricsCollector,
        max_body_bytes: int,
        access_log: bool,
        admission: Admission,
    ) -> None:
        self.app = app
        self.collector = collector
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client_id = _header(scope, b"x-request-id")
        request_id = (
            client_id if client_id and _VALID_REQUEST_ID.match(client_id) else uuid.uuid4().hex
        )
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        status = 500
        response_started = False
        received = 0
        limit = self.max_body_bytes

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds the {limit} byte limit")
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        token = request_id_var.set(request_id)
        self.collector.in_flight.inc()
        ticket = None
        try:
            declared = _header(scope, b"content-length")
            inference = scope["method"] == "POST"
            busy = self.admission.shed_reason() if inference else None
            if busy is not None:
                # When the CPU is the bottleneck, requests queue in the event loop, not in
                # the batcher: shed them here, before any parsing is spent on them.
                message = f"server busy: {busy}; retry later"
                self.collector.record_error("overloaded", message)
                await self._send_error(send_with_id, 503, "overloaded", message, retry_after=True)
            elif declared is not None and declared.isdigit() and int(declared) > limit:
                err = PayloadTooLarge(
                    f"request body of {declared} bytes exceeds the {limit} byte limit"
                )
                self.collector.record_error(err.error_type, err.message)
                await self._send_error(send_with_id, err.status_code, err.error_type, err.message)
            else:
                if inference:
                    ticket = state["admission"] = self.admission.admit()
                await self.app(scope, receive_limited, send_with_id)
        except Exception as err:  # last resort: the process never dies on a request
            log.exception("unhandled error")
            self.collector.record_error("internal", repr(err))
            if not response_started:
                await self._send_error(send_with_id, 500, "internal", "internal server error")
        finally:
            if ticket is not None:
                ticket.release()
            self.collector.in_flight.dec()
            latency_ms = (time.perf_counter() - started) * 1000.0
            route = scope.get("route")
            endpoint = getattr(route, "path_format", None) or "unmatched"
            version = str(state.get("model_version", ""))
            self.collector.record_latency(latency_ms, endpoint, version, str(status))
            if self.access_log:
                access_log.info(
                    "request",
                    extra={
                        "event": "request",
                        "method": scope["method"],
                        "path": scope["path"],
                        "endpoint": endpoint,
                        "status": status,
                        "latency_ms": round(latency_ms, 3),
                        "model_version": version,
                    },
                )
            request_id_var.reset(token)

    @staticmethod
    async def _send_error(
        send: Send, status: int, error_type: str, message: str, retry_after: bool = False
    ) -> None:
        request_id = request_id_var.get() or ""
        body = json.dumps(error_body(error_type, message, request_id)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if retry_after:
            headers.append((b"retry-after", b"1"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
