"""The FastAPI application: `create_app(settings)` builds it; models load in its lifespan.

app = create_app(ServeSettings(package="runs/model"))   # or models from the registry
uvicorn.run(app)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dlpipe import __version__
from dlpipe.monitoring import MetricsCollector
from dlpipe.monitoring.gpu import GpuMonitor, GpuReader
from dlpipe.monitoring.tracing import request_tracer
from dlpipe.routing import RoutingPlan
from dlpipe.serving.admission import Admission, LoopLagMonitor
from dlpipe.serving.errors import ServingError, error_body
from dlpipe.serving.inputs import UploadPolicy
from dlpipe.serving.manager import ModelManager, freeze_startup_heap
from dlpipe.serving.middleware import RequestContextMiddleware
from dlpipe.serving.openapi import served_openapi
from dlpipe.serving.quality import build_monitor
from dlpipe.serving.routes import feedback, health, metrics, models, predict, v2
from dlpipe.serving.security import Guard
from dlpipe.serving.settings import ServeSettings, get_settings
from dlpipe.serving.sources import LocalSource, ModelSource, RegistrySource
from dlpipe.serving.workers import WorkerInfo

log = logging.getLogger("dlpipe.serving")


class _UnavailableSource:
    """Stands in when the registry cannot even be opened; the server stays up and says why."""

    def __init__(self, model_name: str, reason: str) -> None:
        self.model_name = model_name
        self.reason = reason

    def plan(self) -> RoutingPlan:
        raise RuntimeError(self.reason)

    def fetch(self, version: str) -> Any:
        raise RuntimeError(self.reason)


def build_source(settings: ServeSettings) -> ModelSource:
    """A local package when `settings.package` is set, else the MLflow registry."""
    if settings.package:
        return LocalSource.from_path(settings.model_name, settings.package)
    try:
        return RegistrySource(settings.model_name, settings.tracking_uri)
    except Exception as err:
        return _UnavailableSource(settings.model_name, f"registry unavailable: {err}")


def _request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", ""))


def _install_error_handlers(app: FastAPI, collector: MetricsCollector) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, err: ServingError) -> JSONResponse:
        collector.record_error(err.error_type, err.message)
        return JSONResponse(
            error_body(err.error_type, err.message, _request_id(request), request.url.path),
            status_code=err.status_code,
            headers=err.headers(),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        message = "invalid request: " + "; ".join(parts)
        collector.record_error("invalid_input", message)
        return JSONResponse(
            error_body("invalid_input", message, _request_id(request), request.url.path),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        collector.record_error(kind, f"{request.method} {request.url.path}: {err.detail}")
        return JSONResponse(
            error_body(kind, str(err.detail), _request_id(request), request.url.path),
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )


def _served_versions(manager: ModelManager) -> dict[str, Any]:
    """The versions routing uses now (read from the quality threads: one immutable snapshot)."""
    state = manager.state
    return dict(state.models) if state is not None else {}


def _first_ready(worker: WorkerInfo | None) -> None:
    freeze_startup_heap()
    if worker is not None:
        worker.mark_ready()


def create_app(
    settings: ServeSettings | None = None,
    *,
    source: ModelSource | None = None,
    collector: MetricsCollector | None = None,
    gpu_reader: GpuReader | None = None,
    tracer_provider: Any = None,
    worker: WorkerInfo | None = None,
) -> FastAPI:
    """Build the service; models are loaded and warmed up when the lifespan starts.

    Args:
        settings: server settings; `get_settings()` (the environment) when None.
        source: where models come from; built from `settings` when None.
        collector: metrics collector; a fresh one on its own registry when None.
        gpu_reader: GPU readings for the gauges (tests inject fakes); NVML when None.
        tracer_provider: OpenTelemetry provider when `settings.tracing` (tests pass one with an
            in-memory exporter); None: built from the `OTEL_*` environment.
        worker: set in a worker of `dlpipe serve --workers N` (readiness covers all of them).
    """
    settings = settings or get_settings()
    collector = collector or MetricsCollector()
    lag = LoopLagMonitor()
    admission = Admission(
        settings.max_in_flight,
        settings.loop_lag_limit_s,
        lag,
        max_body_bytes=settings.max_upload_bytes,
        body_budget_bytes=settings.max_body_bytes_in_flight,
        body_timeout_s=settings.body_timeout_s,
    )
    guard = Guard(
        settings.api_keys,
        settings.rate_limit,
        settings.auth_failure_limit,
        metrics_keys=settings.metrics_api_keys,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Nothing here waits on the registry or a model: /health answers from the first
        # second; /ready turns true once the manager has a version serving.
        gpu = GpuMonitor(collector, reader=gpu_reader, interval_s=settings.gpu_poll_interval_s)
        app.state.gpu_monitor = gpu
        gpu.start()
        app.state.lag_monitor = lag
        # Large images are decoded here, off the event loop (Pillow releases the GIL meanwhile).
        decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        app.state.decode_pool = decode_pool
        manager = ModelManager(
            source or build_source(settings),
            settings,
            collector,
            admission.arrivals,
            on_first_ready=lambda: _first_ready(worker),
        )
        app.state.manager = manager
        # Prediction log, feedback join, online accuracy and drift (dlpipe.quality).
        quality = build_monitor(
            settings, collector, lambda: _served_versions(manager), manager.source, worker
        )
        app.state.quality = quality
        quality.start()
        manager.start()
        lag.start()
        admission.start()
        try:
            yield
        finally:
            await manager.stop()
            # After the manager: every answered request's record is queued by now.
            await asyncio.to_thread(quality.close)
            await lag.stop()
            await admission.stop()
            gpu.stop()
            decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="dlpipe inference service",
        version=__version__,
        description="Image and text classification with dynamic batching on ONNX Runtime.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.collector = collector
    app.state.admission = admission
    app.state.guard = guard
    app.state.worker = worker
    app.state.quality = None  # set when the lifespan starts
    app.state.tracer = request_tracer(settings.tracing, tracer_provider)
    app.state.upload_policy = UploadPolicy(
        settings.image_formats, settings.max_image_pixels, settings.max_text_chars
    )
    # No dependency_overrides here: FastAPI re-analyses every dependency of every request
    # while any override is set (several times the cost of our whole request path).
    _install_error_handlers(app, collector)
    app.openapi = lambda: served_openapi(app)  # type: ignore[method-assign]
    for module in (predict, health, metrics, models, v2, feedback):
        app.include_router(module.router)
    app.add_middleware(
        RequestContextMiddleware,
        collector=collector,
        access_log=settings.access_log,
        admission=admission,
        guard=guard,
        tracer=app.state.tracer,
    )
    return app
