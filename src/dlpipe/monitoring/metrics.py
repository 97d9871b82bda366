"""Prometheus metrics of the inference service, on a registry of its own.

    collector = MetricsCollector()
    collector.record_latency(12.5, endpoint="predict", model_version="3")
    body, content_type = collector.render()   # what GET /metrics returns

Metric names, labels and buckets are the contract in docs/architecture.md ("Monitoring metric
names"); dashboards and alert rules under deploy/ query exactly these names.

With several server processes (`dlpipe serve --workers N`) `PROMETHEUS_MULTIPROC_DIR` is set
before any worker starts: every process then writes its values to files there and `render()`
aggregates them, so counters and histograms are exact for the whole server; gauges say how they
combine (`livesum` for in-flight and queue depth, `max` for the rest).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter as CountByKey
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

logger = logging.getLogger("dlpipe.monitoring")

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ROUTES: frozenset[str] = frozenset({"pinned", "ab_a", "ab_b", "champion"})

# Every metric this module exposes; deploy tests check dashboards and alerts against it.
METRIC_NAMES: tuple[str, ...] = (
    "dlpipe_request_latency_seconds",
    "dlpipe_requests_total",
    "dlpipe_errors_total",
    "dlpipe_queue_wait_seconds",
    "dlpipe_inference_seconds",
    "dlpipe_batch_size",
    "dlpipe_in_flight_requests",
    "dlpipe_queue_depth",
    "dlpipe_queue_capacity",
    "dlpipe_routed_requests_total",
    "dlpipe_gpu_utilization_percent",
    "dlpipe_gpu_memory_used_bytes",
    "dlpipe_gpu_memory_total_bytes",
    "dlpipe_model_info",
    "dlpipe_up",
    "dlpipe_throughput_rps",
)


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GaugeMode = Literal["max", "livesum"]
"""How a gauge combines across server processes."""


def _check_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class MetricsCollector:
    """Creates the dlpipe metrics once on `registry` and records into them.

    Args:
        registry: where the metrics live; a fresh `CollectorRegistry` when None (never the
            process-global one, so several collectors can coexist in one process).
        window_s: how far back `get_metrics()` looks for throughput and latency quantiles.
        max_samples: most recent requests kept in memory for `get_metrics()`.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        window_s: float = 60.0,
        max_samples: int = 100_000,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.window_s = window_s
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        r = self.registry

        def gauge(
            name: str, text: str, labels: tuple[str, ...] = (), mode: GaugeMode = "max"
        ) -> Gauge:
            return Gauge(name, text, labels, registry=r, multiprocess_mode=mode)

        request_labels = ("endpoint", "model_version", "status")
        self.request_latency = Histogram(
            "dlpipe_request_latency_seconds",
            "End-to-end request latency inside the server.",
            request_labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter("dlpipe_requests", "Requests answered.", request_labels, registry=r)
        self.errors = Counter("dlpipe_errors", "Errors by type.", ("error_type",), registry=r)
        self.queue_wait = Histogram(
            "dlpipe_queue_wait_seconds",
            "Time a request waited in the batching queue.",
            ("model_version",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "dlpipe_inference_seconds",
            "Model run time per batch.",
            ("model_version",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dlpipe_batch_size",
            "Requests per executed batch.",
            ("model_version",),
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.in_flight = gauge(
            "dlpipe_in_flight_requests", "Requests being handled now.", mode="livesum"
        )
        self.queue_depth = gauge(
            "dlpipe_queue_depth", "Requests waiting in the queue.", ("model_version",), "livesum"
        )
        self.queue_capacity = gauge(
            "dlpipe_queue_capacity", "Queue bound.", ("model_version",), "livesum"
        )
        self.routed_requests = Counter(
            "dlpipe_routed_requests",
            "Requests by the version routing chose and why.",
            ("model_name", "model_version", "route"),
            registry=r,
        )
        self.gpu_utilization = gauge(
            "dlpipe_gpu_utilization_percent", "GPU utilization (NVML).", ("gpu",)
        )
        self.gpu_memory_used = gauge(
            "dlpipe_gpu_memory_used_bytes", "GPU memory in use (NVML).", ("gpu",)
        )
        self.gpu_memory_total = gauge(
            "dlpipe_gpu_memory_total_bytes", "GPU memory size (NVML).", ("gpu",)
        )
        self.model_info = gauge(
            "dlpipe_model_info",
            "Served model versions (value 1; 0 once retired when several processes serve).",
            ("model_name", "model_version", "framework", "precision"),
        )
        self.up = gauge("dlpipe_up", "1 while the server process runs.")
        self.throughput = gauge(
            "dlpipe_throughput_rps",
            "Requests per second over the recent window (dashboards: rate() on the counters).",
            mode="livesum",
        )
        self.up.set(1)
        self._lock = threading.Lock()
        # (monotonic time, latency in ms) of recent requests, for get_metrics().
        self._recent: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._request_count = 0
        self._external_rps: float | None = None
        if not self.multiprocess:
            # Computed when scraped, so it is live without a timer; see `record_throughput`.
            # (Across processes it is refreshed at most once a second by each one instead.)
            self.throughput.set_function(self._throughput_now)
        self._throughput_set_at = 0.0
        self._errors_by_type: CountByKey[str] = CountByKey()
        self._gpu: dict[str, dict[str, float]] = {}
        self._started = time.monotonic()

    # -- requests ---------------------------------------------------------------------------
    def record_latency(
        self,
        latency_ms: float,
        endpoint: str = "predict",
        model_version: str = "",
        status: str = "200",
    ) -> None:
        """Observe one answered request: latency histogram and request counter."""
        latency_ms = _check_non_negative("latency_ms", latency_ms)
        labels = (endpoint, str(model_version), str(status))
        self.request_latency.labels(*labels).observe(latency_ms / 1000.0)
        self.requests.labels(*labels).inc()
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, latency_ms))
            self._request_count += 1
        if self.multiprocess and now - self._throughput_set_at >= 1.0:
            self._throughput_set_at = now
            self.throughput.set(self._throughput_now())

    def record_error(self, error_type: str, detail: str = "") -> None:
        """Count an error by type and log it as one structured line."""
        if not error_type:
            raise ValueError("error_type must be a non-empty string")
        self.errors.labels(error_type).inc()
        with self._lock:
            self._errors_by_type[error_type] += 1
        logger.warning(
            "inference error %s: %s",
            error_type,
            detail,
            extra={"event": "error", "error_type": error_type, "detail": detail},
        )

    @contextmanager
    def track_in_flight(self) -> Iterator[None]:
        """Count the enclosed block as one in-flight request."""
        self.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight.dec()

    def record_route(self, model_name: str, model_version: str, route: str) -> None:
        """Count one routing decision (`pinned`, `ab_a`, `ab_b` or `champion`)."""
        if route not in ROUTES:
            raise ValueError(f"route must be one of {sorted(ROUTES)}, got {route!r}")
        self.routed_requests.labels(model_name, str(model_version), route).inc()

    def record_throughput(self, requests_per_second: float) -> None:
        """Report an externally measured throughput in `dlpipe_throughput_rps` (the design's
        interface); without one, the gauge shows the rate over the recent window."""
        self._external_rps = _check_non_negative("requests_per_second", requests_per_second)

    def _throughput_now(self) -> float:
        if self._external_rps is not None:
            return self._external_rps
        now = time.monotonic()
        count = 0
        with self._lock:
            for t, _ in reversed(self._recent):  # newest first: stop at the window's edge
                if now - t > self.window_s:
                    break
                count += 1
        return count / min(self.window_s, max(now - self._started, 1.0))

    # -- batching ---------------------------------------------------------------------------
    def record_batch(
        self, batch_size: int, queue_wait_s: float, inference_s: float, model_version: str
    ) -> None:
        """Observe one executed batch: its size, the queue wait and the inference time."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        queue_wait_s = _check_non_negative("queue_wait_s", queue_wait_s)
        inference_s = _check_non_negative("inference_s", inference_s)
        version = str(model_version)
        self.batch_size.labels(version).observe(int(batch_size))
        self.queue_wait.labels(version).observe(queue_wait_s)
        self.inference_time.labels(version).observe(inference_s)

    def set_queue(self, model_version: str, depth: int, capacity: int) -> None:
        """Publish the current queue depth and its bound for one model version."""
        depth_value = _check_non_negative("depth", depth)
        capacity_value = _check_non_negative("capacity", capacity)
        version = str(model_version)
        self.queue_depth.labels(version).set(depth_value)
        self.queue_capacity.labels(version).set(capacity_value)

    # -- models and GPU ---------------------------------------------------------------------
    def set_model_info(
        self, model_name: str, model_version: str, framework: str = "onnx", precision: str = "fp32"
    ) -> None:
        """Mark a model version as served (value 1)."""
        self.model_info.labels(model_name, str(model_version), framework, precision).set(1)

    def remove_model_info(
        self, model_name: str, model_version: str, framework: str = "onnx", precision: str = "fp32"
    ) -> None:
        """Drop a version that is no longer served (no error when it was never set)."""
        if self.multiprocess:  # files keep every series: 0 says "no longer served"
            self.model_info.labels(model_name, str(model_version), framework, precision).set(0)
            return
        with suppress(KeyError):
            self.model_info.remove(model_name, str(model_version), framework, precision)

    def record_gpu_utilization(self, utilization_percent: float, gpu: str = "0") -> None:
        """Set the utilization gauge of one GPU (0-100)."""
        value = _check_non_negative("utilization_percent", utilization_percent)
        if value > 100:
            raise ValueError(f"utilization_percent must be <= 100, got {value!r}")
        self.gpu_utilization.labels(str(gpu)).set(value)
        with self._lock:
            self._gpu.setdefault(str(gpu), {})["utilization_percent"] = value

    def record_gpu_memory(self, used_bytes: float, total_bytes: float, gpu: str = "0") -> None:
        """Set the memory gauges of one GPU."""
        used = _check_non_negative("used_bytes", used_bytes)
        total = _check_non_negative("total_bytes", total_bytes)
        if used > total:
            raise ValueError(f"used_bytes ({used}) exceeds total_bytes ({total})")
        self.gpu_memory_used.labels(str(gpu)).set(used)
        self.gpu_memory_total.labels(str(gpu)).set(total)
        with self._lock:
            entry = self._gpu.setdefault(str(gpu), {})
            entry["memory_used_bytes"] = used
            entry["memory_total_bytes"] = total

    # -- read-out ---------------------------------------------------------------------------
    def get_metrics(self) -> dict[str, Any]:
        """A JSON-able snapshot: counts, recent latency quantiles, errors, throughput, GPUs.

        Throughput is requests per second over the last `window_s` seconds (or since start
        when that is shorter, but at least 1 s), computed from the recorded request timestamps.
        """
        now = time.monotonic()
        with self._lock:
            recent = [(t, ms) for t, ms in self._recent if now - t <= self.window_s]
            total = self._request_count
            errors = dict(self._errors_by_type)
            gpus = {k: dict(v) for k, v in self._gpu.items()}
        span = min(self.window_s, max(now - self._started, 1.0))
        latencies = sorted(ms for _, ms in recent)
        latency: dict[str, float | None] = {"p50_ms": None, "p95_ms": None, "p99_ms": None}
        if latencies:
            latency = {
                "p50_ms": _quantile(latencies, 0.50),
                "p95_ms": _quantile(latencies, 0.95),
                "p99_ms": _quantile(latencies, 0.99),
            }
        return {
            "requests_total": total,
            "requests_in_window": len(recent),
            "window_s": span,
            "throughput_rps": len(recent) / span,
            "latency": latency,
            "errors_total": sum(errors.values()),
            "errors_by_type": errors,
            "in_flight": int(next(iter(self.in_flight.collect())).samples[0].value),
            "gpus": gpus,
        }

    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition of every metric (of every server process), and its type."""
        if not self.multiprocess:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        self.throughput.set(self._throughput_now())
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged), CONTENT_TYPE_LATEST
