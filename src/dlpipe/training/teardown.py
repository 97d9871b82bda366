"""After a fit in processes that share a process group: whole weights on rank 0, group closed.

A DDP job spawned by dlpipe returns to a parent that never joined the group. A job started by
torchrun / srun / a Kubernetes Job (or FSDP/DeepSpeed's script launcher) continues in each rank
after `trainer.fit`; rank 0 then tests, packages and registers the model alone. Two things must
hold first:

- the module holds whole tensors: FSDP (and ZeRO stage 3) leave each parameter a view of this
  rank's shard, which neither a test pass nor `state_dict()` for the package can use;
- no process group is left open: torchmetrics would otherwise try to synchronise rank 0's test
  metrics with ranks that have already exited, and wait for them until the timeout.

DeepSpeed writes checkpoints as directories of shards; they are consolidated into one verified
file each (`<name>.consolidated.ckpt` + `.sha256`) so that the rest of dlpipe (best-epoch
weights, `--resume` of the weights, the model package) reads them like any other checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from dlpipe.training.checkpoint import load_checkpoint_file, write_checksum

if TYPE_CHECKING:
    from dlpipe.training.trainer import FitOutcome

CONSOLIDATED_SUFFIX = ".consolidated.ckpt"


def load_whole_tensors(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give each parameter and buffer of `module` named in `state` that whole tensor as a new,
    standalone tensor (replacing a view of a shard; `load_state_dict` would refuse the shapes)."""
    for name, value in state.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        params = dict(owner.named_parameters(recurse=False))
        if leaf in params:
            fresh = nn.Parameter(value.detach().clone(), requires_grad=params[leaf].requires_grad)
            owner.register_parameter(leaf, fresh)
        elif leaf in dict(owner.named_buffers(recurse=False)):
            owner.register_buffer(leaf, value.detach().clone())
        else:
            raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


def _is_deepspeed(strategy: Any) -> bool:
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover - Lightning always ships the class
        return False
    return isinstance(strategy, DeepSpeedStrategy)


def consolidate_deepspeed_checkpoint(directory: str | Path) -> Path:
    """One fp32 checkpoint file (with its checksum) from a DeepSpeed checkpoint directory."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    source = Path(directory)
    target = source.with_name(source.name.removesuffix(".ckpt") + CONSOLIDATED_SUFFIX)
    convert_zero_checkpoint_to_fp32_state_dict(source, target)
    write_checksum(target)
    return target


def _consolidated(path: str | None) -> str | None:
    if path and Path(path).is_dir():
        return str(consolidate_deepspeed_checkpoint(path))
    return path


def finish_distributed_fit(
    trainer: pl.Trainer, model: pl.LightningModule, outcome: FitOutcome
) -> FitOutcome:
    """Run on every rank right after `trainer.fit`; returns the outcome rank 0 should use."""
    if not torch.distributed.is_initialized():
        return outcome  # one process, or the parent of spawned workers: nothing to gather
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        # A collective: every rank takes part, rank 0 receives the whole state dict.
        state = strategy.lightning_module_state_dict()
        if trainer.is_global_zero:
            load_whole_tensors(model, state)
    elif _is_deepspeed(strategy):
        strategy.barrier("dlpipe.consolidate")  # every rank's shards are on disk
        if trainer.is_global_zero:
            best = _consolidated(outcome.best_checkpoint)
            last = _consolidated(outcome.last_checkpoint)
            outcome = replace(outcome, best_checkpoint=best, last_checkpoint=last)
            final = last or best
            if final:
                contents = load_checkpoint_file(final, require_checksum=True)
                load_whole_tensors(model, contents["state_dict"])
    strategy.barrier("dlpipe.fit_done")
    torch.distributed.destroy_process_group()
    return outcome
