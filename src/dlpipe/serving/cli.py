"""`dlpipe serve`: run the inference service under uvicorn.

    dlpipe serve --model fashion --port 8000              # champion / A/B from the MLflow registry
    dlpipe serve --package runs/model --port 8000         # a local model package
    dlpipe serve --package runs/model --ssl-certfile cert.pem --ssl-keyfile key.pem   # HTTPS
    DLPIPE_MAX_BATCH_SIZE=64 DLPIPE_API_KEYS=k1,k2 dlpipe serve --model fashion

Every `ServeSettings` field is a flag (`--max-batch-size`, ...) with its docstring as help; flags
override `DLPIPE_*` environment variables, which override the defaults. On SIGTERM the server
reports not-ready, keeps serving for `drain_s`, then stops accepting and lets the requests it
accepted finish (at most `shutdown_grace_s`) before it exits.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import math
import sys
import threading
import types
import typing
from typing import Any

from pydantic import ValidationError

from dlpipe.serving.settings import ServeSettings

log = logging.getLogger("dlpipe.serving")
ALIASES = {"model_name": ["--model"]}
"""Short forms kept from earlier versions."""


def _flag_type(annotation: Any) -> tuple[dict[str, Any], str]:
    """argparse keywords and a metavar hint for one settings annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _flag_type(args[0])
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        return {"choices": [str(a) for a in typing.get_args(annotation)]}, ""
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}, ""
    if origin is list:
        return {"type": str}, "A,B,..."
    if annotation in (int, float):
        return {"type": annotation}, ""
    return {"type": str}, ""


def build_parser() -> argparse.ArgumentParser:
    """One flag per `ServeSettings` field, generated, so a new setting cannot be forgotten."""
    parser = argparse.ArgumentParser(
        prog="dlpipe serve",
        description="Serve a model over HTTP(S) (FastAPI + ONNX Runtime).",
        epilog="Exit codes: 0 stopped cleanly, 1 the server failed, 2 usage or setting error.",
    )
    for name, field in ServeSettings.model_fields.items():
        kwargs, metavar = _flag_type(field.annotation)
        default = field.get_default(call_default_factory=True)
        text = " ".join((field.description or "").split())
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        help_text = f"{text} (env DLPIPE_{name.upper()}; default {shown})".strip()
        flags = [f"--{name.replace('_', '-')}", *ALIASES.get(name, [])]
        if metavar:
            kwargs["metavar"] = metavar
        parser.add_argument(*flags, dest=name, default=None, help=help_text, **kwargs)
    return parser


def settings_from_args(argv: list[str]) -> ServeSettings:
    """Flags over the environment over the defaults (ValidationError names the setting)."""
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    return ServeSettings(**overrides)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str]) -> int:
    try:
        settings = settings_from_args(argv)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        message = first["msg"].removeprefix("Value error, ")
        print(f"dlpipe serve: invalid setting {where}: {message}", file=sys.stderr)
        return 2

    from dlpipe.monitoring.logging import configure_logging

    configure_logging(settings.log_level.upper())
    if not settings.api_keys and not _loopback(settings.host):
        log.warning(
            "serving on %s without API keys: anyone who reaches this address can use every "
            "route; set DLPIPE_API_KEYS (and DLPIPE_REQUIRE_AUTH=true)",
            settings.host,
            extra={"event": "no_auth_on_public_address"},
        )
    if settings.workers > 1:
        from dlpipe.serving.workers import run_workers

        return run_workers(settings, settings.workers)
    serve_app(settings)
    return 0


def serve_app(
    settings: ServeSettings, sockets: list[Any] | None = None, worker: Any = None
) -> None:
    """Build the app and run it under uvicorn until a signal stops it (one process).

    `sockets` and `worker`: set in a worker of `dlpipe serve --workers N`, whose supervisor
    bound the socket and drains the whole server (so the worker itself does not wait).
    """

    from dlpipe.monitoring.logging import configure_logging
    from dlpipe.serving.app import create_app

    configure_logging(settings.log_level.upper())
    app = create_app(settings, worker=worker)
    config = uvicorn_config(settings, app)
    drain_s = 0.0 if worker is not None else settings.drain_s
    DrainingServer(config, app.state, drain_s).run(sockets)


def uvicorn_config(settings: ServeSettings, app: Any) -> Any:
    """uvicorn's configuration for `app` under `settings`."""
    import uvicorn

    use_uvloop = settings.loop == "uvloop" and importlib.util.find_spec("uvloop") is not None
    fast_http = importlib.util.find_spec("httptools") is not None
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if use_uvloop else "asyncio",
        http="httptools" if fast_http else "h11",
        log_config=None,  # keep our JSON logging
        access_log=False,  # our middleware writes one JSON line per request
        timeout_keep_alive=30,
        limit_concurrency=settings.limit_concurrency,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )


class DrainingServer:
    """uvicorn's server, with a readiness flip and a drain period before a graceful stop.

    SIGTERM (or SIGINT) first marks the app as draining (`/ready` answers 503, so load
    balancers stop sending), keeps serving for `drain_s`, then hands over to uvicorn's own
    graceful shutdown: stop accepting, finish accepted requests, run the lifespan shutdown
    (which drains every batcher). A second signal forces the exit.
    """

    def __init__(self, config: Any, state: Any, drain_s: float) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
                outer.on_signal(sig, frame)

        self.state = state
        self.drain_s = drain_s
        self.server = _Server(config)
        self._handle_exit = uvicorn.Server.handle_exit
        self._timer: threading.Timer | None = None

    def on_signal(self, sig: int, frame: types.FrameType | None) -> None:
        if getattr(self.state, "draining", False) or self.drain_s <= 0:
            self.state.draining = True
            self._handle_exit(self.server, sig, frame)
            return
        self.state.draining = True
        log.info("draining before shutdown", extra={"event": "draining", "drain_s": self.drain_s})
        # A signal handler must not block: the stop comes from a timer thread (uvicorn only
        # polls the flag it sets).
        self._timer = threading.Timer(self.drain_s, self._handle_exit, (self.server, sig, frame))
        self._timer.daemon = True
        self._timer.start()

    def run(self, sockets: list[Any] | None = None) -> None:
        self.server.run(sockets)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
