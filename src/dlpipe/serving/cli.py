"""`dlpipe serve`: run the inference service under uvicorn (one worker).

    dlpipe serve --model fashion --port 8000              # champion / A/B from the MLflow registry
    dlpipe serve --package runs/model --port 8000         # a local model package
    DLPIPE_MAX_BATCH_SIZE=64 DLPIPE_API_KEYS=k1,k2 dlpipe serve --model fashion

Flags override `DLPIPE_*` environment variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from pydantic import ValidationError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlpipe serve", description="Serve a model over HTTP.")
    p.add_argument("--model", dest="model_name", help="registered model name (DLPIPE_MODEL_NAME)")
    p.add_argument("--package", help="serve a local package dir or .onnx file (DLPIPE_PACKAGE)")
    p.add_argument("--host", help="bind address (DLPIPE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (DLPIPE_PORT, default 8000)")
    p.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow URI (DLPIPE_TRACKING_URI)")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int)
    p.add_argument("--max-wait-ms", dest="max_wait_ms", type=float)
    p.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dlpipe.serving.settings import ServeSettings

    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = ServeSettings(**overrides)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        print(f"dlpipe serve: invalid setting {where}: {first['msg']}", file=sys.stderr)
        return 2

    import uvicorn

    from dlpipe.monitoring.logging import configure_logging
    from dlpipe.serving.app import create_app

    configure_logging(settings.log_level.upper())
    app = create_app(settings)
    use_uvloop = settings.loop == "uvloop" and importlib.util.find_spec("uvloop") is not None
    fast_http = importlib.util.find_spec("httptools") is not None
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        loop="uvloop" if use_uvloop else "asyncio",
        http="httptools" if fast_http else "h11",
        log_config=None,  # keep our JSON logging
        access_log=False,  # our middleware writes one JSON line per request
        timeout_keep_alive=30,
        limit_concurrency=settings.limit_concurrency,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
