"""CIFAR-style ResNets (3x3 stem, no max-pool) with the module names RiFT results use.

Names: ``conv1``, ``bn1``, ``layer1`` .. ``layerK``, blocks ``layerX.Y.conv1/bn1/conv2/bn2``,
projection shortcut ``layerX.Y.shortcut.0`` (conv) / ``.1`` (BN), classifier ``linear``.
This is the layout of the reference RiFT code, so its checkpoints map key for key
(plus our ``normalize.mean`` / ``normalize.std`` buffers). The head pools as the reference
does (``avg_pool2d(out, 4)``, :func:`~rift_ray.models.blocks.reference_pool`): on 64x64
Tiny-ImageNet images it keeps 2x2 cells and ``linear`` takes 4 x 512 inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rift_ray.models.blocks import (
    Block,
    Split,
    global_pool,
    pooled_cells,
    reference_pool,
    run_blocks,
)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; the first submodule of every model here.

    Models therefore take images in [0, 1], which is what attacks perturb.
    Buffers ``mean`` and ``std`` have shape [1, C, 1, 1] and are saved in the state dict.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))

    def mrc_split(self, name: str) -> Split | None:
        """``forward`` split at ``conv1``, ``conv2`` or ``shortcut.0`` (see ``Block.split``)."""
        if name == "conv2":  # frozen: conv1 branch and shortcut
            return (
                lambda x: (F.relu(self.bn1(self.conv1(x))), self.shortcut(x)),
                lambda h, s: F.relu(self.bn2(self.conv2(h)) + s),
            )
        if name == "shortcut.0" and len(self.shortcut):  # frozen: the residual branch
            return (
                lambda x: (x, self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))),
                lambda x, r: F.relu(r + self.shortcut(x)),
            )
        if name == "conv1" and len(self.shortcut):  # frozen: the projection shortcut
            return (
                lambda x: (x, self.shortcut(x)),
                lambda x, s: F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + s),
            )
        return None


class ResNet(nn.Module):
    """A CIFAR ResNet: stem conv, one stage per entry of ``widths``, pool, linear.

    The stem convolves with stride ``stem_stride`` (1 for CIFAR ResNets, as in the
    reference; no max-pool); stage 1 keeps the resolution, every later stage halves it.
    The head average-pools windows of ``pool_window`` (4: the reference's
    ``avg_pool2d(out, 4)``): one cell for 32x32 inputs, 2x2 cells for 64x64 (``image_size``
    sizes ``linear``); ``pool_window=None`` pools globally whatever the input size.
    Input: [B, C, H, W] in [0, 1] of ``image_size``; output: logits [B, num_classes].
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int = 10,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem_stride: int = 1,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        image_size: int | Sequence[int] = 32,
        pool_window: int | None = 4,
    ) -> None:
        super().__init__()
        if len(num_blocks) != len(widths):
            raise ValueError(f"{len(num_blocks)} stages of blocks but {len(widths)} widths")
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(len(mean), widths[0], 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (blocks, width) in enumerate(zip(num_blocks, widths)):
            strides = [1 if i == 0 else 2] + [1] * (blocks - 1)
            layer = []
            for stride in strides:
                layer.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.num_stages = len(widths)
        self.pool_window = pool_window
        downsample = stem_stride * 2 ** (len(widths) - 1)
        cells = 1 if pool_window is None else pooled_cells(image_size, downsample, pool_window)
        self.linear = nn.Linear(in_planes * cells, num_classes)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(self.normalize(x))))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return global_pool(x) if self.pool_window is None else reference_pool(x, self.pool_window)

    def blocks(self) -> list[Block]:
        """stem, every residual block (``layerX.Y``), pool, linear: composed, the forward pass."""
        out = [Block("stem", ("normalize", "conv1", "bn1"), self._stem)]
        for i in range(1, self.num_stages + 1):
            for j, block in enumerate(getattr(self, f"layer{i}")):
                out.append(Block(f"layer{i}.{j}", (f"layer{i}.{j}",), block, block.mrc_split))
        return out + [Block("pool", (), self._pool), Block("linear", ("linear",), self.linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks(), x)


def resnet18(
    num_classes: int = 10,
    *,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    image_size: int | Sequence[int] = 32,
) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, mean=mean, std=std, image_size=image_size)


def resnet34(
    num_classes: int = 10,
    *,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    image_size: int | Sequence[int] = 32,
) -> ResNet:
    return ResNet((3, 4, 6, 3), num_classes, mean=mean, std=std, image_size=image_size)
