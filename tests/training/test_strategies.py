"""Every requested device is used: what Lightning receives for auto / ddp / fsdp / deepspeed.

A CPU machine cannot build a GPU Trainer, so the GPU cases check `trainer_kwargs()` (exactly what
`lightning_trainer()` hands to `pl.Trainer`), with the device count injected; the CPU cases build
the real Trainer and read its strategy back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

from dlpipe.config import ConfigError, PipelineConfig, load_config
from dlpipe.training.devices import check_devices, launched_rank, process_plan
from dlpipe.training.strategies import PROCESS_GROUP_TIMEOUT, ShardedDataParallel
from dlpipe.training.trainer import DistributedTrainer

# What torchrun / a Kubernetes Job sets for the process on the second node.
LAUNCHED = {
    "MASTER_ADDR": "10.0.0.1",
    "MASTER_PORT": "29500",
    "WORLD_SIZE": "8",
    "RANK": "4",
    "NODE_RANK": "1",
    "LOCAL_RANK": "0",
}


@pytest.fixture(autouse=True)
def not_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start outside any launcher unless they set one up."""
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


def config(tmp_path: Path, *overrides: str) -> PipelineConfig:
    return load_config(
        None, ["training.progress_bar=false", f"training.checkpoint_dir={tmp_path}", *overrides]
    )


def four_gpus() -> int:
    return 4


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("auto", DDPStrategy), ("ddp", DDPStrategy), ("fsdp", ShardedDataParallel)],
)
def test_four_gpus_use_all_four_for_every_strategy(
    tmp_path: Path, strategy: str, expected: type
) -> None:
    cfg = config(tmp_path, "training.num_gpus=4", f"training.strategy={strategy}")
    kwargs = DistributedTrainer(cfg, device_count=four_gpus).trainer_kwargs()
    assert kwargs["accelerator"] == "gpu"
    assert kwargs["devices"] == 4 and kwargs["num_nodes"] == 1
    built = kwargs["strategy"]
    assert type(built) is expected
    assert built.process_group_backend == "nccl"
    if isinstance(built, DDPStrategy):
        # dlpipe starts the 4 processes itself: spawn, not re-running the command line
        # (DDPStrategy has no public reader for either setting).
        assert built._start_method == "spawn"
        assert built._timeout == PROCESS_GROUP_TIMEOUT
    else:
        assert built.sharding_strategy.name == "FULL_SHARD"


