"""SageMaker: the launcher's job as the SDK builds it (offline), and the entry point run for two
hosts on this machine with the environment the SDK's container drivers give each host."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from dlpipe.data.sources import find_fashion_mnist
from dlpipe.sagemaker import cli as sm_cli
from dlpipe.sagemaker.entry import RESULT_FILE
from dlpipe.sagemaker.environment import SageMakerEnvironment

ROOT = Path(__file__).resolve().parents[2]
FASHION_CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/dlpipe-train:0.1.0-cuda"
ROLE = "arn:aws:iam::123456789012:role/SageMakerTraining"
QUICK = [
    "data.limit_train_samples=256",
    "data.limit_eval_samples=128",
    "training.batch_size=64",
    "training.num_epochs=1",
    "training.progress_bar=false",
]


@pytest.fixture
def offline_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """A region and dummy credentials, role checks off, and any HTTP request an error: building
    the job must not reach AWS."""
    pytest.importorskip("sagemaker.train", reason="dlpipe[sagemaker] is not installed")
    import botocore.httpsession

    for name, value in {
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "SAGEMAKER_VALIDATE_ROLE": "false",  # the SDK would ask IAM to simulate the role
    }.items():
        monkeypatch.setenv(name, value)

    def no_network(self: Any, request: Any) -> Any:
        raise AssertionError(f"the launcher tried to reach {request.url}")

    monkeypatch.setattr(botocore.httpsession.URLLib3Session, "send", no_network)


def launcher_args(*extra: str) -> Any:
    argv = ["train", "-c", str(FASHION_CONFIG), "-o", "training.num_epochs=3"]
    argv += ["--instance-type", "ml.g5.12xlarge", "--instance-count", "2"]
    argv += ["--image-uri", IMAGE, "--role", ROLE, "--input", "train=s3://bucket/fashion-mnist"]
    return sm_cli.build_parser().parse_args([*argv, *extra])


def container_env(
    tmp_path: Path, host: str, hosts: list[str], hyperparameters: dict[str, str]
) -> dict[str, str]:
    """The variables the SDK's container driver (`sm_drivers/scripts/environment.py`) exports
    on `host` for these hyperparameters, as CreateTrainingJob stores them (strings)."""
    import sagemaker.train.container_drivers.scripts as drivers

    env_file = tmp_path / f"{host}.env"
    script = textwrap.dedent(f"""
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location(
            "sm_environment", {str(Path(drivers.__file__).with_name("environment.py"))!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        resources = {{"current_host": {host!r}, "current_instance_type": "ml.m5.xlarge",
                      "hosts": {hosts!r}, "network_interface_name": "eth0"}}
        module.set_env(resources, {{"train": {{}}}}, json.loads(sys.argv[1]), {str(env_file)!r})
    """)
    env = {**os.environ, "TRAINING_JOB_NAME": "dlpipe-test"}
    subprocess.run([sys.executable, "-c", script, json.dumps(hyperparameters)], check=True, env=env)
    dumped = subprocess.run(
        ["bash", "-c", f"source {env_file} && env -0"], check=True, capture_output=True
    ).stdout.decode()
    pairs = (item.split("=", 1) for item in dumped.split("\0") if "=" in item)
    return {k: v for k, v in pairs if k.startswith("SM_")}


def test_launcher_builds_the_sdk_job_without_touching_aws(
    offline_aws: None, tmp_path: Path
) -> None:
    from sagemaker.train import ModelTrainer
    from sagemaker.train.utils import safe_serialize

    args = launcher_args(
        "--checkpoint-s3-uri", "s3://bucket/ckpt", "--tracking-uri", "https://mlflow.example.com",
        "--spot", "--max-run-hours", "2", "--output-path", "s3://bucket/output",
    )  # fmt: skip
    sm_cli.check_job(args)
    trainer = sm_cli.build_model_trainer(args, tmp_path)
    assert isinstance(trainer, ModelTrainer)
    assert (trainer.training_image, trainer.role) == (IMAGE, ROLE)
    assert trainer.compute.instance_type == "ml.g5.12xlarge"
    assert trainer.compute.instance_count == 2
    assert trainer.compute.enable_managed_spot_training is True
    assert trainer.stopping_condition.max_runtime_in_seconds == 7200
    assert trainer.stopping_condition.max_wait_time_in_seconds == 14400
    assert trainer.source_code.command == "python -m dlpipe.sagemaker.entry"
    assert (tmp_path / "config.yaml").read_text() == FASHION_CONFIG.read_text()
    assert trainer.environment == {"MLFLOW_TRACKING_URI": "https://mlflow.example.com"}
    [channel] = trainer.input_data_config
    assert (channel.channel_name, channel.data_source) == ("train", "s3://bucket/fashion-mnist")
    assert trainer.checkpoint_config.local_path == "/opt/ml/checkpoints"
    assert trainer.checkpoint_config.s3_uri == "s3://bucket/ckpt"
    assert trainer.output_data_config.s3_output_path == "s3://bucket/output"

    # What the job's hosts will read: the hyperparameters as the SDK serialises them into
    # CreateTrainingJob, through its own container driver, into dlpipe's parser.
    stored = {k: safe_serialize(v) for k, v in trainer.hyperparameters.items()}
    env = container_env(tmp_path, "algo-2", ["algo-1", "algo-2"], stored)
    env["SM_SOURCE_DIR"] = str(tmp_path)
    job = SageMakerEnvironment.from_environ(env)
    assert (job.num_nodes, job.node_rank, job.master_addr) == (2, 1, "algo-1")
    assert job.config == "config.yaml" and job.channels == {
        "train": Path("/opt/ml/input/data/train")
    }
    assert job.overrides == ["training.num_epochs=3", "training.checkpoint_dir=/opt/ml/checkpoints"]


def test_launcher_refuses_a_bad_config_before_submitting(
    offline_aws: None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "-c", str(FASHION_CONFIG), "-o", "training.num_epoch=3"]
    argv += ["--instance-type", "ml.g5.xlarge", "--image-uri", IMAGE]
    assert sm_cli.main(argv) == 2
    assert "training.num_epoch: unknown key" in capsys.readouterr().err


def test_hyperparameters_named_section_key_become_overrides() -> None:
    env = {
        "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1", "SM_MODEL_DIR": "/m",
        "SM_HP_CONFIG": "c.yaml", "SM_HP_TRAINING__NUM_EPOCHS": "4",
        "SM_HP_SAGEMAKER_PROGRAM": "ignored", "MASTER_ADDR": "127.0.0.1",
    }  # fmt: skip
    job = SageMakerEnvironment.from_environ(env)
    assert job.overrides == ["training.num_epochs=4"] and job.master_addr == "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.ddp
def test_entry_point_trains_two_hosts_and_registers_one_version(tmp_path: Path) -> None:
    pytest.importorskip("sagemaker.train", reason="dlpipe[sagemaker] is not installed")
    data = find_fashion_mnist()
    assert data is not None, "Fashion-MNIST IDX files are needed"
    channel = tmp_path / "input" / "data" / "train"  # as SageMaker downloads a channel
    channel.mkdir(parents=True)
    for f in data.iterdir():
        (channel / f.name).symlink_to(f)
    code = tmp_path / "code"
    code.mkdir()
    shutil.copyfile(FASHION_CONFIG, code / "config.yaml")
    hyperparameters = {"config": "config.yaml", "overrides": json.dumps(QUICK)}
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = str(free_port())
    hosts = ["algo-1", "algo-2"]
    procs = []
    for host in hosts:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SM_", "MLFLOW_"))}
        env.update(container_env(tmp_path, host, hosts, hyperparameters))
        env.update(
            SM_MODEL_DIR=str(tmp_path / host / "model"),  # /opt/ml/... relocated per host
            SM_OUTPUT_DATA_DIR=str(tmp_path / host / "output"),
            SM_CHANNEL_TRAIN=str(channel),
            SM_SOURCE_DIR=str(code),
            SM_NUM_GPUS="0",
            MASTER_ADDR="127.0.0.1",  # the documented override: both "hosts" are this one
            MASTER_PORT=port,
            MLFLOW_TRACKING_URI=tracking,
            OMP_NUM_THREADS="1",
        )
        command = [sys.executable, "-m", "dlpipe.sagemaker.entry"]
        procs.append(
            subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=code,
                text=True,
            )
        )
    try:
        logs = [proc.communicate(timeout=400)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for host, proc, log in zip(hosts, procs, logs, strict=True):
        assert proc.returncode == 0, f"{host}:\n{log[-4000:]}"
    assert "node 1 of 2" in logs[1]

    model_dir = tmp_path / "algo-1" / "model"
    summary = json.loads((model_dir / RESULT_FILE).read_text())
    assert summary["model_version"] == "1"
    for name in ("MLmodel", "weights.pt", "config.yaml", "preprocessing.json"):
        assert (model_dir / name).is_file(), name
    assert not (tmp_path / "algo-2" / "model").exists() or not any(
        (tmp_path / "algo-2" / "model").iterdir()
    )
    client = MlflowClient(tracking)
    assert [str(v.version) for v in client.search_model_versions("name='fashion_mnist_cnn'")] == [
        "1"
    ]
    params = client.get_run(summary["run_id"]).data.params
    assert params["training.num_nodes"] == "2" and params["data.path"] == str(channel)
    checkpoints = tmp_path / "algo-1" / "output" / "checkpoints" / summary["run_id"]
    # 256 samples in batches of 64 over 2 hosts: 2 optimizer steps (4 on one host alone).
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
