"""WideResNet-(6n+4)-k with the module names of the standard robustness code (TRADES, MART, AWP).

Names: ``conv1``; ``block1`` .. ``block3`` (each a ``NetworkBlock`` whose ``layer`` is a
Sequential of ``BasicBlock``\\ s with ``bn1, relu1, conv1, bn2, relu2, conv2`` and a 1x1
``convShortcut`` when in != out channels); then ``bn1``, ``relu``, ``fc``. E.g.
``block1.layer.3.conv2``, ``block2.layer.0.convShortcut``. The first block of ``block1``
goes 16 -> 16k channels, so it has a ``convShortcut`` whenever k > 1. The optional
``sub_block1`` of some WRN-34-10 checkpoints is not part of this model. The head pools as
the reference does (``avg_pool2d(out, 8)``): on 64x64 Tiny-ImageNet images it keeps 2x2
cells and ``fc`` takes 4 x 64k inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rift_ray.models.blocks import Block, Split, pooled_cells, reference_pool, run_blocks
from rift_ray.models.resnet import Normalize


class BasicBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Conv2d | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in the robustness code: when the shape changes, the shortcut also sees bn1/relu1(x).
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out

    def _shortcut(self, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return x if self.convShortcut is None else self.convShortcut(act)

    def _branch(self, act: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn2 -> relu2 (-> dropout) of ``forward``: the input of conv2."""
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out

    def mrc_split(self, name: str) -> Split | None:
        """``forward`` split at ``conv1``, ``conv2`` or ``convShortcut`` (see ``Block.split``)."""

        def act(x: torch.Tensor) -> torch.Tensor:
            return self.relu1(self.bn1(x))

        if name == "conv1":  # frozen: bn1/relu1 and the shortcut
            return (
                lambda x: (act(x), self._shortcut(x, act(x))),
                lambda a, s: s + self.conv2(self._branch(a)),
            )
        if name == "conv2":  # frozen: everything up to conv2, and the shortcut
            return (
                lambda x: (self._branch(act(x)), self._shortcut(x, act(x))),
                lambda h, s: s + self.conv2(h),
            )
        if name == "convShortcut" and self.convShortcut is not None:  # frozen: the residual branch
            return (
                lambda x: (act(x), self.conv2(self._branch(act(x)))),
                lambda a, r: self.convShortcut(a) + r,  # type: ignore[misc]
            )
        return None


class NetworkBlock(nn.Module):
    """``num_layers`` BasicBlocks; only the first changes channels / stride."""

    def __init__(
        self, num_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(num_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor. Input [B, C, H, W] in [0, 1] of ``image_size``; output logits
    [B, num_classes]. The head average-pools 8x8 windows (the reference's
    ``avg_pool2d(out, 8)``): one cell for 32x32 inputs, 2x2 cells for 64x64, which size ``fc``.
    """

    POOL = 8  # the head's pooling window (reference: F.avg_pool2d(out, 8))

    def __init__(
        self,
        depth: int = 34,
        num_classes: int = 10,
        widen_factor: int = 10,
        *,
        drop_rate: float = 0.0,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        image_size: int | Sequence[int] = 32,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n+4 with n >= 1 (e.g. 16, 28, 34), got {depth}"
            )
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(len(mean), channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3] * pooled_cells(image_size, 4, self.POOL), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.normalize(x))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return reference_pool(self.relu(self.bn1(x)), self.POOL)

    def blocks(self) -> list[Block]:
        """stem, every BasicBlock (``blockK.layer.Y``), head (bn1, relu, pool), fc: composed, the forward pass."""
        out = [Block("stem", ("normalize", "conv1"), self._stem)]
        for k in (1, 2, 3):
            for j, block in enumerate(getattr(self, f"block{k}").layer):
                name = f"block{k}.layer.{j}"
                out.append(Block(name, (name,), block, block.mrc_split))
        head = Block("head", ("bn1", "relu"), self._head)
        return out + [head, Block("fc", ("fc",), self.fc)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks(), x)
