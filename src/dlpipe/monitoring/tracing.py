"""Distributed tracing with OpenTelemetry (the `dlpipe[otel]` extra): one trace per request.

    DLPIPE_TRACING=true OTEL_EXPORTER_OTLP_ENDPOINT=http://collector:4318 dlpipe serve ...

Spans: `POST /predict` (the request, a child of the client's W3C `traceparent` when it sends
one), and under it `decode` (payload to model input), `queue` (waiting in the micro-batcher),
`inference` (the batch that answered it; `batch.size` says how many requests shared it) and
`respond`. Export follows the standard `OTEL_*` variables (`OTEL_TRACES_EXPORTER`: otlp,
console or none; `OTEL_SERVICE_NAME`; `OTEL_EXPORTER_OTLP_*`). The JSON log lines written while
a request is traced carry its `trace_id`.

Off by default, and then free: nothing here is imported, and the request path tests one
attribute. OpenTelemetry is imported only when tracing is turned on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

trace_id_var: ContextVar[str | None] = ContextVar("dlpipe_trace_id", default=None)
"""Hex trace id of the request being handled (None when not traced); read by the JSON logs."""


@dataclass(slots=True)
class BatchTiming:
    """When the batch that answered one request ran (`time.time_ns`), filled by the batcher."""

    queued_ns: int = 0
    started_ns: int = 0
    ended_ns: int = 0
    batch_size: int = 0


class RequestTracer:
    """Starts the spans of one server; built by `request_tracer` when tracing is on."""

    def __init__(self, provider: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        self.tracer = (provider or trace.get_tracer_provider()).get_tracer("dlpipe.serving")

    def start_request(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> Any:
        """The server span of a request, continuing the client's `traceparent` if any."""
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in headers
            if k in (b"traceparent", b"tracestate")
        }
        parent = self._propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            f"{method} {path}",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        return span

    def use(self, span: Any) -> Any:
        """A context manager making `span` current (child spans and logs see it)."""
        return self._trace.use_span(span, end_on_exit=False)

    def child(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        """A finished child span of the current span, with explicit times."""
        span = self.tracer.start_span(name, start_time=start_ns, attributes=attributes)
        span.end(end_time=end_ns)

    def batch_spans(self, timing: BatchTiming, version: str) -> None:
        """`queue` and `inference` spans of one request from its batch's timing."""
        if timing.started_ns:
            self.child("queue", timing.queued_ns, timing.started_ns, **{"model.version": version})
        if timing.ended_ns:
            self.child(
                "inference",
                timing.started_ns,
                timing.ended_ns,
                **{"model.version": version, "batch.size": timing.batch_size},
            )

    @staticmethod
    def trace_id(span: Any) -> str:
        return format(span.get_span_context().trace_id, "032x")


def request_tracer(enabled: bool, provider: Any = None) -> RequestTracer | None:
    """The server's tracer, or None when tracing is off (then nothing is imported).

    Args:
        enabled: `ServeSettings.tracing`.
        provider: an OpenTelemetry `TracerProvider` (tests pass one with an in-memory
            exporter); None: one built from the standard `OTEL_*` environment variables.
    """
    if not enabled:
        return None
    try:
        import opentelemetry.sdk  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "tracing is on but OpenTelemetry is not installed: pip install 'dlpipe[otel]'"
        ) from err
    return RequestTracer(provider or _provider_from_environment())


def _provider_from_environment() -> Any:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    service = os.environ.get("OTEL_SERVICE_NAME", "dlpipe")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter_name == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    elif exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter_name != "none":
        raise RuntimeError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: use otlp, console or none")
    return provider


def now_ns() -> int:
    return time.time_ns()
