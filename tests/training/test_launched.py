"""Jobs whose processes a launcher starts, run for real on this machine with gloo.

- Two "nodes" through env:// rendezvous: two `dlpipe train` processes with MASTER_ADDR,
  MASTER_PORT, WORLD_SIZE, RANK, NODE_RANK and LOCAL_RANK set as torchrun or a Kubernetes
  Indexed Job sets them, `training.num_nodes=2`, one process per node.
- FSDP on two CPU processes started by torchrun, against one process over the same samples.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dlpipe.config import PipelineConfig, save_config
from dlpipe.training import train
from dlpipe.training.checkpoint import verify_checkpoint

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "NODE_RANK", "LOCAL_RANK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    env.pop("MLFLOW_REGISTRY_URI", None)
    env.update(extra)
    return env


def finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process; kills all of them on a timeout."""
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            out.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return out


def test_two_nodes_through_env_rendezvous_register_one_version(
    fmnist_config: Callable[..., PipelineConfig], tmp_path: Path
) -> None:
    cfg = fmnist_config("training.num_nodes=2")  # one process per node, on the CPU
    config_file = tmp_path / "two_nodes.yaml"
    save_config(cfg, config_file)
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = job_env(
            tmp_path,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            WORLD_SIZE="2",
            RANK=str(node),
            NODE_RANK=str(node),
            LOCAL_RANK="0",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dlpipe.cli", "train", "-c", str(config_file), "--json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=tmp_path,
                text=True,
            )
        )
    results = finish(procs, timeout=300)
    for node, (code, _, err) in enumerate(results):
        assert code == 0, f"node {node} failed:\n{err[-3000:]}"
    rank0, rank1 = (json.loads(stdout) for _, stdout, _ in results)
    assert rank0["model_version"] == "1"
    assert rank1["model_version"] is None and rank1["run_id"] == rank0["run_id"]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    versions = client.search_model_versions(f"name='{rank0['model_name']}'")
    assert [str(v.version) for v in versions] == ["1"]  # rank 0 alone registered
    experiment = client.get_experiment_by_name(cfg.training.experiment_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [rank0["run_id"]]  # and opened the only run
    assert runs[0].data.params["training.num_nodes"] == "2"
    assert [m.step for m in client.get_metric_history(rank0["run_id"], "val/acc")] == [0]
    # 256 samples, 64 per process and batch, 2 nodes: each step consumes 128 samples, so one
    # epoch is 2 optimizer steps (one process alone would take 4).
    last = Path(rank0["checkpoint"]).with_name("last.ckpt")
    assert verify_checkpoint(last) is None
    assert torch.load(last, weights_only=True)["global_step"] == 2


# Same samples and the same global batch (64 = 2 x 32) for both runs; no augmentation, so only
# the order in which the samples are drawn differs between one process and the two shards.
FSDP_RUN = (
    "data.limit_train_samples=4096",
    "data.limit_eval_samples=1000",
    "preprocessing.augment=false",
    "training.num_epochs=3",
    "training.precision=32",
)


def test_fsdp_on_two_cpu_processes_matches_one_process(
    fmnist_config: Callable[..., PipelineConfig], tmp_path: Path, tmp_mlflow_uri: str
) -> None:
    single = train(fmnist_config(*FSDP_RUN, "training.batch_size=64"))

    cfg = fmnist_config(
        *FSDP_RUN,
        "training.batch_size=32",
        "training.strategy=fsdp",
        "training.num_processes=2",
        f"training.checkpoint_dir={tmp_path / 'fsdp'}",
    )
    config_file = tmp_path / "fsdp.yaml"
    save_config(cfg, config_file)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*torchrun, "--nproc-per-node=2", "-m", "dlpipe.cli", "train"]
    proc = subprocess.Popen(
        [*command, "-c", str(config_file), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=job_env(tmp_path, MLFLOW_TRACKING_URI=tmp_mlflow_uri),
        cwd=tmp_path,
        text=True,
    )
    [(code, stdout, err)] = finish([proc], timeout=600)
    assert code == 0, err[-3000:]
    reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    [sharded] = [r for r in reports if r["model_version"] is not None]
    assert sharded["model_version"] == "2"  # after the single-process run's version 1

    single_acc, sharded_acc = single.metrics["test/acc"], sharded["metrics"]["test/acc"]
    print(f"test/acc: one process {single_acc:.4f}, FSDP on 2 CPU processes {sharded_acc:.4f}")
    assert single_acc > 0.7  # both learned: a broken run sits near 0.1
    assert abs(sharded_acc - single_acc) <= 0.01
    params = MlflowClient(tmp_mlflow_uri).get_run(sharded["run_id"]).data.params
    assert params["training.strategy"] == "fsdp"
