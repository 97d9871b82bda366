"""`dlpipe optimize NAME[@alias|:version] --targets onnx,int8,fp16,pruned[,tensorrt]`.

    dlpipe optimize fashion_mnist_cnn@champion --targets onnx,int8,fp16 --max-accuracy-drop 0.01

Prints one row per variant (size, accuracy, drop, p50 latency, registered version or why it was
refused/skipped). With `--json` the last stdout line is the whole report as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from dlpipe.optimize.variants import TARGETS, OptimizationReport, parse_targets

_REF = re.compile(r"^(?P<name>[^@:]+)(?:@(?P<alias>[\w.-]+)|:(?P<version>\d+))?$")


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """`name`, `name@alias` or `name:version` -> (name, version or alias or None)."""
    match = _REF.match(ref.strip())
    if not match:
        raise ValueError(f"model reference {ref!r} must look like NAME, NAME@alias or NAME:version")
    return match["name"], match["alias"] or match["version"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlpipe optimize", description=__doc__.splitlines()[0])
    p.add_argument("model", help="NAME, NAME@alias or NAME:version of a registered model")
    p.add_argument(
        "--targets",
        default=None,
        help=f"comma-separated subset of {','.join(TARGETS)} (default: the model's config)",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        help="0.01 = 1 point (default: the model's config, usually 0.01)",
    )
    p.add_argument("--calibration-samples", type=int, default=None)
    p.add_argument("--limit-eval-samples", type=int, default=None, help="cap the test split")
    p.add_argument("--registry-uri", default=None, help="default: MLFLOW_REGISTRY_URI")
    p.add_argument("--dry-run", action="store_true", help="build and gate, register nothing")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurements")
    p.add_argument("--json", action="store_true", help="last stdout line: the report as JSON")
    return p


def render_table(report: OptimizationReport) -> None:
    """Print the report as a rich table."""
    from rich.console import Console
    from rich.table import Table

    title = f"{report.model_name} v{report.parent_version}: {report.test_samples} test samples"
    table = Table(title=title)
    for col in ("variant", "precision", "size MB", "accuracy", "drop (pts)", "p50 ms", "result"):
        table.add_column(col)
    base = report.baseline_latency
    table.add_row(
        "pytorch (parent)", "fp32", f"{report.baseline_size_mb:.3f}",
        f"{report.baseline_accuracy:.4f}", "-", f"{base.p50_ms:.2f}" if base else "-",
        f"version {report.parent_version}",
    )  # fmt: skip
    for v in report.variants:
        if v.status == "kept":
            result = f"registered v{v.version}" if v.version else "passed (not registered)"
        elif v.status == "refused":
            result = f"refused: dropped {(v.drop or 0) * 100:.1f} points"
        elif v.status == "skipped":
            result = v.reason
        else:
            result = f"{v.status}: {v.reason}"
        table.add_row(
            v.target, v.precision,
            f"{v.size_mb:.3f}" if v.size_mb is not None else "-",
            f"{v.accuracy:.4f}" if v.accuracy is not None else "-",
            f"{v.drop * 100:.2f}" if v.drop is not None else "-",
            f"{v.latency.p50_ms:.2f}" if v.latency else "-",
            result,
        )  # fmt: skip
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dlpipe optimize`; returns the exit status."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        name, version = parse_model_ref(args.model)
        targets = parse_targets(args.targets) if args.targets else None
        if args.max_accuracy_drop is not None and not 0.0 <= args.max_accuracy_drop <= 1.0:
            raise ValueError("--max-accuracy-drop must be within [0, 1] (0.01 = 1 point)")
        from dlpipe.optimize.variants import optimize_version
        from dlpipe.tracking.registry import ModelRegistry

        registry = ModelRegistry(args.registry_uri)
        report = optimize_version(
            name, version, targets, args.max_accuracy_drop, registry=registry,
            register=not args.dry_run, calibration_samples=args.calibration_samples,
            limit_eval_samples=args.limit_eval_samples, measure=not args.no_latency,
        )  # fmt: skip
    except Exception as err:  # one clear line, no traceback (contract of every subcommand)
        print(f"dlpipe optimize: error: {err}".splitlines()[0], file=sys.stderr)
        return 1
    render_table(report)
    if args.json:
        print(json.dumps(_json_safe(report.to_dict())))
    failed = [v for v in report.variants if v.status == "failed"]
    return 2 if failed and len(failed) == len(report.variants) else 0


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
