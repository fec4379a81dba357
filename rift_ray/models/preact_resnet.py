"""PreActResNet18 with its usual module names: RobustBench's ``PreActResNet(PreActBlockV2,
bn_before_fc=True)`` (Rice et al., Kireev et al.). Not locuslab/fast_adversarial's: its
shortcut conv takes the block's raw input, ours the BN-ReLU'd one (docs/checkpoints.md).

Names: ``conv1``; ``layerX.Y.bn1/conv1/bn2/conv2``; projection shortcut ``layerX.Y.shortcut.0``
(a 1x1 conv, no BN); final ``bn``; classifier ``linear``. Note the shortcut conv runs
before ``conv1`` of its block, which :func:`rift_ray.models.mrc_candidates` reflects.
The head pools 4x4 windows (``avg_pool2d(out, 4)``, as fast_adversarial and the reference
RiFT code): one cell for 32x32 inputs, 2x2 for 64x64, which size ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rift_ray.models.blocks import Block, Split, pooled_cells, reference_pool, run_blocks
from rift_ray.models.resnet import Normalize


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3; the projection shortcut takes the activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut

    def _shortcut(self, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return x if self.shortcut is None else self.shortcut(act)

    def mrc_split(self, name: str) -> Split | None:
        """``forward`` split at ``conv1``, ``conv2`` or ``shortcut.0`` (see ``Block.split``)."""

        def act(x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn1(x))

        if name == "conv1":  # frozen: bn1/relu and the shortcut
            return (
                lambda x: (act(x), self._shortcut(x, act(x))),
                lambda a, s: self.conv2(F.relu(self.bn2(self.conv1(a)))) + s,
            )
        if name == "conv2":  # frozen: everything up to conv2, and the shortcut
            return (
                lambda x: (F.relu(self.bn2(self.conv1(act(x)))), self._shortcut(x, act(x))),
                lambda h, s: self.conv2(h) + s,
            )
        if name == "shortcut.0" and self.shortcut is not None:  # frozen: the residual branch
            return (
                lambda x: (act(x), self.conv2(F.relu(self.bn2(self.conv1(act(x)))))),
                lambda a, r: r + self.shortcut(a),  # type: ignore[misc]
            )
        return None


class PreActResNet(nn.Module):
    """Input [B, C, H, W] in [0, 1] of ``image_size``; output logits [B, num_classes]."""

    POOL = 4  # the head's pooling window (F.avg_pool2d(out, 4))

    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        *,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        base_width: int = 64,
        image_size: int | Sequence[int] = 32,
    ) -> None:
        """``base_width``: channels of the first stage (64 in PreActResNet18), doubled per stage."""
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(len(mean), base_width, 3, stride=1, padding=1, bias=False)
        in_planes = base_width
        widths = [base_width * 2**i for i in range(len(num_blocks))]
        for i, (blocks, width) in enumerate(zip(num_blocks, widths)):
            strides = [1 if i == 0 else 2] + [1] * (blocks - 1)
            layer = []
            for stride in strides:
                layer.append(PreActBlock(in_planes, width, stride))
                in_planes = width
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.num_stages = len(num_blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        downsample = 2 ** (len(num_blocks) - 1)
        cells = pooled_cells(image_size, downsample, self.POOL)
        self.linear = nn.Linear(in_planes * cells, num_classes)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.normalize(x))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return reference_pool(F.relu(self.bn(x)), self.POOL)

    def blocks(self) -> list[Block]:
        """stem, every block (``layerX.Y``), head (bn, relu, pool), linear: composed, the forward pass."""
        out = [Block("stem", ("normalize", "conv1"), self._stem)]
        for i in range(1, self.num_stages + 1):
            for j, block in enumerate(getattr(self, f"layer{i}")):
                out.append(Block(f"layer{i}.{j}", (f"layer{i}.{j}",), block, block.mrc_split))
        return out + [Block("head", ("bn",), self._head), Block("linear", ("linear",), self.linear)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks(), x)


def preact_resnet18(
    num_classes: int = 10,
    *,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    image_size: int | Sequence[int] = 32,
) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes, mean=mean, std=std, image_size=image_size)
