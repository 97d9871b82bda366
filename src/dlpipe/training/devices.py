"""Checks of a training config against this machine, run where a job starts (never in the schema).

    plan = process_plan(cfg.training)    # how many processes, where, with which strategy
    check_devices(cfg.training)          # ConfigError when the machine cannot run it

Who starts the processes:

- one process, or DDP on one machine: dlpipe itself (Lightning's spawn launcher);
- a launcher (`torchrun`, `srun`, a Kubernetes Job setting MASTER_ADDR / MASTER_PORT /
  WORLD_SIZE / RANK / NODE_RANK / LOCAL_RANK): every process runs `dlpipe train` and they meet
  through env:// rendezvous. Required for `num_nodes > 1`; FSDP and DeepSpeed started without
  one re-run the same command once per extra local process (Lightning's script launcher).

The device count is a parameter (`device_count=`), so the plan for a 4-GPU job can be built and
checked on a machine without GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from dlpipe.config import ConfigError, TrainingConfig

Strategy = Literal["single", "ddp", "fsdp", "deepspeed", "ray"]


def cuda_device_count() -> int:
    """CUDA devices torch sees here (0 without a GPU or a CUDA build)."""
    import torch

    return int(torch.cuda.device_count())


def slurm_managed(environ: Mapping[str, str]) -> bool:
    """This process is one task of `srun` (Lightning's `SLURMEnvironment.detected` rule: an
    interactive `salloc` shell named bash is not)."""
    return "SLURM_NTASKS" in environ and environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


def launched_externally(environ: Mapping[str, str] | None = None) -> bool:
    """Whether a launcher (torchrun, srun, a Kubernetes Job) started this process as one rank of
    a job: it then must not start processes of its own."""
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env or slurm_managed(env)


def launched_rank(environ: Mapping[str, str] | None = None) -> int:
    """This process's global rank as the launcher set it (0 when not launched as a rank)."""
    env = os.environ if environ is None else environ
    if not launched_externally(env):
        return 0
    for name in ("RANK", "SLURM_PROCID"):
        if name in env:
            return int(env[name])
    # A launcher that sets only NODE_RANK and LOCAL_RANK: Lightning's own rule.
    local = int(env.get("LOCAL_RANK", "0"))
    per_node = int(env.get("LOCAL_WORLD_SIZE", "1"))
    return int(env.get("NODE_RANK", env.get("GROUP_RANK", "0"))) * per_node + local


@dataclass(frozen=True)
class ProcessPlan:
    """How a training config runs: processes per node, nodes, strategy and who launches."""

    accelerator: Literal["gpu", "cpu"]
    devices: int
    """Processes on each node (one per GPU on GPUs)."""
    num_nodes: int
    strategy: Strategy
    external: bool
    """Started by torchrun / srun / a Kubernetes Job rather than by dlpipe."""

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def process_plan(training: TrainingConfig, environ: Mapping[str, str] | None = None) -> ProcessPlan:
    """The process layout `training` asks for: every requested GPU (or CPU process) is used, with
    DDP unless the config names another strategy."""
    per_node = training.num_gpus if training.num_gpus > 0 else training.num_processes
    accelerator: Literal["gpu", "cpu"] = "gpu" if training.num_gpus > 0 else "cpu"
    strategy: Strategy
    if training.strategy == "auto":
        strategy = "ddp" if per_node * training.num_nodes > 1 else "single"
    else:
        strategy = training.strategy
    return ProcessPlan(
        accelerator, per_node, training.num_nodes, strategy, launched_externally(environ)
    )


def _launcher_world_size(env: Mapping[str, str]) -> int | None:
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if name in env:
            return int(env[name])
    return None


def check_devices(
    training: TrainingConfig,
    device_count: Callable[[], int] = cuda_device_count,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Refuse a job this machine (or its launcher) cannot run, naming the key and what is there.

    Args:
        device_count: CUDA devices on this node (tests pass their own).
        environ: the process environment (default `os.environ`).
    """
    env = os.environ if environ is None else environ
    plan = process_plan(training, env)
    if plan.strategy == "ray":
        return  # the workers' GPUs are on the Ray cluster, which schedules and checks them
    if training.num_gpus > 0:
        available = device_count()
        if training.num_gpus > available:
            raise ConfigError(
                f"training.num_gpus={training.num_gpus} but {available} CUDA device(s) are "
                "available on this machine"
            )
    if plan.num_nodes > 1 and not plan.external:
        raise ConfigError(
            f"training.num_nodes={plan.num_nodes}: start {plan.devices} process(es) on each node "
            "with torchrun, srun or a Kubernetes Job (env:// rendezvous: MASTER_ADDR, "
            "MASTER_PORT, WORLD_SIZE, RANK, NODE_RANK, LOCAL_RANK); see docs/training.md"
        )
    launched = _launcher_world_size(env) if plan.external else None
    if launched is not None and launched != plan.world_size:
        raise ConfigError(
            f"the launcher started {launched} process(es) but training.num_nodes="
            f"{plan.num_nodes} x {plan.devices} process(es) per node (num_gpus, else "
            f"num_processes) makes {plan.world_size}; make them agree"
        )
