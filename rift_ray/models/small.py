"""Tiny models that train in seconds on a CPU: for smoke sweeps and tests.

``small_resnet``: the ResNet of :mod:`rift_ray.models.resnet` with widths 16/32/64 and one
block per stage, so its names follow the same scheme (``conv1``, ``layer1.0.conv1``,
``layer2.0.shortcut.0``, ``linear``). ``small_cnn``: three conv-BN-ReLU layers and a linear
classifier (``conv1``, ``conv2``, ``conv3``, ``linear``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rift_ray.models.blocks import Block, global_pool, run_blocks
from rift_ray.models.resnet import Normalize, ResNet


def small_resnet(
    num_classes: int = 10,
    *,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> ResNet:
    """ResNet with stages of width 16, 32, 64 and one BasicBlock each (78k parameters).

    The stem has stride 2 (32x32 -> 16x16): that alone makes it ~4x faster on a CPU. Not a
    reference architecture: its head pools globally at any input size.
    """
    return ResNet(
        (1, 1, 1), num_classes, widths=(16, 32, 64), stem_stride=2, mean=mean, std=std,
        pool_window=None,
    )  # fmt: skip


class SmallCNN(nn.Module):
    """conv(32, stride 2) -> conv(64, stride 2) -> conv(128, stride 2) -> global pool -> linear.

    Input [B, C, H, W] in [0, 1]; output logits [B, num_classes].
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(len(mean), 32, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(128)
        self.linear = nn.Linear(128, num_classes)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(self.normalize(x))))

    def _conv2(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(x)))

    def _conv3(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn3(self.conv3(x)))

    def blocks(self) -> list[Block]:
        """stem (conv1), conv2, conv3 (each with its BN and ReLU), pool, linear."""
        return [
            Block("stem", ("normalize", "conv1", "bn1"), self._stem),
            Block("conv2", ("conv2", "bn2"), self._conv2),
            Block("conv3", ("conv3", "bn3"), self._conv3),
            Block("pool", (), global_pool),
            Block("linear", ("linear",), self.linear),
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks(), x)


def small_cnn(
    num_classes: int = 10,
    *,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> SmallCNN:
    return SmallCNN(num_classes, mean=mean, std=std)
