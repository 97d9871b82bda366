"""Server settings: defaults here, overridden by `DLPIPE_*` environment variables (Property 27).

    DLPIPE_MODEL_NAME=fashion DLPIPE_MAX_BATCH_SIZE=64 dlpipe serve

Routes read them through `get_settings()` (cached), so tests swap them with
`app.dependency_overrides[get_settings]` or pass a `ServeSettings` to `create_app`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServeSettings(BaseSettings):
    """Everything `dlpipe serve` can be told; each field is also `DLPIPE_<FIELD>` in the env."""

    model_config = SettingsConfigDict(
        env_prefix="DLPIPE_",
        extra="ignore",
        validate_default=True,
        protected_namespaces=(),
        use_attribute_docstrings=True,  # the docstrings become `dlpipe serve --help`
    )

    model_name: str = "dlpipe"
    """Registered model to serve (champion and A/B versions come from the registry)."""
    package: str | None = None
    """Serve a local model package directory or `.onnx` file instead of the registry."""
    host: str = "127.0.0.1"
    """Address to bind; a non-loopback address without API keys logs a warning."""
    port: int = Field(8000, ge=0, le=65535)
    """TCP port (0: any free one)."""
    tracking_uri: str | None = None
    """MLflow tracking/registry URI; None: MLFLOW_TRACKING_URI or MLflow's default."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where models run: `auto` takes CUDA (and TensorRT) when ONNX Runtime offers it."""
    max_batch_size: int = Field(32, ge=1, le=4096)
    """Largest batch the micro-batcher hands to the model."""
    max_wait_ms: float = Field(2.0, ge=0.0, le=1000.0)
    """How long the first request of a batch waits for company."""
    queue_capacity: int = Field(512, ge=1)
    """Requests waiting per served version; beyond it the server answers 503."""
    max_in_flight: int = Field(256, ge=1)
    """Inference requests handled at once; beyond it 503 at once (the CPU is the queue)."""
    workers: int = Field(1, ge=1, le=256)
    """Server processes on one port, each with its own batcher and ONNX Runtime session (the
    CPU threads divided among them); metrics and readiness cover the whole server."""
    loop: Literal["asyncio", "uvloop"] = "asyncio"
    """Event loop. asyncio by default: under overload uvloop (libuv) left new connections
    unaccepted for seconds while it served open ones (docs/benchmarks.md, overload), and it
    was no faster here on the request path."""
    limit_concurrency: int | None = Field(None, ge=1)
    """uvicorn's cap on open connections + tasks: beyond it 503 before any app code runs."""
    max_loop_lag_ms: float | None = Field(None, gt=0.0)
    """Shed new inference requests (503) while the event loop runs this late (CPU saturated);
    None: a tenth of `request_timeout_ms`."""
    request_timeout_ms: float = Field(1000.0, gt=0.0)
    """Per-request deadline; a request not answered by then gets 504."""
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Accepted API keys (comma separated in the env); empty: no authentication. With keys,
    every route needs one except /health, /ready (then a bare true/false) and /v2/health/*."""
    api_keys_file: str | None = None
    """File with more API keys (one per line or comma separated), e.g. a mounted Secret, so keys
    need not sit in the environment."""
    metrics_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Keys that may read /metrics and nothing else (Prometheus' scrape key)."""
    require_auth: bool = False
    """Refuse to start without API keys (so an empty variable or a missing Secret cannot turn
    authentication off silently)."""
    auth_failure_limit: str | None = "20/minute"
    """Failed key attempts allowed per client address (`limits` syntax); beyond it 429."""
    rate_limit: str | None = None
    """Per-key (or per-client) limit in `limits` syntax, e.g. `100/second`; None: unlimited."""
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)
    """Largest request body accepted (413 beyond)."""
    max_body_bytes_in_flight: int = Field(256 * 1024 * 1024, ge=1)
    """Request bytes all in-flight requests may hold together; beyond it 503 + Retry-After, so
    memory stays bounded whatever clients send."""
    body_timeout_s: float = Field(30.0, gt=0.0)
    """Time allowed to receive a whole request body; slower senders get 408."""
    max_batch_items: int = Field(64, ge=1)
    """Most files or texts in one /predict/batch request."""
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    """Largest image (width x height, read from its header before decoding) accepted; 413."""
    image_formats: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["PNG", "JPEG"])
    """Image formats accepted (Pillow names, comma separated in the env); others get 415."""
    max_text_chars: int = Field(10_000, ge=1)
    """Longest text accepted before tokenizing (413 beyond)."""
    decode_workers: int = Field(0, ge=0)
    """Threads that decode large images off the event loop; 0: min(4, CPU count)."""
    resize_inputs: bool = True
    """Resize images to the model's size as training did; False: other sizes get 400."""
    top_k: int = Field(5, ge=1)
    """Classes returned per prediction, most probable first."""
    model_load_timeout_s: float = Field(300.0, gt=0.0)
    """A version whose load (download, session, warm-up) takes longer is reported as failed
    and retried with back-off; the versions already serving are not held up by it."""
    registry_refresh_s: float = Field(2.0, gt=0.0)
    """How often the server polls the registry for promotions, A/B changes and rollbacks."""
    ort_intra_op_threads: int = Field(0, ge=0)
    """ONNX Runtime intra-op threads per session; 0: ONNX Runtime's default."""
    gpu_memory_headroom_mb: float = Field(512.0, ge=0.0)
    """GPU memory a model load must leave free (NVML); a version that would not fit is refused,
    reported and retried, while the loaded ones keep serving."""
    warmup: bool = True
    """Run dummy batches before a version takes traffic (no slow first requests)."""
    gpu_poll_interval_s: float = Field(5.0, gt=0.0)
    """How often GPU utilization and memory are read through NVML (when a GPU exists)."""
    ssl_certfile: str | None = None
    """PEM certificate (chain): serve HTTPS only (plain HTTP on the port is refused)."""
    ssl_keyfile: str | None = None
    """PEM private key of `ssl_certfile`."""
    forwarded_allow_ips: str | None = None
    """Proxies (comma separated IPs, or `*`) whose X-Forwarded-For names the client: behind an
    ingress, per-address limits then see the real client, not the proxy."""
    drain_s: float = Field(0.0, ge=0.0)
    """After SIGTERM: keep serving this long while /ready says 503 (load balancers stop sending),
    then stop accepting. Kubernetes' preStop hook usually covers this (deploy/k8s)."""
    shutdown_grace_s: float = Field(20.0, gt=0.0)
    """Then: time for requests already accepted to finish before the process exits."""
    tracing: bool = False
    """OpenTelemetry spans per request (needs `dlpipe[otel]`); exported as the standard
    `OTEL_*` variables say (OTLP by default)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level of the JSON log lines on stderr."""
    access_log: bool = True
    """One JSON log line per request."""
    prediction_log_dir: str | None = None
    """Directory of the prediction log (JSON Lines, one line per prediction, failure and
    feedback label; kept across restarts); the workers of `--workers N` share it. None: the
    quality statistics (online accuracy, drift) are kept in memory only."""
    prediction_log_sample: float = Field(1.0, ge=0.0, le=1.0)
    """Share of requests recorded, chosen by a hash of the request id (an id is always in or
    out); online accuracy and drift are computed from the recorded ones. 0: none."""
    prediction_log_max_mb: float = Field(64.0, gt=0.0)
    """A log file is rotated (a new one started) beyond this size, in MB."""
    prediction_log_max_files: int = Field(0, ge=0)
    """Log files kept in the directory (the oldest are deleted); 0: all."""
    prediction_log_buffer: int = Field(10_000, ge=1)
    """Records waiting for the log's writer thread; beyond it they are dropped and counted
    (`dlpipe_prediction_log_dropped_total`), never waited for."""
    quality_window: int = Field(1000, ge=10)
    """Sliding window per version: its last N served inputs for drift, its last N labeled
    predictions for online accuracy."""
    quality_tags_interval_s: float = Field(60.0, gt=0.0)
    """How often online accuracy is written to the registry as model-version tags."""

    @property
    def loop_lag_limit_s(self) -> float:
        """The event-loop lag above which new inference requests are shed, in seconds."""
        limit_ms = self.max_loop_lag_ms or self.request_timeout_ms / 10.0
        return limit_ms / 1000.0

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.api_keys_file is not None:
            path = Path(self.api_keys_file)
            if not path.is_file():
                raise ValueError(f"api_keys_file {str(path)!r} is not a readable file")
            text = path.read_text().replace(",", "\n")
            from_file = [k.strip() for k in text.splitlines() if k.strip()]
            self.api_keys = [*self.api_keys, *(k for k in from_file if k not in self.api_keys)]
        if self.require_auth and not self.api_keys:
            raise ValueError(
                "require_auth is set but no API keys are configured (DLPIPE_API_KEYS is empty "
                "or its Secret is missing); refusing to serve without authentication"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together")
        for name in ("ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name} {path!r} is not a readable file")
        return self

    @property
    def decode_threads(self) -> int:
        """Threads of the decode pool (`decode_workers`, 0 meaning min(4, CPU count))."""
        return self.decode_workers or min(4, os.cpu_count() or 1)

    @field_validator("api_keys", "metrics_api_keys", "image_formats", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [k.strip() for k in text.split(",") if k.strip()]
        return value

    @field_validator("image_formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        from PIL import Image

        Image.init()
        formats = [f.upper() for f in value]
        unknown = sorted(set(formats) - set(Image.OPEN))
        if unknown or not formats:
            known = ", ".join(sorted(Image.OPEN))
            raise ValueError(f"image_formats {unknown or formats} unknown; Pillow reads {known}")
        return formats

    @field_validator("rate_limit", "auth_failure_limit")
    @classmethod
    def _valid_rate(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from limits import parse

        try:
            parse(value)
        except ValueError as err:
            msg = f"{value!r} is not a rate like '100/second': {err}"
            raise ValueError(msg) from None
        return value


@lru_cache
def get_settings() -> ServeSettings:
    """Settings from the environment, read once per process."""
    return ServeSettings()
