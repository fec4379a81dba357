"""A model's forward pass as an ordered list of blocks, so it can be run from any block onward.

    blocks = model_blocks(model)                 # [stem, layer1.0, ..., pool, linear]
    k = block_index(blocks, "layer2.1.conv2")    # the block that runs this module
    feats = run_blocks(blocks[:k], x)            # fixed while only that module's weight moves
    logits = run_blocks(blocks[k:], feats)       # == model(x)

MRC uses this to cache the input of the perturbed module's block once and run only the
rest of the network during the ascent (:func:`rift_ray.rift.robust_criticality`).
A block may also say how to split itself at one of its modules (``Block.split_at``): the
frozen part before that module (and a frozen shortcut) is computed once, the rest per
step, so for ``layer2.0.conv2`` only ``conv2`` onward runs.
Every model here has a ``blocks()`` method whose composition is exactly its forward
pass (tests check bit-equality); a model without one is a single block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (frozen part: block input -> cached tensors, rest: *cached tensors -> block output)
Split = tuple[Callable[[Tensor], tuple[Tensor, ...]], Callable[..., Tensor]]


@dataclass(frozen=True)
class Block:
    """One step of a forward pass: ``fn`` maps the previous block's output to this block's output.

    ``modules``: qualified names of the submodules ``fn`` runs (a name covers its children);
    empty for parameter-free steps such as global pooling. ``split``: given a module name
    relative to ``modules[0]`` (``"conv2"``, ``"shortcut.0"``), a :data:`Split` of ``fn``
    at that module whose composition ``rest(*frozen(x))`` is bit-identical to ``fn(x)``
    while only that module's weight changes; None where splitting saves nothing.
    """

    name: str
    modules: tuple[str, ...]
    fn: Callable[[Tensor], Tensor]
    split: Callable[[str], Split | None] | None = None

    def split_at(self, module_name: str) -> Split | None:
        """The block's split at ``module_name`` (a qualified name), or None."""
        if self.split is None or len(self.modules) != 1 or not self.modules[0]:
            return None
        prefix = self.modules[0] + "."
        if not module_name.startswith(prefix):
            return None
        return self.split(module_name[len(prefix) :])

    def owns(self, module_name: str) -> bool:
        """Whether ``module_name`` (or a module inside it) runs in this block."""
        return any(
            m == "" or module_name == m or module_name.startswith(m + ".") for m in self.modules
        )


def global_pool(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C]: global average pooling."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def reference_pool(x: Tensor, kernel: int) -> Tensor:
    """The heads' pooling, as in the reference RiFT models: ``avg_pool2d(x, kernel)`` then
    flatten, so [B, C, H, W] -> [B, C * (H // kernel) * (W // kernel)].

    ``kernel`` is 4 for the ResNets and 8 for WideResNet: on 32x32 inputs the last feature
    map is exactly one window (global pooling, [B, C]); on 64x64 (Tiny-ImageNet) it is 2x2
    windows, [B, 4C], and the classifier has 4x the inputs. A map no larger than the window
    is pooled globally (bit-identical to :func:`global_pool`; the reference would fail
    on a smaller one).
    """
    if x.shape[-2] <= kernel and x.shape[-1] <= kernel:
        return global_pool(x)
    return torch.flatten(F.avg_pool2d(x, kernel), 1)


def pooled_cells(image_size: int | Sequence[int], downsample: int, kernel: int) -> int:
    """How many cells :func:`reference_pool` leaves of an ``image_size`` input (an int or
    (H, W)) whose last feature map is ``downsample`` times smaller (stride-2 3x3 convs with
    padding 1 round up): the factor by which the classifier's input grows."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[-2:]
    side = [max(1, -(-s // downsample) // kernel) for s in (h, w)]
    return side[0] * side[1]


def model_blocks(model: nn.Module) -> list[Block]:
    """``model.blocks()`` when the model defines it, else the whole model as one block."""
    blocks = getattr(model, "blocks", None)
    if callable(blocks):
        return list(blocks())
    return [Block(type(model).__name__, ("",), model)]


def block_index(blocks: Sequence[Block], module_name: str) -> int:
    """Index of the block that runs ``module_name``; ValueError when none does."""
    for i, block in enumerate(blocks):
        if block.owns(module_name):
            return i
    raise ValueError(f"{module_name}: not run by any block ({', '.join(b.name for b in blocks)})")


def run_blocks(blocks: Sequence[Block], x: Tensor) -> Tensor:
    """Apply ``blocks`` in order (an empty sequence returns ``x``)."""
    for block in blocks:
        x = block.fn(x)
    return x
