"""`dlpipe optimize NAME[@alias|:version] --targets onnx,int8,fp16,pruned[,tensorrt]`.

    dlpipe optimize fashion_mnist_cnn@champion --targets onnx,int8,fp16 --max-accuracy-drop 0.01

Shows a bar per variant on stderr while it works, then one row per variant (size, accuracy,
drop, p50 latency, registered version or why it was refused/skipped). With `--json` stdout
holds the whole report as one JSON object. Exit 1 when a variant could not be built (the report
still prints); a variant the accuracy gate refuses is a result, not a failure.
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from dlpipe.cli_progress import StepProgress
from dlpipe.cli_support import (
    EXIT_FAILED,
    EXIT_OK,
    CommandParser,
    Outcome,
    add_field_flag,
    add_json_flag,
    add_tracking_flag,
    parse_model_ref,
    run_command,
    show_download_progress,
)
from dlpipe.config import DataConfig, OptimizeConfig
from dlpipe.optimize.variants import TARGETS, OptimizationReport

__all__ = ["OPTIMIZE_STEPS", "build_parser", "main", "parse_model_ref", "render_table"]

OPTIMIZE_STEPS = {
    "parent": ("download", "evaluate", "time"),
    "*": ("build", "evaluate", "time", "register"),
}
"""The steps `optimize_version` reports for the parent and for each variant."""

_FROM_CONFIG = "default: the model's stored config"


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="dlpipe optimize", description=__doc__.splitlines()[0])
    p.add_argument("model", help="NAME, NAME@alias or NAME:version of a registered model")
    add_field_flag(
        p, OptimizeConfig, "targets", help_text=f"subset of {','.join(TARGETS)}",
        default_text=_FROM_CONFIG,
    )  # fmt: skip
    add_field_flag(
        p, OptimizeConfig, "max_accuracy_drop", help_text="largest accuracy loss; 0.01 = 1 point",
        default_text=_FROM_CONFIG,
    )  # fmt: skip
    add_field_flag(
        p, OptimizeConfig, "calibration_samples", help_text="INT8 calibration samples",
        default_text=_FROM_CONFIG,
    )  # fmt: skip
    add_field_flag(p, DataConfig, "limit_eval_samples", default_text="default: the whole split")
    add_tracking_flag(p)
    p.add_argument("--dry-run", action="store_true", help="build and gate, register nothing")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurements")
    add_json_flag(p, "the report")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dlpipe optimize`; returns the exit status."""
    return run_command(build_parser(), optimize_job, argv)


def optimize_job(args: argparse.Namespace) -> Outcome:
    name, version = parse_model_ref(args.model)
    from dlpipe.optimize.variants import optimize_version
    from dlpipe.tracking.registry import ModelRegistry

    show_download_progress()
    with StepProgress("dlpipe optimize", OPTIMIZE_STEPS) as progress:
        report = optimize_version(
            name, version, args.targets, args.max_accuracy_drop,
            registry=ModelRegistry(args.tracking_uri), register=not args.dry_run,
            calibration_samples=args.calibration_samples,
            limit_eval_samples=args.limit_eval_samples, measure=not args.no_latency,
            progress=progress,
        )  # fmt: skip
    failed = [v.target for v in report.variants if v.status == "failed"]
    return Outcome(
        report.to_dict(),
        lambda console: render_table(report, console),
        status=EXIT_FAILED if failed else EXIT_OK,
        error=f"{len(failed)} of {len(report.variants)} variants failed: {', '.join(failed)}",
    )


def render_table(report: OptimizationReport, console: Console | None = None) -> None:
    """Print the report as a rich table."""
    title = f"{report.model_name} v{report.parent_version}: {report.test_samples} test samples"
    table = Table(title=title)
    for col in ("variant", "precision", "size MB", "accuracy", "drop (pts)", "p50 ms", "result"):
        table.add_column(col)
    base = report.baseline_latency
    table.add_row(
        f"{report.parent_framework} (parent)", "fp32", f"{report.baseline_size_mb:.3f}",
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
    (console or Console(width=160)).print(table)


if __name__ == "__main__":
    sys.exit(main())
