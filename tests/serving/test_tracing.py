"""OpenTelemetry: one /predict request gives one trace under the client's traceparent, with spans
for decode, queue wait, inference and the response; its log lines carry the trace id."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import random_png, ready_client, upload

from dlpipe.monitoring.logging import configure_logging
from dlpipe.serving import ServeSettings, create_app
from dlpipe.serving.sources import LocalSource

pytest.importorskip("opentelemetry.sdk", reason="make test installs dlpipe[otel]")
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def test_one_request_is_one_trace_under_the_clients_traceparent(cnn_package: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    cfg = ServeSettings(model_name="fashion", tracing=True, registry_refresh_s=3600)
    app = create_app(
        cfg, source=LocalSource.from_path("fashion", cnn_package), tracer_provider=provider
    )
    stream = io.StringIO()
    with ready_client(app) as client:
        handler = configure_logging("INFO", stream=stream)
        try:
            exporter.clear()
            r = client.post(
                "/predict",
                files=upload(random_png(np.random.default_rng(0))),
                headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"},
            )
        finally:
            logging.getLogger().removeHandler(handler)
    assert r.status_code == 200
    spans = exporter.get_finished_spans()
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"POST /predict", "decode", "queue", "inference", "respond"}
    assert {format(s.context.trace_id, "032x") for s in spans} == {CLIENT_TRACE}
    root = by_name["POST /predict"]
    assert root.parent is not None and format(root.parent.span_id, "016x") == CLIENT_SPAN
    for name in ("decode", "queue", "inference", "respond"):
        child = by_name[name]
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time, name
    assert by_name["decode"].end_time <= by_name["queue"].start_time + 1_000_000
    assert by_name["queue"].end_time <= by_name["inference"].start_time + 1_000_000
    assert by_name["inference"].attributes["batch.size"] == 1
    assert root.attributes["http.response.status_code"] == 200
    access = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [e for e in access if e.get("event") == "request"]
    assert len(access) == 1 and access[0]["trace_id"] == CLIENT_TRACE


def test_tracing_off_builds_no_tracer_and_no_sdk() -> None:
    # FastAPI imports the OpenTelemetry API by itself when it is installed; dlpipe adds nothing.
    code = (
        "import sys; from dlpipe.serving import ServeSettings, create_app; "
        "app = create_app(ServeSettings(package='x')); "
        "print(app.state.tracer, sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None []"
