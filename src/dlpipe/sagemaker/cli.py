"""`dlpipe sagemaker train`: run a dlpipe training config as a SageMaker training job.

    dlpipe sagemaker train -c configs/fashion_mnist_resnet18.yaml \\
        --instance-type ml.g5.12xlarge --instance-count 2 \\
        --image-uri 123456789012.dkr.ecr.us-east-1.amazonaws.com/dlpipe-train:0.1.0-cuda \\
        --role arn:aws:iam::123456789012:role/SageMakerTraining \\
        --input train=s3://my-bucket/fashion-mnist/ --tracking-uri https://mlflow.example.com

Built on the `sagemaker` SDK (3.x, `pip install 'dlpipe[sagemaker]'`): its `ModelTrainer`, the
SDK's successor of the framework estimators (3.x has no `PyTorch` estimator class), uploads the
config file as the job's code, and every host runs `python -m dlpipe.sagemaker.entry`, which
starts DDP (or FSDP / DeepSpeed) across the hosts from the SageMaker environment. The image is
a dlpipe training image (`deploy/Dockerfile.cuda` with `EXTRAS=serve,train`): dlpipe pins its
own torch, so the AWS framework images are not used.

The config and `-o` overrides are checked here before anything is submitted (exit 2).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from dlpipe.cli_support import (
    CommandParser,
    Outcome,
    UsageError,
    add_config_flags,
    add_json_flag,
    as_usage_error,
    run_command,
)
from dlpipe.config import ConfigError, load_config

ENTRY_COMMAND = "python -m dlpipe.sagemaker.entry"
CODE_CONFIG = "config.yaml"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="dlpipe sagemaker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    run = sub.add_parser("train", help="submit a training job")
    add_config_flags(run)
    run.add_argument("--instance-type", required=True, help="e.g. ml.g5.12xlarge")
    run.add_argument("--instance-count", type=int, default=1, help="hosts (num_nodes)")
    run.add_argument("--image-uri", required=True, help="a dlpipe training image in ECR")
    run.add_argument("--role", help="execution role ARN (default: the SDK's resolution)")
    run.add_argument(
        "--input", action="append", type=_pair, default=[], metavar="CHANNEL=S3_URI",
        help="an input channel (repeatable); `train` becomes data.path",
    )  # fmt: skip
    run.add_argument("--output-path", help="S3 prefix for model.tar.gz and output.tar.gz")
    run.add_argument("--checkpoint-s3-uri", help="sync checkpoints to this S3 prefix")
    run.add_argument("--tracking-uri", help="MLflow tracking URI the job logs to")
    run.add_argument(
        "--env", action="append", type=_pair, default=[], metavar="NAME=VALUE",
        help="an environment variable for the job (repeatable)",
    )  # fmt: skip
    run.add_argument("--job-name", default="dlpipe", help="base job name")
    run.add_argument("--max-run-hours", type=float, default=24.0)
    run.add_argument("--volume-gb", type=int, default=100, help="EBS volume per host")
    run.add_argument("--spot", action="store_true", help="managed spot training")
    run.add_argument("--no-wait", action="store_true", help="submit and return")
    add_json_flag(run, "the job's name, status and model artifact location")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dlpipe sagemaker`; returns the exit status."""
    return run_command(build_parser(), train_job, argv)


def trainer_arguments(args: argparse.Namespace, code_dir: Path) -> dict[str, Any]:
    """The `ModelTrainer` keyword arguments for `args`, with `code_dir` as the job's code."""
    from sagemaker.train.configs import (
        CheckpointConfig,
        Compute,
        InputData,
        OutputDataConfig,
        SourceCode,
        StoppingCondition,
    )

    overrides = list(args.override)
    environment = dict(args.env)
    if args.tracking_uri:
        environment["MLFLOW_TRACKING_URI"] = args.tracking_uri
    max_run = int(args.max_run_hours * 3600)
    kwargs: dict[str, Any] = {
        "training_image": args.image_uri,
        "base_job_name": args.job_name,
        "source_code": SourceCode(source_dir=str(code_dir), command=ENTRY_COMMAND),
        "compute": Compute(
            instance_type=args.instance_type,
            instance_count=args.instance_count,
            volume_size_in_gb=args.volume_gb,
            enable_managed_spot_training=args.spot or None,
        ),
        "stopping_condition": StoppingCondition(
            max_runtime_in_seconds=max_run,
            # Spot jobs wait for capacity on top of the run time.
            **({"max_wait_time_in_seconds": 2 * max_run} if args.spot else {}),
        ),
        "environment": environment,
        "input_data_config": [
            InputData(channel_name=name, data_source=uri) for name, uri in args.input
        ],
    }
    if args.role:
        kwargs["role"] = args.role
    if args.output_path:
        kwargs["output_data_config"] = OutputDataConfig(s3_output_path=args.output_path)
    if args.checkpoint_s3_uri:
        kwargs["checkpoint_config"] = CheckpointConfig(
            s3_uri=args.checkpoint_s3_uri, local_path=CHECKPOINT_LOCAL_PATH
        )
        overrides.append(f"training.checkpoint_dir={CHECKPOINT_LOCAL_PATH}")
    kwargs["hyperparameters"] = {"config": CODE_CONFIG, "overrides": overrides}
    return kwargs


def check_job(args: argparse.Namespace) -> None:
    """Refuse a config, an override or an instance count the job could not use."""
    if args.instance_count < 1:
        raise UsageError("--instance-count must be at least 1")
    if not args.config:
        raise UsageError("give the training config with -c CONFIG.yaml")
    with as_usage_error(ConfigError):
        cfg = load_config(
            args.config, [*args.override, f"training.num_nodes={args.instance_count}"]
        )
        if cfg.training.strategy == "ray":
            raise ConfigError("training.strategy=ray cannot run as a SageMaker job; use ddp/fsdp")


def build_model_trainer(args: argparse.Namespace, code_dir: Path) -> Any:
    """The SDK's `ModelTrainer` for the job (validated by the SDK; nothing is submitted)."""
    try:
        from sagemaker.train import ModelTrainer
    except ModuleNotFoundError as err:  # [all] leaves the SDK out (it downgrades protobuf)
        raise UsageError(
            "the SageMaker SDK is not installed: pip install 'dlpipe[sagemaker]'"
        ) from err

    shutil.copyfile(args.config, code_dir / CODE_CONFIG)
    return ModelTrainer(**trainer_arguments(args, code_dir))


def train_job(args: argparse.Namespace) -> Outcome:
    check_job(args)
    with tempfile.TemporaryDirectory(prefix="dlpipe-sagemaker-") as code:
        trainer = build_model_trainer(args, Path(code))
        trainer.train(wait=not args.no_wait, logs=not args.no_wait)  # uploads the code dir
    # The SDK's public view of the submitted job: where its output archive lands, which names
    # the job; model.tar.gz sits beside it.
    output = str(trainer.output_data)
    payload = {
        "job_name": output.rstrip("/").split("/")[-3],
        "output_data": output,
        "model_artifacts": output.removesuffix("output.tar.gz") + "model.tar.gz",
        "waited": not args.no_wait,
    }
    return Outcome(payload, lambda console: console.print(payload))


if __name__ == "__main__":
    sys.exit(main())
