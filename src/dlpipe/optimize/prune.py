"""Magnitude pruning to a target sparsity, made permanent, with an optional short fine-tune.

    report = prune_model(net, sparsity=0.5, method="unstructured")

`unstructured`: global L1 pruning over every Conv/Linear weight (the smallest |w| across the
whole network become zero). `structured`: per layer, the output channels (rows) with the smallest
L2 norm are zeroed (`ln_structured`, dim 0); the last Linear (the classifier) is left whole.

Honest expectations: zeros inside dense tensors do not speed up dense kernels (PyTorch, ONNX
Runtime CPU), so unstructured pruning saves nothing at inference unless the file is compressed
or a sparse runtime is used. Zeroed channels are still stored and computed unless a later step
removes them from the architecture. This module reports sparsity, accuracy and speed as measured.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn.utils import prune

PruneMethod = Literal["unstructured", "structured"]
_PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class PruneReport:
    """Sparsity reached (over the prunable weights) and how many tensors were pruned."""

    method: str
    target_sparsity: float
    sparsity: float
    pruned_tensors: int
    zero_weights: int
    total_weights: int
    finetune_epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prunable_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and Linear layers whose `weight` pruning applies to."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, _PRUNABLE)]


def _weight(layer: nn.Module) -> torch.Tensor:
    return cast(torch.Tensor, layer.weight)


def weight_sparsity(net: nn.Module) -> tuple[int, int]:
    """(zero, total) entries over the weights of every Conv/Linear layer."""
    zero = total = 0
    for _, layer in prunable_layers(net):
        w = _weight(layer).detach()
        zero += int((w == 0).sum())
        total += w.numel()
    return zero, total


def prune_model(
    net: nn.Module,
    sparsity: float,
    method: PruneMethod = "unstructured",
    inplace: bool = False,
) -> tuple[nn.Module, PruneReport]:
    """Prune to `sparsity` (fraction of weights set to zero) and make it permanent.

    Returns the pruned network (a copy unless `inplace`) and a report. Pruning masks are
    removed with `prune.remove`, so the zeros live in the plain `weight` parameters and the
    network saves, loads and exports like any other.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if method not in ("unstructured", "structured"):
        raise ValueError(f"method must be 'unstructured' or 'structured', not {method!r}")
    target = net if inplace else copy.deepcopy(net)
    layers = prunable_layers(target)
    if not layers:
        raise ValueError(f"{type(net).__name__} has no Conv/Linear layers to prune")
    if method == "unstructured":
        prune.global_unstructured(
            [(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured, amount=sparsity
        )
        pruned = [m for _, m in layers]
    else:
        # Keep the classifier whole: removing output classes is not a compression.
        pruned = [m for _, m in layers[:-1]] or [layers[0][1]]
        for m in pruned:
            prune.ln_structured(m, "weight", amount=sparsity, n=2, dim=0)
    for m in pruned:
        prune.remove(m, "weight")
    zero, total = weight_sparsity(target)
    report = PruneReport(method, sparsity, zero / total, len(pruned), zero, total)
    return target, report


def finetune_pruned(
    net: nn.Module,
    train_batches: Iterable[Any],
    epochs: int = 1,
    learning_rate: float = 1e-4,
    max_steps: int | None = None,
) -> nn.Module:
    """A short fine-tune that keeps pruned weights at zero (their gradients are masked)."""
    masks = {id(_weight(m)): _weight(m).detach() != 0 for _, m in prunable_layers(net)}
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    steps = 0
    for _ in range(epochs):
        for x, y in train_batches:
            optimizer.zero_grad()
            logits = net(**x) if isinstance(x, dict) else net(x)
            loss_fn(logits, y).backward()
            optimizer.step()
            with torch.no_grad():  # re-apply the masks (AdamW's decay would revive zeros)
                for p in params:
                    mask = masks.get(id(p))
                    if mask is not None:
                        p.mul_(mask)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return net.eval()
    return net.eval()
