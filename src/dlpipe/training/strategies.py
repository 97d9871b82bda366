"""The Lightning strategy for a `ProcessPlan`: DDP, FSDP or DeepSpeed, spawned or launched.

    strategy = build_strategy(process_plan(cfg.training), cfg.training)

- DDP started by dlpipe uses the spawn launcher (works from the CLI, a notebook and tests; a
  worker that dies ends the job); started by torchrun / srun / a Kubernetes Job it only joins the
  group those processes form (env:// rendezvous), never starting processes itself.
- FSDP and DeepSpeed have no spawn launcher in Lightning: started by dlpipe alone they re-run the
  same command once per extra local process (Lightning's script launcher), so they belong on the
  command line (`dlpipe train`, torchrun, srun), not in a notebook.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from dlpipe.config import ConfigError, TrainingConfig
from dlpipe.training.devices import ProcessPlan

# Bounds a collective that waits on a peer that hangs without dying (a dead peer's closed socket
# is noticed at once); generous because rank 0 may spend a while writing a checkpoint, and in a
# launched job rank 0 opens the MLflow run before it joins the group.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=5)


class ShardedDataParallel(FSDPStrategy):
    """Lightning's `FSDPStrategy`, which also runs on CPU processes (gloo).

    On GPUs it is exactly `FSDPStrategy`. On CPUs two things stand in the way, neither of them
    FSDP's own limits: Lightning's accelerator connector refuses the `FSDPStrategy` class itself
    unless the accelerator is a GPU (the check matches the exact class, so a subclass passes),
    and Lightning wraps the module with `device_id=root_device.index`, which is None for a CPU,
    where torch's FSDP then looks for an accelerator and refuses to start. Wrapping the module
    here first with the CPU device named (the public `setup`, before Lightning's own wrap, which
    keeps a module it finds already wrapped) makes FSDP shard on CPU processes as it does on GPUs.
    """

    def setup(self, trainer: pl.Trainer) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self.model
        already = model is not None and any(
            isinstance(m, FullyShardedDataParallel) for m in model.modules()
        )
        if model is not None and self.root_device.type == "cpu" and not already:
            self.model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
        super().setup(trainer)


def allow_locks_in_spawned_workers() -> None:
    """Let spawn pickle objects that hold a threading lock (e.g. a lazily built tokenizer's).

    A spawned worker needs its own fresh lock anyway; this only affects multiprocessing's pickler.
    """
    import threading
    from multiprocessing.reduction import ForkingPickler

    def fresh_lock(lock: Any) -> tuple[Any, tuple[()]]:
        return threading.Lock, ()

    def fresh_rlock(lock: Any) -> tuple[Any, tuple[()]]:
        return threading.RLock, ()

    ForkingPickler.register(type(threading.Lock()), fresh_lock)
    ForkingPickler.register(type(threading.RLock()), fresh_rlock)


def deepspeed_available() -> bool:
    from importlib.util import find_spec

    return find_spec("deepspeed") is not None


def build_strategy(plan: ProcessPlan, training: TrainingConfig) -> Strategy | str:
    """The strategy object (or Lightning's `"auto"` for one process) for `plan`."""
    backend = "nccl" if plan.accelerator == "gpu" else "gloo"
    if plan.strategy == "single":
        return "auto"
    if plan.strategy == "ddp":
        if plan.external:
            # The launcher made the processes: "popen" only joins them (Lightning's script
            # launcher starts nothing when the cluster environment created the processes).
            return DDPStrategy(
                start_method="popen", process_group_backend=backend, timeout=PROCESS_GROUP_TIMEOUT
            )
        allow_locks_in_spawned_workers()
        return DDPStrategy(
            start_method="spawn", process_group_backend=backend, timeout=PROCESS_GROUP_TIMEOUT
        )
    if plan.strategy == "fsdp":
        return ShardedDataParallel(
            process_group_backend=backend,
            timeout=PROCESS_GROUP_TIMEOUT,
            sharding_strategy="FULL_SHARD",
            # One consolidated checkpoint file, written by rank 0 through the checkpoint plugin
            # (checksums, weights-only loads) like every other strategy's.
            state_dict_type="full",
        )
    if plan.strategy == "deepspeed":
        if not deepspeed_available():
            raise ConfigError(
                "training.strategy=deepspeed needs DeepSpeed: pip install 'dlpipe[deepspeed]'"
            )
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(
            stage=training.deepspeed_stage,
            process_group_backend=backend,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    raise ValueError(f"no Lightning strategy for {plan.strategy!r} (Ray builds its own)")
