"""Per-request plumbing as plain ASGI (cheaper than BaseHTTPMiddleware): request id, in-flight
gauge, latency metrics and one JSON access-log line per request.

Before the app sees a request it asks two modules, cheapest checks first and before any parsing:
`dlpipe.serving.security` (is there a valid key? rate limits) and `dlpipe.serving.admission`
(may one more inference request come in, with this body?). The admitted request carries its
admission ticket in `request.state.admission`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dlpipe.monitoring import MetricsCollector
from dlpipe.monitoring.logging import request_id_var
from dlpipe.monitoring.tracing import RequestTracer, trace_id_var
from dlpipe.serving.admission import Admission, BodyTimeout, Ticket
from dlpipe.serving.errors import ServingError, error_body
from dlpipe.serving.security import Guard

access_log = logging.getLogger("dlpipe.serving.access")
log = logging.getLogger("dlpipe.serving")
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CLIENT_CLOSED = 499
"""Status recorded (never sent) when the client went away before its answer (nginx's code)."""
_WANTED = frozenset({b"x-request-id", b"content-length", b"authorization", b"x-api-key"})


def _headers(scope: Scope) -> dict[bytes, str]:
    """The few request headers read here, in one pass."""
    return {k: v.decode("latin-1") for k, v in scope["headers"] if k in _WANTED}


class RequestContextMiddleware:
    """Wraps every HTTP request; see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        collector: MetricsCollector,
        access_log: bool,
        admission: Admission,
        guard: Guard,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.app = app
        self.collector = collector
        self.access_log = access_log
        self.admission = admission
        self.guard = guard
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = _headers(scope)
        given_id = headers.get(b"x-request-id")
        request_id = (
            given_id if given_id and _VALID_REQUEST_ID.match(given_id) else uuid.uuid4().hex
        )
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["started"] = started
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        token = request_id_var.set(request_id)
        self.collector.in_flight.inc()
        ticket: Ticket | None = None
        traced = None if self.tracer is None else self._trace(scope, request_id)
        try:
            try:
                ticket = self._admit(scope, headers, state)
            except ServingError as err:
                # Refused at the door: no parsing, no app code.
                self.collector.record_error(err.error_type, err.message)
                await _send_error(send_with_id, err, scope["path"])
                return
            inner_receive = receive if ticket is None else ticket.receive(receive, started)
            await self.app(scope, inner_receive, send_with_id)
        except asyncio.CancelledError:
            if ticket is None or not ticket.timed_out:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()  # our own body deadline, not a shutdown: answer it
            timeout = BodyTimeout(
                f"request body not received within {self.admission.body_timeout_s:g} s"
            )
            self.collector.record_error(timeout.error_type, timeout.message)
            if not response_started:
                await _send_error(send_with_id, timeout, scope["path"])
        except ClientDisconnect:
            status = CLIENT_CLOSED  # not a server error: nobody is left to answer
            self.collector.record_error("client_disconnected", "client closed the connection")
        except Exception as err:  # last resort: the process never dies on a request
            log.exception("unhandled error")
            self.collector.record_error("internal", repr(err))
            if not response_started:
                await _send_error(send_with_id, None, scope["path"])
        finally:
            if ticket is not None:
                ticket.release()
            self.collector.in_flight.dec()
            self._record(scope, state, status, started)
            if traced is not None:
                traced.close(status, state)
            request_id_var.reset(token)

    def _trace(self, scope: Scope, request_id: str) -> _TracedRequest:
        assert self.tracer is not None
        span = self.tracer.start_request(scope["method"], scope["path"], scope["headers"])
        span.set_attribute("dlpipe.request_id", request_id)
        return _TracedRequest(self.tracer, span)

    def _admit(
        self, scope: Scope, headers: dict[bytes, str], state: dict[str, Any]
    ) -> Ticket | None:
        """Authenticate, then admit an inference request; ServingError when refused."""
        client = scope.get("client")
        address = client[0] if client else "unknown"
        state["caller"] = self.guard.check(
            scope["path"], headers.get(b"authorization"), headers.get(b"x-api-key"), address
        )
        if scope["method"] != "POST":
            return None
        declared = headers.get(b"content-length")
        ticket = self.admission.admit(int(declared) if declared and declared.isdigit() else None)
        state["admission"] = ticket
        return ticket

    def _record(self, scope: Scope, state: dict[str, Any], status: int, started: float) -> None:
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


async def _send_error(send: Send, err: ServingError | None, path: str) -> None:
    """The JSON error body for `err` (None: a generic 500 whose detail stays in the log)."""
    request_id = request_id_var.get() or ""
    status = 500 if err is None else err.status_code
    kind, message = (
        ("internal", "internal server error")
        if err is None
        else (
            err.error_type,
            err.message,
        )
    )
    body = json.dumps(error_body(kind, message, request_id, path)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err is not None:
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TracedRequest:
    """The server span of one request, current (for child spans and log lines) until closed."""

    __slots__ = ("_scope", "_span", "_token")

    def __init__(self, tracer: RequestTracer, span: Any) -> None:
        self._span = span
        self._scope = tracer.use(span)
        self._scope.__enter__()
        self._token = trace_id_var.set(tracer.trace_id(span))

    def close(self, status: int, state: dict[str, Any]) -> None:
        self._span.set_attribute("http.response.status_code", status)
        if state.get("model_version"):
            self._span.set_attribute("model.version", str(state["model_version"]))
        trace_id_var.reset(self._token)
        self._scope.__exit__(None, None, None)
        self._span.end()
