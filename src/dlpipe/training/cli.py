"""`dlpipe train`: train, test, log and register one model.

    dlpipe train -c configs/fashion_mnist.yaml -o training.num_epochs=3 --json
    dlpipe train --resume checkpoints/fashion_mnist/<run>/last.ckpt
    dlpipe train -c configs/fashion_mnist_keras.yaml           # Keras 3 on TensorFlow
    dlpipe train --resume checkpoints/fashion_mnist_keras/<run>/last.keras

A `.keras` checkpoint resumes a Keras run (`model.framework: tensorflow`), any other file a
PyTorch one; `train()` sends each config to its framework. Config errors (and an unusable
`--resume` file without `-c`, or one of the other framework than `-c` names) print one line
and exit 2 before any work starts; a training run that fails exits 1. With `--json` stdout
holds one JSON object: {"run_id", "model_name", "model_version", "metrics", "checkpoint"}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dlpipe.cli_support import (
    CommandParser,
    Outcome,
    UsageError,
    add_config_flags,
    add_json_flag,
    add_tracking_flag,
    as_usage_error,
    run_command,
)
from dlpipe.config import (
    ConfigError,
    PipelineConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="dlpipe train", description="Train a model (one process, DDP or Ray) and register it."
    )
    add_config_flags(parser)
    parser.add_argument(
        "--resume", metavar="CHECKPOINT", help="resume from a checkpoint (its config unless -c)"
    )
    add_tracking_flag(parser)
    add_json_flag(parser, "the run id, model version, test metrics and checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dlpipe train`; returns the exit status."""
    return run_command(build_parser(), train_job, argv)


def train_job(args: argparse.Namespace) -> Outcome:
    """Check the config and the machine, then train (every failure after that is the job's)."""
    from dlpipe.training.devices import check_devices
    from dlpipe.training.train import train

    with as_usage_error(ConfigError):
        cfg = _resolve_config(args)
        if args.tracking_uri:
            cfg.tracking.tracking_uri = args.tracking_uri
        check_devices(cfg.training)
    start = time.perf_counter()
    result = train(cfg, resume_from=args.resume)
    seconds = time.perf_counter() - start
    payload = {
        "run_id": result.run_id,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "metrics": result.metrics,
        "checkpoint": result.checkpoint,
    }
    return Outcome(payload, lambda console: _summary_table(console, result, seconds))


def _is_keras_checkpoint(path: str) -> bool:
    return Path(path).suffix == ".keras"


def _resolve_config(args: argparse.Namespace) -> PipelineConfig:
    """The config from -c, or else the one stored in the --resume checkpoint; then -o."""
    if args.config:
        cfg = load_config(args.config, args.override)
        if args.resume and _is_keras_checkpoint(args.resume) != (
            cfg.model.framework == "tensorflow"
        ):
            kind = "a Keras" if _is_keras_checkpoint(args.resume) else "a PyTorch"
            raise ConfigError(
                f"--resume {args.resume} is {kind} checkpoint but the config's model.framework "
                f"is {cfg.model.framework!r}; resume with the config of the run that wrote it"
            )
        return cfg
    if not args.resume:
        raise ConfigError("give a config with -c CONFIG.yaml (or --resume CHECKPOINT)")
    if _is_keras_checkpoint(args.resume):
        from dlpipe.training.keras_checkpoint import KerasCheckpointError
        from dlpipe.training.keras_fit import config_from_keras_checkpoint

        try:
            stored_cfg = config_from_keras_checkpoint(args.resume)
        except KerasCheckpointError as err:  # missing, corrupt, or not written by dlpipe
            raise UsageError(str(err)) from err
        return config_from_dict(apply_overrides(stored_cfg.model_dump(mode="json"), args.override))
    from dlpipe.training.checkpoint import config_from_checkpoint, load_verified_checkpoint

    try:
        _, contents = load_verified_checkpoint(args.resume)
    except (OSError, RuntimeError) as err:  # missing, corrupt or hostile: no config to read
        raise UsageError(str(err)) from err
    stored = config_from_checkpoint(contents)
    if stored is None:
        raise ConfigError(f"{args.resume} holds no dlpipe config; pass it with -c CONFIG.yaml")
    return config_from_dict(apply_overrides(stored, args.override))


def _summary_table(console: Console, result: Any, seconds: float) -> None:
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
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
