"""Image classifiers: a small CNN for 28x28 inputs and torchvision backbones adapted to any
channel count. torchvision weights are never downloaded (no hub access): `pretrained` is refused."""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision import models as tvm


class SimpleCNN(nn.Module):
    """Two conv blocks and a small head: ~0.91 on Fashion-MNIST in a few CPU minutes."""

    def __init__(
        self, num_classes: int, in_channels: int = 1, width: int = 32, dropout: float = 0.1
    ):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(in_channels, width), block(width, 2 * width))
        # Adaptive pooling keeps the head independent of the input size.
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.pool(self.features(x)))


def _no_pretrained(name: str, pretrained: bool) -> None:
    if pretrained:
        raise ValueError(
            f"{name}: pretrained torchvision weights would need a download; "
            "set model.weights_path to a local state_dict instead"
        )


def simple_cnn(
    num_classes: int,
    in_channels: int = 1,
    pretrained: bool = False,
    dropout: float = 0.1,
    **kw: Any,
) -> nn.Module:
    _no_pretrained("simple_cnn", pretrained)
    return SimpleCNN(num_classes, in_channels, width=int(kw.get("width", 32)), dropout=dropout)


def _adapt_resnet(
    net: nn.Module, in_channels: int, num_classes: int, dropout: float, small: bool
) -> nn.Module:
    if in_channels != 3 or small:
        # Small inputs (28x28) lose everything to the 7x7/2 stem and max-pool; use a 3x3/1 stem.
        k, s, p = (3, 1, 1) if small else (7, 2, 3)
        net.conv1 = nn.Conv2d(in_channels, 64, k, s, p, bias=False)  # type: ignore[assignment,arg-type]
    if small:
        net.maxpool = nn.Identity()  # type: ignore[assignment,arg-type]
    feats = net.fc.in_features  # type: ignore[union-attr]
    net.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(feats, num_classes))  # type: ignore[assignment,arg-type]
    return net


def resnet18(
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    dropout: float = 0.1,
    **kw: Any,
) -> nn.Module:
    _no_pretrained("resnet18", pretrained)
    return _adapt_resnet(
        tvm.resnet18(weights=None),
        in_channels,
        num_classes,
        dropout,
        bool(kw.get("small_input", False)),
    )


def resnet50(
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    dropout: float = 0.1,
    **kw: Any,
) -> nn.Module:
    _no_pretrained("resnet50", pretrained)
    return _adapt_resnet(
        tvm.resnet50(weights=None),
        in_channels,
        num_classes,
        dropout,
        bool(kw.get("small_input", False)),
    )


def mobilenet_v3_small(
    num_classes: int,
    in_channels: int = 3,
    pretrained: bool = False,
    dropout: float = 0.1,
    **kw: Any,
) -> nn.Module:
    _no_pretrained("mobilenet_v3_small", pretrained)
    net = tvm.mobilenet_v3_small(weights=None, num_classes=num_classes, dropout=dropout)
    if in_channels != 3:
        first = net.features[0][0]
        net.features[0][0] = nn.Conv2d(
            in_channels,
            first.out_channels,
            first.kernel_size,
            first.stride,
            first.padding,
            bias=False,
        )
    return net
