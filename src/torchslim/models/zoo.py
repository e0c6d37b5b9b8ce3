"""The built-in models of the seed material, adapted to 1x28x28 Fashion-MNIST images."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then Linear-ReLU-Dropout blocks, then a classifier."""

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (512, 256, 128),
        num_classes: int = 10,
        dropout: float = 0.3,
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


def _conv_block(cin: int, cout: int, convs: int, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.MaxPool2d(2, 2))
    return layers


class CNN(nn.Module):
    """VGG-style blocks (`convs_per_block[i]` 3x3 convs of `widths[i]` channels, then max-pool),
    global average pooling and an MLP classifier."""

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (64, 128, 256),
        convs_per_block: Sequence[int] = (2, 2, 2),
        classifier: Sequence[int] = (512, 256),
        num_classes: int = 10,
        batch_norm: bool = True,
        dropout: float = 0.5,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for width, convs in zip(widths, convs_per_block, strict=True):
            layers += _conv_block(cin, width, convs, batch_norm)
            cin = width
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()]
        for size in classifier:
            head += [nn.Linear(cin, size), nn.ReLU(inplace=True)]
            if dropout:
                head.append(nn.Dropout(dropout))
            cin = size
        head.append(nn.Linear(cin, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def mlp_teacher(num_classes: int = 10, **kw) -> MLP:
    """MLP teacher 784-512-256-128-10 with dropout 0.3."""
    return MLP(hidden=(512, 256, 128), num_classes=num_classes, dropout=kw.pop("dropout", 0.3), **kw)


def mlp_student(num_classes: int = 10, **kw) -> MLP:
    """MLP student 784-64-32-10 with dropout 0.2."""
    return MLP(hidden=(64, 32), num_classes=num_classes, dropout=kw.pop("dropout", 0.2), **kw)


def cnn_teacher(num_classes: int = 10, **kw) -> CNN:
    """CNN teacher: conv blocks 64-128-256 (two convs each, batch norm), classifier 256-512-256-10."""
    return CNN(
        widths=(64, 128, 256),
        convs_per_block=(2, 2, 2),
        classifier=(512, 256),
        num_classes=num_classes,
        batch_norm=True,
        dropout=0.5,
        **kw,
    )


def cnn_student(num_classes: int = 10, **kw) -> CNN:
    """CNN student: conv blocks 32-64-128 (2, 2, 1 convs), classifier 128-64-10."""
    return CNN(
        widths=(32, 64, 128),
        convs_per_block=(2, 2, 1),
        classifier=(64,),
        num_classes=num_classes,
        batch_norm=False,
        dropout=0.0,
        **kw,
    )


MODELS = {f.__name__: f for f in (mlp_teacher, mlp_student, cnn_teacher, cnn_student)}
