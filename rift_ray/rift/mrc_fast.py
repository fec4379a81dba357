"""The machinery of MRC's fast path (:mod:`rift_ray.rift.mrc` explains what it does):
batch norms with a lean backward, the cache of what is frozen before the perturbed
modules, and evaluation passes over the fixed set (one that hands its first batch's
graph to the next ascent step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_ray.models.blocks import block_index, model_blocks, run_blocks

Tail = Callable[..., Tensor]  # a forward pass (possibly of part of a network, several inputs)


class _FrozenBatchNormFn(torch.autograd.Function):
    """Eval-mode batch norm whose own weights do not train: PyTorch's forward; as backward
    only the input's gradient, ``dy * invstd * weight``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bn: nn.BatchNorm2d, invstd: Tensor) -> Tensor:
        ctx.save_for_backward(invstd, bn.weight)
        ctx.dtype = x.dtype
        return F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
        )

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, None]:
        invstd, weight = ctx.saved_tensors
        shape = (1, -1) + (1,) * (dy.dim() - 2)
        return (dy * invstd.view(shape) * weight.view(shape)).to(ctx.dtype), None, None


def _frozen_bn_forward(bn: nn.BatchNorm2d, invstd: Tensor, x: Tensor) -> Tensor:
    out: Tensor = _FrozenBatchNormFn.apply(x, bn, invstd)
    return out


def freeze_batch_norms(net: nn.Module) -> int:
    """Give every eval-mode, affine ``BatchNorm2d`` with running statistics and frozen
    weights in ``net`` (IN PLACE) a leaner backward; returns how many.

    Same forward (PyTorch's); the backward computes only the input's gradient. PyTorch's
    batch-norm backward also reduces over the whole batch for the weight and bias
    gradients, ~4x the cost of the forward here. The input gradient is computed as
    PyTorch's CPU kernel computes it (``invstd = 1 / sqrt(var + eps)`` in double, then
    ``dy * invstd * weight``): bit-identical on CPU (tests/test_perf_paths.py). Module
    names and the state dict are unchanged. For a network copy whose batch norms never
    train (MRC's ascent moves conv/linear weights only).
    """
    swapped = 0
    for bn in net.modules():
        if (
            type(bn) is nn.BatchNorm2d
            and not bn.training
            and bn.affine
            and bn.running_var is not None
            and not bn.weight.requires_grad
            and not bn.bias.requires_grad
        ):
            # as PyTorch's CPU kernel computes it: 1 / sqrt(var + eps) in double, then float
            invstd = (1 / torch.sqrt(bn.running_var.double() + bn.eps)).float()
            bn.forward = functools.partial(_frozen_bn_forward, bn, invstd)  # type: ignore[method-assign]
            swapped += 1
    return swapped


def set_loss(
    model: Tail,
    inputs: tuple[Tensor, ...],
    targets: Tensor,
    batch_size: int,
    device: torch.device,
    inference: bool = False,
) -> tuple[float, float]:
    """Mean CE and accuracy (percent) of ``model(*inputs)`` over the whole set, in order.

    Under ``torch.no_grad`` (the reference) or ``torch.inference_mode`` (the fast path:
    the same values, a little less bookkeeping per op).
    """
    total, correct = 0.0, 0
    with torch.inference_mode() if inference else torch.no_grad():
        for i in range(0, len(targets), batch_size):
            xs, y = batch(inputs, targets, slice(i, i + batch_size), device)
            logits = model(*xs)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return total / len(targets), 100.0 * correct / len(targets)


def set_loss_and_first_step(
    model: Tail,
    inputs: tuple[Tensor, ...],
    targets: Tensor,
    batch_size: int,
    device: torch.device,
    order: Tensor,
) -> tuple[float, float, Tensor]:
    """``set_loss`` computed in the batches of ``order``; also returns the logits of the first
    batch with their graph, which are exactly the forward pass of the next ascent step.

    Per-image logits are scattered back to the set's order and the loss is summed over the
    same slices as ``set_loss``, so the value is the same as long as an image's logits do
    not depend on which images share its batch (the assumption of the cache as well).
    """
    n = len(targets)
    logits_all: Tensor | None = None
    first = torch.empty(0)
    starts = list(range(0, n, batch_size))
    for i in starts[1:] + starts[:1]:  # the first batch last: its graph then overlaps nothing
        idx = order[i : i + batch_size]
        xs, _ = batch(inputs, targets, idx, device)
        if i == 0:
            first = model(*xs)
            out = first.detach()
        else:
            with torch.inference_mode():
                out = model(*xs)
        if logits_all is None:
            logits_all = torch.empty(n, *out.shape[1:], dtype=out.dtype, device=out.device)
        logits_all[idx.to(out.device)] = out
    assert logits_all is not None
    total, correct = 0.0, 0
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            logits, y = logits_all[i : i + batch_size], targets[i : i + batch_size].to(device)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return total / n, 100.0 * correct / n, first


