"""`dlpipe run`: the whole pipeline as one command (what `make run` calls).

    dlpipe run -c configs/fashion_mnist.yaml

Train → register → optimize (ONNX + INT8 behind the accuracy gate) → promote the best variant that
passes → start the real server → send the held-out test split through HTTP → print one summary.
A Keras config (`model.framework: tensorflow`) runs the same stages: TensorFlow trains and
exports in worker processes, and the server runs the promoted ONNX variant (or, when every
export failed, the Keras model itself in a TensorFlow worker process).
Exit 0 when every HTTP answer came back, 1 when a stage failed or the server answered errors, 2
for a bad command line or config (before any work). With `--json` stdout holds the summary only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console

from dlpipe.cli_progress import StepProgress
from dlpipe.cli_support import (
    EXIT_FAILED,
    EXIT_OK,
    CommandParser,
    Outcome,
    add_config_flags,
    add_json_flag,
    add_tracking_flag,
    as_usage_error,
    run_command,
    show_download_progress,
)
from dlpipe.config import ConfigError, PipelineConfig, load_config
from dlpipe.evaluation import HttpEvalResult, ServerProcess, evaluate_over_http, raw_test_samples


@dataclass
class VariantRow:
    """One registered version of the model in the summary table."""

    version: str
    variant: str
    framework: str
    precision: str
    size_mb: float
    accuracy: float | None
    status: str
    latency_ms: float | None = None


@dataclass
class PipelineSummary:
    model_name: str
    run_id: str
    trained_version: str
    promoted_version: str
    variants: list[VariantRow]
    served: HttpEvalResult | None
    tracking_uri: str
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str)


def _tracking_uri(cfg: PipelineConfig) -> str:
    """Pin one URI for every stage and the server subprocess (MLflow's default if unset)."""
    import mlflow

    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        mlflow.set_tracking_uri(uri)
    uri = mlflow.get_tracking_uri()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def _optimize(
    cfg: PipelineConfig,
    name: str,
    version: str,
    registry: Any,
    progress: Callable[[str, str], None] | None = None,
) -> tuple[list[VariantRow], float | None]:
    """Build the configured variants; the accuracy gate decides which become versions.

    Returns the rows and the parent's own batch-1 p50 latency for comparison (PyTorch eager;
    for a Keras parent its FP32 ONNX export, since TensorFlow never runs in this process).
    """
    from dlpipe.optimize.variants import optimize_version

    report = optimize_version(
        name,
        version,
        targets=list(cfg.optimize.targets),
        max_accuracy_drop=cfg.optimize.max_accuracy_drop,
        registry=registry,
        calibration_samples=cfg.optimize.calibration_samples,
        progress=progress,
    )
    rows = []
    for v in report.variants:
        rows.append(
            VariantRow(
                version=v.version or "-",
                variant=v.target,
                framework="onnx",
                precision=v.precision,
                size_mb=v.size_mb or 0.0,
                accuracy=v.accuracy,
                status=v.status if v.status == "kept" else f"{v.status}: {v.reason}",
                latency_ms=v.latency.p50_ms if v.latency else None,
            )
        )
    base = report.baseline_latency.p50_ms if report.baseline_latency else None
    return rows, base


def _pick_champion(trained: VariantRow, variants: list[VariantRow]) -> VariantRow:
    """Fastest variant that passed the gate; the trained model when none did.

    Every trained version can be served: PyTorch weights in the server process, a Keras model
    (no model.onnx when its export failed) in a TensorFlow worker process beside it.
    """
    kept = [v for v in variants if v.status == "kept" and v.latency_ms is not None]
    if not kept:
        return trained
    return min(kept, key=lambda v: v.latency_ms or float("inf"))


def run_pipeline(
    cfg: PipelineConfig,
    *,
    port: int = 0,
    eval_limit: int | None = None,
    clients: int = 16,
    console: Console | None = None,
    progress: Callable[[str, str], None] | None = None,
) -> PipelineSummary:
    """Run every stage once and return the summary (the server is stopped at the end)."""
    from dlpipe.tracking.registry import ModelRegistry
    from dlpipe.training import train

    console = console or Console(stderr=True)
    timings: dict[str, float] = {}
    uri = _tracking_uri(cfg)

    t0 = time.perf_counter()
    console.rule("[bold]1/4 train")
    result = train(cfg)
    timings["train"] = time.perf_counter() - t0
    if result.model_version is None:
        raise RuntimeError("training did not register a model (tracking.register_model is off)")
    name, version = result.model_name, str(result.model_version)
    registry = ModelRegistry(uri)
    meta = registry.get_metadata(name, version)
    trained = VariantRow(
        version=version,
        variant="trained",
        framework=meta.framework,
        precision=meta.precision,
        size_mb=meta.model_size_mb,
        accuracy=result.metrics.get("test/acc"),
        status="kept",
        latency_ms=meta.latency_ms,
    )

    t0 = time.perf_counter()
    console.rule("[bold]2/4 optimize")
    variants: list[VariantRow] = []
    if cfg.optimize.targets:
        variants, trained.latency_ms = _optimize(cfg, name, version, registry, progress)
    timings["optimize"] = time.perf_counter() - t0

    champion = _pick_champion(trained, variants)
    registry.promote(name, champion.version)
    console.print(f"promoted {name} version {champion.version} ({champion.variant}) to champion")

    t0 = time.perf_counter()
    console.rule("[bold]3/4 serve and evaluate over HTTP")
    samples = raw_test_samples(cfg, limit=eval_limit)
    with ServerProcess(model_name=name, tracking_uri=uri, port=port) as server:
        served = evaluate_over_http(server.url, samples, cfg, clients=clients)
    timings["serve_eval"] = time.perf_counter() - t0

    return PipelineSummary(
        model_name=name,
        run_id=result.run_id,
        trained_version=version,
        promoted_version=champion.version,
        variants=[trained, *variants],
        served=served,
        tracking_uri=uri,
        timings_s=timings,
    )


def print_summary(summary: PipelineSummary, console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"dlpipe run: {summary.model_name}")
    cols = ("version", "variant", "precision", "size MB", "test acc", "p50 ms (b=1)", "status")
    for col in cols:
        table.add_column(col)
    for v in summary.variants:
        star = " *" if v.version == summary.promoted_version else ""
        acc = f"{v.accuracy:.4f}" if v.accuracy is not None else "-"
        lat = f"{v.latency_ms:.2f}" if v.latency_ms is not None else "-"
        row = (v.version + star, v.variant, v.precision, f"{v.size_mb:.3f}", acc, lat, v.status)
        table.add_row(*row)
    console.print(table)
    trained = [v for v in summary.variants if v.variant == "trained"]
    if trained and trained[0].framework == "tensorflow" and trained[0].latency_ms is not None:
        console.print(
            "trained (tensorflow): p50 measured on its FP32 ONNX export; TensorFlow never runs "
            "in this process"
        )
    s = summary.served
    if s is not None:
        served = Table(title=f"served over HTTP: version {summary.promoted_version} (champion)")
        cols = ("requests", "errors", "retried 503s", "accuracy", "p50 ms", "p95 ms", "req/s")
        for col in cols:
            served.add_column(col)
        served.add_row(
            str(s.requests),
            str(s.errors),
            str(s.retries),
            f"{s.accuracy:.4f}",
            f"{s.p50_ms:.1f}",
            f"{s.p95_ms:.1f}",
            f"{s.throughput_rps:.0f}",
        )
        console.print(served)
    console.print(f"MLflow UI: mlflow ui --backend-store-uri '{summary.tracking_uri}'")
    console.print(
        "Grafana dashboard: http://localhost:3000/d/dlpipe (docker compose -f "
        "deploy/docker-compose.yml up; see docs/deployment.md)"
    )
    spent = ", ".join(f"{k} {v:.0f} s" for k, v in summary.timings_s.items())
    console.print(f"time: {spent}")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="dlpipe run", description=__doc__.splitlines()[0])
    add_config_flags(parser, default="configs/fashion_mnist.yaml")
    parser.add_argument("--eval-limit", type=int, default=None, help="test samples sent over HTTP")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    add_tracking_flag(parser)
    add_json_flag(parser, "the summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dlpipe run`; returns the exit status."""
    return run_command(build_parser(), run_job, argv)


def run_job(args: argparse.Namespace) -> Outcome:
    with as_usage_error(ConfigError):  # the config and the machine, before any work
        cfg = load_config(args.config, args.override)
        if args.tracking_uri:
            cfg.tracking.tracking_uri = args.tracking_uri
        from dlpipe.training.devices import check_devices

        check_devices(cfg.training)
    from dlpipe.optimize.cli import OPTIMIZE_STEPS

    show_download_progress()
    with StepProgress("dlpipe run", OPTIMIZE_STEPS) as progress:
        summary = run_pipeline(
            cfg, port=args.port, eval_limit=args.eval_limit, clients=args.clients,
            console=Console(stderr=True), progress=progress,
        )  # fmt: skip
    served = summary.served
    failed = served is not None and served.errors > 0
    return Outcome(
        asdict(summary),
        lambda console: print_summary(summary, console),
        status=EXIT_FAILED if failed else EXIT_OK,
        error=f"{served.errors if served else 0} HTTP requests to the served model failed",
    )


if __name__ == "__main__":
    sys.exit(main())
