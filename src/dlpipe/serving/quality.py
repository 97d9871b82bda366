"""The server's side of `dlpipe.quality`: the monitor built from the settings, and the two calls
the prediction routes make once they know how a request went.

    served, logits = await infer(request, manager, ..., prepared)
    observe_prediction(request, served, logits, samples, pixels, answers)   # after a 200
    observe_error(request, err)                                             # a ServingError

Both cost a hash of the request id (sampling) and one append to the log's bounded buffer; the
rest happens on the log's writer thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import Request

from dlpipe.monitoring import MetricsCollector
from dlpipe.quality import QualityMonitor
from dlpipe.quality.monitor import Publish
from dlpipe.serving.dispatch import Prepared
from dlpipe.serving.errors import ServingError
from dlpipe.serving.inputs import Sample
from dlpipe.serving.served import ServedModel
from dlpipe.serving.settings import ServeSettings
from dlpipe.serving.workers import WorkerInfo


def build_monitor(
    settings: ServeSettings,
    collector: MetricsCollector,
    served_versions: Callable[[], dict[str, Any]],
    source: Any,
    worker: WorkerInfo | None,
) -> QualityMonitor:
    # One worker writes the MLflow tags: every worker computes the same windows.
    first = worker is None or worker.index == 0
    return QualityMonitor(
        collector.registry,
        log_dir=settings.prediction_log_dir,
        sample=settings.prediction_log_sample,
        window=settings.quality_window,
        top_k=settings.top_k,
        max_bytes=int(settings.prediction_log_max_mb * 1_000_000),
        max_files=settings.prediction_log_max_files,
        buffer=settings.prediction_log_buffer,
        served_versions=served_versions,
        publish=registry_tags(source) if first else None,
        publish_interval_s=settings.quality_tags_interval_s,
    )


def registry_tags(source: Any) -> Publish | None:
    """Sets model-version tags in the registry a `RegistrySource` follows (None otherwise)."""
    registry = getattr(source, "registry", None)
    client = getattr(registry, "client", None)
    if client is None:
        return None
    name = source.model_name

    def publish(version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)

    return publish


class Capture:
    """Wraps a request's `Prepared` to keep the samples it built (the last routing attempt's).

    No closure over itself: a request's capture, its images and its payloads are freed by
    reference counting when the request ends, not left in a cycle for the collector (one per
    request raised the collections more than tenfold).
    """

    __slots__ = ("_inner", "samples")

    def __init__(self, prepared: Prepared | Callable[[ServedModel], list[Sample]]) -> None:
        self._inner = prepared if isinstance(prepared, Prepared) else Prepared(prepared)
        self.samples: list[Sample] | None = None

    def __call__(self, served: ServedModel) -> list[Sample]:
        self.samples = self._inner.make_samples(served)
        return self.samples

    @property
    def prepared(self) -> Prepared:
        """What `dispatch.infer` takes: builds the samples through this capture."""
        return Prepared(self, self._inner.pool)


def _where(request: Request) -> tuple[str, str, float]:
    state = request.state
    route = request.scope.get("route")
    endpoint = getattr(route, "path_format", None) or request.url.path
    started = getattr(state, "started", None)
    latency_ms = 0.0 if started is None else (time.perf_counter() - started) * 1000.0
    return str(getattr(state, "route", "")), endpoint, latency_ms


def observe_prediction(
    request: Request,
    served: ServedModel,
    logits: list[np.ndarray],
    samples: list[Sample] | None,
    pixels: list[int] | None = None,
    answers: list[list[dict[str, Any]]] | None = None,
) -> None:
    monitor: QualityMonitor | None = getattr(request.app.state, "quality", None)
    if monitor is None:
        return
    route, endpoint, latency_ms = _where(request)
    monitor.observe_prediction(
        request.state.request_id,
        served,
        logits,
        latency_ms=latency_ms,
        route=route,
        endpoint=endpoint,
        samples=samples,
        pixels=pixels,
        answers=answers,
    )


def observe_error(request: Request, err: ServingError) -> None:
    """Recorded only once a version was chosen: a failure before routing is no version's."""
    monitor: QualityMonitor | None = getattr(request.app.state, "quality", None)
    version = getattr(request.state, "model_version", None)
    if monitor is None or version is None:
        return
    route, endpoint, latency_ms = _where(request)
    monitor.observe_error(
        request.state.request_id,
        str(version),
        status=err.status_code,
        error=err.error_type,
        latency_ms=latency_ms,
        route=route,
        endpoint=endpoint,
    )