def test_deepspeed_gets_all_gpus_and_the_zero_stage(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed", reason="dlpipe[deepspeed] is not installed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    cfg = config(
        tmp_path,
        "training.num_gpus=4",
        "training.strategy=deepspeed",
        "training.deepspeed_stage=3",
        "training.precision=16-mixed",
    )
    kwargs = DistributedTrainer(cfg, device_count=four_gpus).trainer_kwargs()
    assert (kwargs["accelerator"], kwargs["devices"], kwargs["num_nodes"]) == ("gpu", 4, 1)
    assert isinstance(kwargs["strategy"], DeepSpeedStrategy)
    assert kwargs["strategy"].config["zero_optimization"]["stage"] == 3
    assert kwargs["precision"] == "16-mixed"


def test_deepspeed_needs_gpus(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"deepspeed.*num_gpus"):
        config(tmp_path, "training.strategy=deepspeed")


def test_one_gpu_auto_stays_one_process(tmp_path: Path) -> None:
    cfg = config(tmp_path, "training.num_gpus=1")
    kwargs = DistributedTrainer(cfg, device_count=four_gpus).trainer_kwargs()
    assert (kwargs["devices"], kwargs["strategy"]) == (1, "auto")


def test_launched_multi_node_job_joins_the_launchers_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in LAUNCHED.items():
        monkeypatch.setenv(name, value)
    cfg = config(tmp_path, "training.num_gpus=4", "training.num_nodes=2")
    check_devices(cfg.training, device_count=four_gpus)  # 2 nodes x 4 GPUs = WORLD_SIZE 8
    assert launched_rank() == 4
    kwargs = DistributedTrainer(cfg, device_count=four_gpus).trainer_kwargs()
    assert (kwargs["devices"], kwargs["num_nodes"]) == (4, 2)
    # torchrun made the processes: Lightning must only join them, never start more.
    assert kwargs["strategy"]._start_method == "popen"


def test_check_devices_uses_the_injected_count(tmp_path: Path) -> None:
    cfg = config(tmp_path, "training.num_gpus=4")
    check_devices(cfg.training, device_count=four_gpus)
    with pytest.raises(ConfigError, match=r"num_gpus=4 but 2 CUDA"):
        check_devices(cfg.training, device_count=lambda: 2)


def test_training_starts_with_the_machine_check(tmp_path: Path) -> None:
    cfg = config(tmp_path, "training.num_gpus=4")
    runner = DistributedTrainer(cfg, device_count=lambda: 0)
    with pytest.raises(ConfigError, match="num_gpus=4 but 0"):
        runner.train(None, None)  # type: ignore[arg-type]  # refused before touching them


def test_multi_node_needs_a_launcher(tmp_path: Path) -> None:
    cfg = config(tmp_path, "training.num_nodes=2")
    with pytest.raises(ConfigError, match=r"num_nodes=2.*torchrun, srun or a Kubernetes Job"):
        check_devices(cfg.training, environ={})


def test_launcher_world_size_must_match_the_config(tmp_path: Path) -> None:
    cfg = config(tmp_path, "training.num_nodes=2", "training.num_processes=2")
    with pytest.raises(ConfigError, match=r"launcher started 8 process.*makes 4"):
        check_devices(cfg.training, environ=LAUNCHED)
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_JOB_NAME": "train"}
    check_devices(cfg.training, environ=slurm)
    assert launched_rank(slurm) == 3
    # An interactive allocation's shell is not a task of srun.
    assert not process_plan(cfg.training, {**slurm, "SLURM_JOB_NAME": "bash"}).external


def test_ray_leaves_gpus_and_nodes_to_the_cluster(tmp_path: Path) -> None:
    cfg = config(tmp_path, "training.strategy=ray", "training.num_gpus=8")
    check_devices(cfg.training, device_count=lambda: 0)  # the driver needs no GPU
    with pytest.raises(ConfigError, match="keep num_nodes=1"):
        config(tmp_path, "training.strategy=ray", "training.num_nodes=2")
    with pytest.raises(ConfigError, match=r"storage_path.*needs strategy 'ray'"):
        config(tmp_path, "training.storage_path=s3://bucket/runs")


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [("auto", DDPStrategy), ("ddp", DDPStrategy), ("fsdp", FSDPStrategy)],
)
def test_cpu_processes_build_a_real_trainer_with_all_of_them(
    tmp_path: Path, strategy: str, expected: type
) -> None:
    cfg = config(tmp_path, "training.num_processes=2", f"training.strategy={strategy}")
    trainer = DistributedTrainer(cfg).lightning_trainer()
    assert isinstance(trainer.strategy, expected)
    assert trainer.num_devices == 2 and trainer.num_nodes == 1
    assert trainer.strategy.process_group_backend == "gloo"


def test_one_cpu_process_is_a_single_device_trainer(tmp_path: Path) -> None:
    trainer = DistributedTrainer(config(tmp_path)).lightning_trainer()
    assert isinstance(trainer.strategy, SingleDeviceStrategy)


def test_gradient_accumulation_and_precision_reach_lightning(
    fmnist_config: Callable[..., PipelineConfig],
) -> None:
    cfg = fmnist_config("training.accumulate_grad_batches=4", "training.precision=bf16-mixed")
    trainer = DistributedTrainer(cfg).lightning_trainer()
    assert trainer.accumulate_grad_batches == 4
    assert trainer.precision == "bf16-mixed"
