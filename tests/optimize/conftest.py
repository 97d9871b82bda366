"""Tiny random networks for the optimization tests (exported in milliseconds, quantized in tens)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # test helpers beside this file (weight_precision)


class TinyCNN(nn.Module):
    """Conv-BN-ReLU blocks, max-pool and a linear head (no adaptive pooling: TorchScript-safe)."""

    def __init__(self, channels: int, width: int, size: int, classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width * (size // 2) ** 2, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_mlp(sizes: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def make_cnn(channels: int, width: int, size: int, classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = TinyCNN(channels, width, size, classes)
    # Non-trivial BatchNorm statistics, so folding BN into the conv is actually exercised.
    bn = net.features[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="session")
def mlp_factory() -> Callable[[list[int], int], nn.Module]:
    return make_mlp


@pytest.fixture(scope="session")
def cnn_factory() -> Callable[..., nn.Module]:
    return make_cnn
