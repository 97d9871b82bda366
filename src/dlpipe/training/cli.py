"""`dlpipe train`: train, test, log and register one model.

    dlpipe train -c configs/fashion_mnist.yaml -o training.num_epochs=3 --json
    dlpipe train --resume checkpoints/fashion_mnist/<run>/last.ckpt

Config errors print one line and exit 2 before any work starts. With `--json` the last line of
stdout is one JSON object: {"run_id", "model_name", "model_version", "metrics", "checkpoint"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from dlpipe.config import (
    ConfigError,
    PipelineConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlpipe train", description="Train a model (one process, DDP or Ray) and register it."
    )
    parser.add_argument("-c", "--config", help="YAML config (see configs/)")
    parser.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. -o training.num_epochs=3 (repeatable)",
    )
    parser.add_argument("--resume", metavar="CHECKPOINT", help="resume from a checkpoint")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON line")
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _resolve_config(args: argparse.Namespace) -> PipelineConfig:
    """The config from -c, or else the one stored in the --resume checkpoint; then -o."""
    if args.config:
        return load_config(args.config, args.override)
    if not args.resume:
        raise ConfigError("give a config with -c CONFIG.yaml (or --resume CHECKPOINT)")
    from dlpipe.training.checkpoint import config_from_checkpoint, load_verified_checkpoint

    _, contents = load_verified_checkpoint(args.resume)
    stored = config_from_checkpoint(contents)
    if stored is None:
        raise ConfigError(f"{args.resume} holds no dlpipe config; pass it with -c CONFIG.yaml")
    return config_from_dict(apply_overrides(stored, args.override))


def _summary_table(result: Any, seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="dlpipe train", show_header=False)
    table.add_column("item", style="bold")
    table.add_column("value")
    table.add_row("run id", result.run_id)
    table.add_row("model", f"{result.model_name} v{result.model_version or '-'}")
    for key, value in sorted(result.metrics.items()):
        table.add_row(key, f"{value:.4f}")
    table.add_row("best checkpoint", str(result.checkpoint))
    table.add_row("model package", str(result.package_dir))
    table.add_row("wall time", f"{seconds:.1f} s")
    Console(file=sys.stdout, soft_wrap=True).print(table)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dlpipe train`; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = _resolve_config(args)
        from dlpipe.training.devices import check_devices

        check_devices(cfg.training)
    except ConfigError as err:
        print(f"dlpipe train: {_one_line(err)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:  # unreadable --resume checkpoint
        print(f"dlpipe train: {_one_line(err)}", file=sys.stderr)
        return 2

    from dlpipe.training.checkpoint import CheckpointError
    from dlpipe.training.train import train
    from dlpipe.training.trainer import TrainingError

    start = time.perf_counter()
    try:
        result = train(cfg, resume_from=args.resume)
    except (TrainingError, CheckpointError, FileNotFoundError) as err:
        print(f"dlpipe train: error: {_one_line(err)}", file=sys.stderr)
        return 1
    _summary_table(result, time.perf_counter() - start)
    if args.json:
        payload = {
            "run_id": result.run_id,
            "model_name": result.model_name,
            "model_version": result.model_version,
            "metrics": result.metrics,
            "checkpoint": result.checkpoint,
        }
        print(json.dumps(payload), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