def images(inputs: Tensor, idx: Tensor | slice, device: torch.device) -> Tensor:
    """``inputs[idx]`` as float on ``device`` (uint8 images scaled to [0, 1])."""
    x = inputs[idx].to(device)
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return x.float()


_R = TypeVar("_R")


def channels_last_inputs(fn: Callable[..., _R]) -> Callable[..., _R]:
    """``fn`` taking its 4-D inputs in channels_last layout (a no-op copy when they already are)."""

    def call(*xs: Tensor) -> _R:
        return fn(
            *(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in xs)
        )

    return call


def batch(
    inputs: tuple[Tensor, ...], targets: Tensor, idx: Tensor | slice, device: torch.device
) -> tuple[tuple[Tensor, ...], Tensor]:
    """Rows ``idx`` of every tensor of ``inputs`` (:func:`images`) and of ``targets``, on ``device``."""
    return tuple(images(t, idx, device) for t in inputs), targets[idx].to(device)


def nbytes(tensors: tuple[Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Cache:
    """What the fast path runs per step: ``tail(*tensors[idx])``."""

    tail: Tail
    tensors: tuple[Tensor, ...]
    block: str = ""  # the block whose input (or, ``inside``, whose frozen part) is cached
    inside: bool = False


def cached_tail(
    net: nn.Module,
    module_names: Sequence[str],
    inputs: Tensor,
    batch_size: int,
    device: torch.device,
    max_cache_bytes: int,
    channels_last: bool = False,
    split: bool = True,
) -> Cache:
    """The network from the earliest of the perturbed modules on, and what it needs for the
    whole set.

    Block k is the one running the earliest module (blocks before it run none of the set).
    With ``split``, when that module is the set's only one in block k and the block can
    split itself there (``Block.split_at``), the cache holds the block's frozen part (e.g.
    for ``conv2``: the output of conv1 + bn1 + relu, and the shortcut) when it fits in
    ``max_cache_bytes``. Otherwise block k is the latest block, up to that one, whose inputs
    for the whole set fit; k = 0 returns the net and ``inputs`` as they are. The cache is
    computed in eval mode, without grad, in batches of ``batch_size`` in order (the slices
    the end-of-epoch evaluation uses), and lives on ``device``.
    """
    blocks = model_blocks(net)
    at = {name: block_index(blocks, name) for name in module_names}
    k = min(at.values())
    in_k = [name for name in module_names if at[name] == k]
    # another module of the set in block k may run in its frozen part: block inputs only
    cut = blocks[k].split_at(in_k[0]) if split and len(in_k) == 1 else None
    if k > 0 or cut is not None:  # shapes of every block input, from one image
        with torch.no_grad():
            x = images(inputs, slice(0, 1), device)
            per_image = []
            for block in blocks[:k]:
                x = block.fn(x)
                per_image.append(x.numel() * x.element_size())
            if cut is not None and nbytes(cut[0](x)) * len(inputs) > max_cache_bytes:
                cut = None
        if cut is None:
            while k > 0 and per_image[k - 1] * len(inputs) > max_cache_bytes:
                k -= 1
    if k == 0 and cut is None:
        return Cache(net, (inputs,))

    prefix, rest = blocks[:k], blocks[k + 1 :] if cut is not None else blocks[k:]

    def frozen(x: Tensor) -> tuple[Tensor, ...]:
        x = run_blocks(prefix, x)
        return cut[0](x) if cut is not None else (x,)

    def tail(*xs: Tensor) -> Tensor:
        return run_blocks(rest, cut[1](*xs) if cut is not None else xs[0])

    run_frozen = channels_last_inputs(frozen) if channels_last else frozen
    with torch.no_grad():
        parts = [
            run_frozen(images(inputs, slice(i, i + batch_size), device))
            for i in range(0, len(inputs), batch_size)
        ]
    tensors = tuple(torch.cat(ts) for ts in zip(*parts))
    return Cache(tail, tensors, blocks[k].name, cut is not None)
