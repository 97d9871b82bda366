"""Server settings: defaults here, overridden by `DLPIPE_*` environment variables (Property 27).

    DLPIPE_MODEL_NAME=fashion DLPIPE_MAX_BATCH_SIZE=64 dlpipe serve

Routes read them through `get_settings()` (cached), so tests swap them with
`app.dependency_overrides[get_settings]` or pass a `ServeSettings` to `create_app`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServeSettings(BaseSettings):
    """Everything `dlpipe serve` can be told; each field is also `DLPIPE_<FIELD>` in the env."""

    model_config = SettingsConfigDict(
        env_prefix="DLPIPE_", extra="ignore", validate_default=True, protected_namespaces=()
    )

    model_name: str = "dlpipe"
    """Registered model to serve (champion and A/B versions come from the registry)."""
    package: str | None = None
    """Serve a local model package directory or `.onnx` file instead of the registry."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    tracking_uri: str | None = None
    """MLflow tracking/registry URI; None: MLFLOW_TRACKING_URI or MLflow's default."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch_size: int = Field(32, ge=1, le=4096)
    """Largest batch the micro-batcher hands to the model."""
    max_wait_ms: float = Field(2.0, ge=0.0, le=1000.0)
    """How long the first request of a batch waits for company."""
    queue_capacity: int = Field(512, ge=1)
    """Requests waiting per served version; beyond it the server answers 503."""
    max_in_flight: int = Field(256, ge=1)
    """Inference requests handled at once; beyond it 503 at once (the CPU is the queue)."""
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
    """Accepted API keys (comma separated in the env); empty: no authentication."""
    rate_limit: str | None = None
    """Per-key (or per-client) limit in `limits` syntax, e.g. `100/second`; None: unlimited."""
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1)
    """Largest request body accepted (413 beyond)."""
    max_batch_items: int = Field(64, ge=1)
    """Most files or texts in one /predict/batch request."""
    resize_inputs: bool = True
    """Resize images to the model's size as training did; False: other sizes get 400."""
    top_k: int = Field(5, ge=1)
    registry_refresh_s: float = Field(2.0, gt=0.0)
    """How often the server polls the registry for promotions, A/B changes and rollbacks."""
    ort_intra_op_threads: int = Field(0, ge=0)
    """ONNX Runtime intra-op threads per session; 0: ONNX Runtime's default."""
    warmup: bool = True
    gpu_poll_interval_s: float = Field(5.0, gt=0.0)
    """How often GPU utilization and memory are read through NVML (when a GPU exists)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    """One JSON log line per request."""

    @property
    def loop_lag_limit_s(self) -> float:
        """The event-loop lag above which new inference requests are shed, in seconds."""
        limit_ms = self.max_loop_lag_ms or self.request_timeout_ms / 10.0
        return limit_ms / 1000.0

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [k.strip() for k in text.split(",") if k.strip()]
        return value

    @field_validator("rate_limit")
    @classmethod
    def _valid_rate(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from limits import parse

        try:
            parse(value)
        except ValueError as err:
            msg = f"rate_limit {value!r} is not a rate like '100/second': {err}"
            raise ValueError(msg) from None
        return value


@lru_cache
def get_settings() -> ServeSettings:
    """Settings from the environment, read once per process."""
    return ServeSettings()
