"""Per-call cost of `ModelRegistry.get_model_for_request`: cached routing vs a DB query per call.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/registry_routing.py [--calls 20000] [--json]

Builds a throwaway MLflow sqlite store with two versions of a tiny model, then times each call
for: champion routing, A/B routing with a random draw and with a sticky request key (all served
from the cache, which checks the routing signal on every call), and the same lookups with the
cache disabled (`routing_ttl_s=0` and no signal: a registry query on every call). Target: cached
calls under 1 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

TARGET_MS = 1.0


def _time_calls(call: Callable[[int], object], calls: int) -> dict[str, float]:
    """Per-call latencies in microseconds (mean, p50, p99)."""
    samples = []
    for i in range(calls):
        start = time.perf_counter_ns()
        call(i)
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return {
        "calls": calls,
        "mean_us": statistics.fmean(samples),
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[int(len(samples) * 0.99) - 1],
    }


def run(calls: int, uncached_calls: int) -> list[dict[str, object]]:
    import torch

    from dlpipe.config import PipelineConfig
    from dlpipe.routing import ABTestConfig
    from dlpipe.tracking.metadata import ModelMetadata
    from dlpipe.tracking.package import save_model_package
    from dlpipe.tracking.registry import ModelRegistry

    root = Path(tempfile.mkdtemp(prefix="dlpipe-bench-"))
    os.chdir(root)  # MLflow's default artifact root ./mlruns lands here
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = PipelineConfig()
    meta = ModelMetadata(
        "bench", "onnx", "fp32", 0.01, datetime.now(UTC), {"acc": 0.9}, cfg.preprocessing
    )
    package = save_model_package(root / "pkg", cfg, meta, net=torch.nn.Linear(8, 2))
    registry = ModelRegistry(uri, cache_dir=root / "cache")
    v1 = registry.register_model(package, meta)
    v2 = registry.register_model(package, meta)
    uncached = ModelRegistry(uri, routing_ttl_s=0.0, use_routing_signal=False)

    rows: list[dict[str, object]] = []

    def measure(label: str, reg: ModelRegistry, n: int, keyed: bool) -> None:
        reg.get_model_for_request("bench")  # warm the cache / connection
        call = (
            (lambda i: reg.get_model_for_request("bench", f"user-{i}"))
            if keyed
            else (lambda i: reg.get_model_for_request("bench"))
        )
        rows.append({"mode": label, **_time_calls(call, n)})

    registry.promote("bench", v1)
    measure("cached: champion", registry, calls, keyed=False)
    registry.set_ab_config("bench", ABTestConfig(v1, v2, 0.9))
    measure("cached: A/B random draw", registry, calls, keyed=False)
    measure("cached: A/B sticky key", registry, calls, keyed=True)
    registry.clear_ab_config("bench")
    measure("uncached: champion (DB query)", uncached, uncached_calls, keyed=False)
    registry.set_ab_config("bench", ABTestConfig(v1, v2, 0.9))
    measure("uncached: A/B sticky key (DB query)", uncached, uncached_calls, keyed=True)
    for row in rows:
        row["under_1ms"] = float(row["mean_us"]) / 1000 < TARGET_MS  # type: ignore[arg-type]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000, help="cached calls per mode")
    parser.add_argument("--uncached-calls", type=int, default=300, help="calls per DB mode")
    parser.add_argument("--json", action="store_true", help="print one JSON array last")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow  # noqa: F401  (sets its own log levels on import; quiet them afterwards)

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    rows = run(args.calls, args.uncached_calls)
    if args.json:
        print(json.dumps(rows))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="get_model_for_request per call (sqlite store)")
    for col in ("mode", "calls", "mean µs", "p50 µs", "p99 µs", "< 1 ms"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in rows:
        table.add_row(
            str(r["mode"]), str(r["calls"]), f"{r['mean_us']:.1f}", f"{r['p50_us']:.1f}",
            f"{r['p99_us']:.1f}", "yes" if r["under_1ms"] else "NO",
        )  # fmt: skip
    Console(width=120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
