"""Real multi-process training: DDP (2 processes, gloo) end to end, a killed rank, and Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dlpipe.config import PipelineConfig, save_config
from dlpipe.training import train
from dlpipe.training.checkpoint import verify_checkpoint

pytestmark = [pytest.mark.ddp, pytest.mark.slow]


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the direct children of `pid`, from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid:
            out.append((int(entry.name), cmdline))
    return out


def test_ddp_two_processes_end_to_end(
    fmnist_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    cfg = fmnist_config(
        "training.strategy=ddp", "training.num_processes=2", "training.num_epochs=2"
    )
    result = train(cfg)
    assert result.model_version == "1"
    assert 0.0 < result.metrics["test/acc"] <= 1.0
    client = MlflowClient(tmp_mlflow_uri)
    # Rank 0 alone logged: exactly one value per epoch.
    history = client.get_metric_history(result.run_id, "val/acc")
    assert sorted(m.step for m in history) == [0, 1]
    # 256 samples, 64 per process and batch, 2 processes: 2 optimizer steps per epoch.
    last = Path(result.checkpoint or "").with_name("last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 4
    for ckpt in (Path(result.checkpoint or ""), last):  # rank 0 wrote them through the plugin
        assert verify_checkpoint(ckpt) is None, ckpt


def test_killed_rank_ends_the_whole_job_quickly(
    fmnist_config: Callable[..., PipelineConfig], tmp_path: Path
) -> None:
    cfg = fmnist_config(
        "training.strategy=ddp",
        "training.num_processes=2",
        "training.num_epochs=1000",
        "data.limit_train_samples=512",
    )
    config_file = tmp_path / "ddp.yaml"
    save_config(cfg, config_file)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env["OMP_NUM_THREADS"] = "1"
    job = subprocess.Popen(
        [sys.executable, "-m", "dlpipe.cli", "train", "-c", str(config_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
        text=True,
    )
    try:
        # Wait until training is under way: a first checkpoint exists.
        deadline = time.monotonic() + 240
        while not list(Path(cfg.training.checkpoint_dir).rglob("last.ckpt")):
            assert job.poll() is None, job.stderr.read() if job.stderr else ""
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        ranks = [pid for pid, cmd in _children(job.pid) if "spawn_main" in cmd]
        assert len(ranks) == 2, _children(job.pid)
        os.kill(max(ranks), signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = job.communicate(timeout=90)
        took = time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0
    assert took < 60, f"the job took {took:.0f} s to stop after a rank died"
    last_line = err.strip().splitlines()[-1]
    assert "died" in last_line and "whole job was stopped" in last_line
    assert not [pid for pid, cmd in _children(job.pid) if "spawn_main" in cmd]


def test_ray_two_workers_train_register_and_take_the_model_from_shared_storage(
    fmnist_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str, tmp_path: Path
) -> None:
    # One Ray run (a local cluster costs ~30 s and 3 GiB) checks both the training contract
    # and `training.storage_path`: the driver takes the model from Ray's storage, never from
    # the workers' disks (on a cluster, rank 0's disk is another machine's).
    pytest.importorskip("ray.train.lightning", reason="ray[train] is not installed")
    from dlpipe.training.ray_fit import OUTCOME_FILE

    shared = tmp_path / "nfs" / "ray"  # stands for a mount every node shares
    cfg = fmnist_config(
        "training.strategy=ray", "training.num_processes=2", f"training.storage_path={shared}"
    )
    result = train(cfg)
    assert result.model_version == "1"
    assert 0.0 < result.metrics["test/acc"] <= 1.0
    run = MlflowClient(tmp_mlflow_uri).get_run(result.run_id)
    assert run.data.params["training.strategy"] == "ray"
    assert "val/acc" in run.data.metrics and run.data.metrics["data/skipped_samples"] == 0
    # The workers wrote through ChecksummedCheckpointIO: every checkpoint has a matching sidecar.
    run_dir = Path(cfg.training.checkpoint_dir) / result.run_id
    files = sorted(run_dir.glob("*.ckpt"))
    assert run_dir / "last.ckpt" in files and Path(result.checkpoint or "") in files
    for ckpt in files:
        assert verify_checkpoint(ckpt) is None, ckpt
    reported = sorted(shared.rglob(OUTCOME_FILE))
    assert len(reported) == 1, reported  # rank 0's final report, in the shared storage
    stored = reported[0].parent / Path(result.checkpoint or "").name
    assert stored.is_file() and verify_checkpoint(stored) is None
    # The driver's copy is byte for byte the reported one, and verified.
    local = Path(result.checkpoint or "")
    assert local.read_bytes() == stored.read_bytes() and verify_checkpoint(local) is None
