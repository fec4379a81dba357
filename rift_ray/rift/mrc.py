"""Stage 2: Module Robust Criticality (MRC), as the RiFT reference code computes it.

    MRC(m) = max_{||dW||_2 <= eps ||W||_2} L_rob(W_m + dW) - L_rob(W_m)

where W is the flattened weight of module m alone (never bias or BatchNorm) and
L_rob the mean cross-entropy on a FIXED set of adversarial examples made once from
the adversarially trained model. The max is approximated by gradient ascent:

    x_adv, y = adversarial_set(model, val)            # PGD-10, eps 8/255, seeded
    res = module_robust_criticality(model, "layer2.1.conv2", x_adv, y)
    res.mrc, res.acc_before - res.acc_after            # loss rise, robust-acc drop (points)

Fast path (``fast=True``, the default): the model is in eval mode and only one weight
moves, so everything computed before that weight is used never changes:

1. The input of the block that runs the module (:mod:`rift_ray.models.blocks`) is
   computed once for the whole set; inside a residual block also its frozen part (for
   ``conv2``: the output of conv1/bn1/relu and the shortcut; for the shortcut conv: the
   residual branch), so every ascent step and every evaluation runs only the module
   onward (for the classifier: the pooled features are cached).
2. The evaluation before each epoch (the unperturbed loss, then each end-of-epoch loss)
   runs in that epoch's batch order and hands the first batch's forward pass, graph and
   all, to the first ascent step, which would compute exactly that again.
3. Evaluations run under ``torch.inference_mode``.
4. Batch norms, all frozen, backpropagate only their input's gradient
   (:func:`freeze_batch_norms`; PyTorch's backward also reduces for their own weights).
5. With ``base`` (:func:`mrc_base`, what the MRC stage passes): the unperturbed evaluation
   and the first ascent step's gradient, the same for every module, are computed once for
   all modules instead of once per trial.

Same batches, same order, same seed as the reference path (``fast=False``, a full
forward and backward per step); on CPU the results are bit-identical (benchmarks/README.md).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_ray.attacks import eval_mode, iter_batches, pgd_attack
from rift_ray.compute import Amp, autocast
from rift_ray.models.blocks import block_index, model_blocks, run_blocks


def adversarial_set(
    model: nn.Module,
    data: Any,
    *,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The fixed adversarial set for MRC: PGD (random start, seeded) against ``model`` in eval mode.

    ``data``: an ``ImageData`` (use a held-out split, not test) or an iterable of
    (x, y) batches; the model must be on ``device``. Returns CPU tensors
    ``(x_adv [N,C,H,W], y int64 [N])``; ``x_adv`` is float32 in [0,1] by default.
    ``dtype=torch.uint8`` stores ``round(255 x_adv)`` instead (4x smaller, but the
    perturbation is rounded to the 1/255 grid); other float dtypes are a plain cast.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    xs, ys = [], []
    with eval_mode(model):
        for x, y in iter_batches(data, batch_size, device):
            x_adv = pgd_attack(
                model, x, y, eps=eps, step_size=step_size, steps=steps, generator=gen
            )
            xs.append(x_adv.cpu())
            ys.append(y.cpu())
    if not xs:
        raise ValueError("adversarial_set: no images in data")
    images, labels = torch.cat(xs), torch.cat(ys).long()
    if dtype == torch.uint8:
        return (images * 255).round().to(torch.uint8), labels
    return images.to(dtype or torch.float32), labels


AdvSetFormat = Literal["float32", "uint16", "uint8"]


def encode_adversarial_set(x_adv: Tensor, fmt: AdvSetFormat = "uint16") -> dict[str, Any]:
    """A compact form of a fixed adversarial set (float32 [N,C,H,W] in [0,1]) for storage
    and transport; :func:`decode_adversarial_set` inverts it.

    - ``float32``: as is (4 bytes per value, exact).
    - ``uint16``: 16-bit fixed point, ``round(65535 x_adv)`` stored as int16 offset by
      32768 (2 bytes per value); every value within 1/131070 = 7.6e-6 of the original.
    - ``uint8``: ``round(255 x_adv)`` (1 byte per value): the perturbation rounded to the
      1/255 grid, an error of up to 1/510 = 2e-3 per value (a quarter of a PGD step).
    """
    if fmt == "float32":
        return {"format": fmt, "inputs": x_adv.float()}
    if fmt == "uint8":
        return {"format": fmt, "inputs": (x_adv * 255).round().to(torch.uint8)}
    if fmt == "uint16":
        q = (x_adv.double().clamp(0, 1) * 65535).round() - 32768
        return {"format": fmt, "inputs": q.to(torch.int16)}
    raise ValueError(f"format: must be float32, uint16 or uint8 (got {fmt!r})")


def decode_adversarial_set(blob: dict[str, Any]) -> Tensor:
    """The images of an :func:`encode_adversarial_set` blob: float32 in [0,1] (uint8 stays
    uint8, which :func:`module_robust_criticality` takes as is)."""
    fmt, x = blob.get("format", "float32"), blob["inputs"]
    if fmt == "uint16":
        return ((x.double() + 32768) / 65535).float()
    return x


@dataclass(frozen=True)
class MRCResult:
    """MRC of one module. Losses are mean CE (nats) on the fixed set, accuracies in percent.

    ``loss_after`` is the largest end-of-epoch loss (epoch ``best_epoch``, 1-based) and
    ``acc_after`` the accuracy at that epoch, so ``mrc == loss_after - loss_before``.
    ``cached_block``: the block whose input the fast path cached ("" when none was, e.g.
    the stem or ``fast=False``); ``cached_inside``: the cache holds the frozen part of
    that block before the module (and its shortcut) instead of its input;
    ``cache_bytes``: the size of that cache.
    """

    module: str
    mrc: float
    loss_before: float
    loss_after: float
    acc_before: float
    acc_after: float
    epoch_losses: list[float]
    best_epoch: int
    num_params: int
    seconds: float
    cached_block: str = ""
    cache_bytes: int = 0
    cached_inside: bool = False

    @property
    def acc_drop(self) -> float:
        """Robust-accuracy drop (points) at the worst perturbation found."""
        return self.acc_before - self.acc_after


def project_l2_ball(delta: Tensor, radius: float) -> Tensor:
    """``delta`` scaled by min(1, radius / ||delta||_2) (Frobenius norm of the whole tensor).

    Deltas already inside the ball are returned unchanged (the same values, a clone).
    """
    norm = float(delta.norm())
    if norm <= radius:
        return delta.clone()
    return delta * (radius / norm)


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
    train (MRC's ascent moves one conv/linear weight).
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


def _set_loss(
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
            xs, y = _batch(inputs, targets, slice(i, i + batch_size), device)
            logits = model(*xs)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return total / len(targets), 100.0 * correct / len(targets)


def _set_loss_and_first_step(
    model: Tail,
    inputs: tuple[Tensor, ...],
    targets: Tensor,
    batch_size: int,
    device: torch.device,
    order: Tensor,
) -> tuple[float, float, Tensor]:
    """``_set_loss`` computed in the batches of ``order``; also returns the logits of the first
    batch with their graph, which are exactly the forward pass of the next ascent step.

    Per-image logits are scattered back to the set's order and the loss is summed over the
    same slices as ``_set_loss``, so the value is the same as long as an image's logits do
    not depend on which images share its batch (the assumption of the cache as well).
    """
    n = len(targets)
    logits_all: Tensor | None = None
    first = torch.empty(0)
    starts = list(range(0, n, batch_size))
    for i in starts[1:] + starts[:1]:  # the first batch last: its graph then overlaps nothing
        idx = order[i : i + batch_size]
        xs, _ = _batch(inputs, targets, idx, device)
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


def _images(inputs: Tensor, idx: Tensor | slice, device: torch.device) -> Tensor:
    """``inputs[idx]`` as float on ``device`` (uint8 images scaled to [0, 1])."""
    x = inputs[idx].to(device)
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return x.float()


_R = TypeVar("_R")


def _channels_last(fn: Callable[..., _R]) -> Callable[..., _R]:
    """``fn`` taking its 4-D inputs in channels_last layout (a no-op copy when they already are)."""

    def call(*xs: Tensor) -> _R:
        return fn(
            *(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in xs)
        )

    return call


def _batch(
    inputs: tuple[Tensor, ...], targets: Tensor, idx: Tensor | slice, device: torch.device
) -> tuple[tuple[Tensor, ...], Tensor]:
    return tuple(_images(t, idx, device) for t in inputs), targets[idx].to(device)


def _nbytes(tensors: tuple[Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class _Cache:
    """What the fast path runs per step: ``tail(*tensors[idx])``."""

    tail: Tail
    tensors: tuple[Tensor, ...]
    block: str = ""  # the block whose input (or, ``inside``, whose frozen part) is cached
    inside: bool = False


def _cached_tail(
    net: nn.Module,
    module_name: str,
    inputs: Tensor,
    batch_size: int,
    device: torch.device,
    max_cache_bytes: int,
    channels_last: bool = False,
    split: bool = True,
) -> _Cache:
    """The network from the perturbed module on, and what it needs for the whole set.

    With ``split`` and a block that can split itself at the module (``Block.split_at``),
    the cache holds the block's frozen part (e.g. for ``conv2``: the output of conv1 +
    bn1 + relu, and the shortcut) when it fits in ``max_cache_bytes``. Otherwise block k
    is the latest block, up to the one running ``module_name``, whose inputs for the
    whole set fit; k = 0 returns the net and ``inputs`` as they are. The cache is computed
    in eval mode, without grad, in batches of ``batch_size`` in order (the slices the
    end-of-epoch evaluation uses), and lives on ``device``.
    """
    blocks = model_blocks(net)
    k = block_index(blocks, module_name)
    cut = blocks[k].split_at(module_name) if split else None
    if k > 0 or cut is not None:  # shapes of every block input, from one image
        with torch.no_grad():
            x = _images(inputs, slice(0, 1), device)
            per_image = []
            for block in blocks[:k]:
                x = block.fn(x)
                per_image.append(x.numel() * x.element_size())
            if cut is not None and _nbytes(cut[0](x)) * len(inputs) > max_cache_bytes:
                cut = None
        if cut is None:
            while k > 0 and per_image[k - 1] * len(inputs) > max_cache_bytes:
                k -= 1
    if k == 0 and cut is None:
        return _Cache(net, (inputs,))

    prefix, rest = blocks[:k], blocks[k + 1 :] if cut is not None else blocks[k:]

    def frozen(x: Tensor) -> tuple[Tensor, ...]:
        x = run_blocks(prefix, x)
        return cut[0](x) if cut is not None else (x,)

    def tail(*xs: Tensor) -> Tensor:
        return run_blocks(rest, cut[1](*xs) if cut is not None else xs[0])

    run_frozen = _channels_last(frozen) if channels_last else frozen
    with torch.no_grad():
        parts = [
            run_frozen(_images(inputs, slice(i, i + batch_size), device))
            for i in range(0, len(inputs), batch_size)
        ]
    tensors = tuple(torch.cat(ts) for ts in zip(*parts))
    return _Cache(tail, tensors, blocks[k].name, cut is not None)


def _frozen_copy(
    model: nn.Module, device: torch.device | str | None, channels_last: bool
) -> tuple[nn.Module, torch.device]:
    """A deep copy of ``model`` in eval mode on ``device`` (default: the model's), in
    channels_last layout if asked, with every parameter frozen; and that device."""
    dev = torch.device(device if device is not None else next(iter(model.parameters())).device)
    net = copy.deepcopy(model).to(dev).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
        p.grad = None
    return net, dev


def _module_weight(net: nn.Module, name: str) -> nn.Parameter:
    """``net.<name>.weight``; ValueError naming ``name`` when there is none."""
    try:
        weight = net.get_submodule(name).weight
    except AttributeError:
        raise ValueError(f"{name}: no such module with a weight in the model") from None
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"{name}: its weight is not a parameter")
    return weight


@dataclass(frozen=True)
class MRCBase:
    """What every module's ascent computes identically before its weight first moves.

    All modules start from the same weights W0, with the same fixed set and (for a given
    ``seed``) the same first batch, so the unperturbed loss and accuracy and the gradient of
    the first ascent step, d(-CE of epoch 1's first batch)/dW at W0, are the same numbers
    in every module's trial. :func:`mrc_base` computes them for all modules in one forward
    over the set and one backward of that batch; ``module_robust_criticality(..., base=)``
    then starts at the first step's update. ``first_grads``: per module name, on CPU.
    ``key``: (set size, batch size, seed, shuffle) they hold for.
    """

    loss_before: float
    acc_before: float
    first_grads: dict[str, Tensor]
    key: tuple[int, int, int, bool]


def mrc_base(
    model: nn.Module,
    module_names: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    *,
    batch_size: int = 512,
    shuffle: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    amp: Amp = "none",
) -> MRCBase:
    """The :class:`MRCBase` of ``module_names`` (each must have a weight parameter) for the
    ascent of :func:`module_robust_criticality` with the same set and arguments.

    The whole network, in eval mode, runs the evaluation in epoch 1's batch order (the one
    ``module_robust_criticality`` draws first from ``seed``); the first batch's graph is
    backpropagated once with every listed weight trainable. On CPU the results are
    bit-identical to what each trial computes itself (tests/test_perf_paths.py).
    """
    if len(targets) == 0:
        raise ValueError("mrc_base: needs a non-empty set")
    net, device = _frozen_copy(model, device, channels_last)
    weights = {name: _module_weight(net, name) for name in module_names}
    for weight in weights.values():
        weight.requires_grad_(True)
    freeze_batch_norms(net)
    n = len(targets)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    forward: Tail = _channels_last(net) if channels_last else net
    with autocast(amp, device):
        loss, acc, first = _set_loss_and_first_step(
            forward, (inputs,), targets, batch_size, device, order
        )
        objective = -F.cross_entropy(first, targets[order[:batch_size]].to(device))
    objective.backward()
    grads = {name: w.grad.detach().cpu() for name, w in weights.items() if w.grad is not None}
    return MRCBase(loss, acc, grads, (n, batch_size, seed, shuffle))


def module_robust_criticality(
    model: nn.Module,
    module_name: str,
    inputs: Tensor,
    targets: Tensor,
    *,
    epsilon: float = 0.1,
    epochs: int = 10,
    batch_size: int = 512,
    lr: float = 1.0,
    projection: Literal["epoch", "step"] = "epoch",
    shuffle: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    fast: bool = True,
    max_cache_bytes: int = 2 * 1024**3,
    channels_last: bool = False,
    split_blocks: bool = True,
    reuse_eval: bool = True,
    amp: Amp = "none",
    compile: bool = False,
    base: MRCBase | None = None,
) -> MRCResult:
    """MRC of ``model.<module_name>.weight`` on the fixed set ``(inputs [N,C,H,W] in [0,1], targets [N])``.

    Works on a deep copy in eval mode (``model`` is not touched). Only the module's
    ``weight`` moves: SGD (lr, no momentum, no weight decay) ascends the CE over
    mini-batches of ``batch_size`` (order from a generator seeded with ``seed`` when
    ``shuffle``) for ``epochs`` epochs. dW = W - W0 is projected onto the L2 ball of
    radius ``epsilon * ||W0||_2`` after each epoch (``projection="epoch"``, the
    reference) or after each step (``"step"``); then the loss on the whole set is measured.

    As in the reference, MRC = max over the end-of-epoch losses minus the unperturbed
    loss. This raw definition could in principle be negative (if every epoch ended
    below the start); with ascent at a modest lr it is >= 0 in practice.
    ``device``: where the copy runs (default: the model's device).

    ``fast``: cache the input of the module's block once (at most ``max_cache_bytes``, on
    ``device``; else an earlier block's, or none) and run only the rest of the network
    per step and per evaluation (module docstring). ``fast=False`` is the reference
    procedure: a full forward and backward per step, a full forward per evaluation.
    ``split_blocks``: let the fast path cache inside the module's block too (for a
    residual block's ``conv2``: conv1's branch and the shortcut), where the model's blocks
    say how (``Block.split_at``); False caches block inputs only.
    ``reuse_eval`` (fast path): the evaluation after an epoch (and before the first) runs
    in the next epoch's batch order and keeps its first batch's graph, which is the first
    ascent step's forward pass (same weights, same images): one forward per epoch saved.
    ``channels_last``: run the copy in channels_last layout (faster convolutions on CPU
    and with cuDNN; the results then differ from the default layout by float rounding).
    ``amp="bf16"``: the cache, the ascent and the evaluations under bf16 autocast (the
    cache is then stored in bf16; MRC values move by about 1e-2 relative, see
    benchmarks/README.md). ``compile``: ``torch.compile`` the per-step forward.
    ``base`` (fast path): the :func:`mrc_base` of this set and these arguments, computed
    once for every module: the unperturbed evaluation and the first ascent step's backward
    are then not recomputed (same values).
    """
    if base is not None:
        if not fast:
            raise ValueError("base: only the fast path takes a shared MRCBase (fast=True)")
        if base.key != (len(targets), batch_size, seed, shuffle):
            raise ValueError(
                f"base: computed for (set size, batch size, seed, shuffle) = {base.key}, "
                f"not {(len(targets), batch_size, seed, shuffle)}"
            )
        if module_name not in base.first_grads:
            raise ValueError(f"base: has no first-step gradient for {module_name}")
    if projection not in ("epoch", "step"):
        raise ValueError(f"projection: must be 'epoch' or 'step' (got {projection!r})")
    if epochs < 1 or len(targets) == 0:
        raise ValueError("module_robust_criticality: needs epochs >= 1 and a non-empty set")
    start = time.perf_counter()
    net, device = _frozen_copy(model, device, channels_last)
    weight = _module_weight(net, module_name)
    weight.requires_grad_(True)
    if fast:
        freeze_batch_norms(net)
    w0 = weight.detach().clone()
    radius = epsilon * float(w0.norm())
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=0.0, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def project() -> None:
        with torch.no_grad():
            delta = weight - w0
            if float(delta.norm()) > radius:  # inside the ball the weight stays bit-identical
                weight.copy_(w0 + project_l2_ball(delta, radius))

    cache = _Cache(net, (inputs,))
    if fast:
        with autocast(amp, device):
            cache = _cached_tail(
                net,
                module_name,
                inputs,
                batch_size,
                device,
                max_cache_bytes,
                channels_last,
                split_blocks,
            )
    forward, tensors = cache.tail, cache.tensors
    if channels_last:
        forward = _channels_last(forward)
    if compile:
        forward = torch.compile(forward)

    def evaluate() -> tuple[float, float]:
        with autocast(amp, device):
            return _set_loss(forward, tensors, targets, batch_size, device, inference=fast)

    n = len(targets)
    reuse = fast and reuse_eval

    def next_order() -> Tensor:
        return torch.randperm(n, generator=gen) if shuffle else torch.arange(n)

    def evaluate_then_order(last: bool) -> tuple[float, float, Tensor | None, Tensor | None]:
        """(loss, acc) now; the next epoch's order and, with ``reuse``, its first logits."""
        if last:
            return *evaluate(), None, None
        if not reuse:
            return *evaluate(), next_order(), None
        order = next_order()  # drawn where the reference draws it: no other draws in between
        with autocast(amp, device):
            loss, acc, first = _set_loss_and_first_step(
                forward, tensors, targets, batch_size, device, order
            )
        return loss, acc, order, first

    first_grad: Tensor | None = None
    if base is not None:  # the unperturbed evaluation and the first backward, done once
        loss_before, acc_before, first = base.loss_before, base.acc_before, None
        order: Tensor | None = next_order()
        first_grad = base.first_grads[module_name].to(device)
    else:
        loss_before, acc_before, order, first = evaluate_then_order(last=False)
    epoch_losses: list[float] = []
    epoch_accs: list[float] = []
    for epoch in range(epochs):
        assert order is not None
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            y = targets[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            if first_grad is not None:  # epoch 1's first step, from the shared base
                weight.grad, first_grad = first_grad.clone(), None
            else:
                with autocast(amp, device):
                    if i == 0 and first is not None:  # computed by the evaluation just before
                        logits = first
                    else:
                        xs, _ = _batch(tensors, targets, idx, device)
                        logits = forward(*xs)
                    objective = -F.cross_entropy(logits, y)
                first = None
                objective.backward()
            optimizer.step()
            if projection == "step":
                project()
        if projection == "epoch":
            project()
        loss, acc, order, first = evaluate_then_order(last=epoch == epochs - 1)
        epoch_losses.append(loss)
        epoch_accs.append(acc)
    best = max(range(epochs), key=lambda e: (epoch_losses[e], -e))  # first epoch on ties
    return MRCResult(
        module=module_name,
        mrc=epoch_losses[best] - loss_before,
        loss_before=loss_before,
        loss_after=epoch_losses[best],
        acc_before=acc_before,
        acc_after=epoch_accs[best],
        epoch_losses=epoch_losses,
        best_epoch=best + 1,
        num_params=weight.numel(),
        seconds=time.perf_counter() - start,
        cached_block=cache.block,
        cache_bytes=_nbytes(cache.tensors) if cache.block else 0,
        cached_inside=cache.inside,
    )


def mrc_table(results: Iterable[MRCResult]) -> list[dict[str, Any]]:
    """One row per module (all fields plus ``acc_drop``), least robust-critical (lowest MRC) first."""
    rows = [dataclasses.asdict(r) | {"acc_drop": r.acc_drop} for r in results]
    return sorted(rows, key=lambda r: r["mrc"])


# -- several modules together ---------------------------------------------------------------


@dataclass(frozen=True)
class JointMRCResult:
    """MRC of a set of modules perturbed together (fields as in :class:`MRCResult`).

    ``modules``: the set, in the order given; ``num_params``: their weights summed.
    ``radii[m]`` is ``epsilon * ||W_m||_2`` and ``delta_norms[e][m]`` the norm of module m's
    perturbation when epoch ``e + 1``'s loss was measured (so ``delta_norms[best_epoch - 1]``
    is the perturbation of ``loss_after``).
    """

    modules: tuple[str, ...]
    mrc: float
    loss_before: float
    loss_after: float
    acc_before: float
    acc_after: float
    epoch_losses: list[float]
    best_epoch: int
    num_params: int
    seconds: float
    radii: list[float]
    delta_norms: list[list[float]]
    cached_block: str = ""
    cache_bytes: int = 0

    @property
    def acc_drop(self) -> float:
        """Robust-accuracy drop (points) at the worst joint perturbation found."""
        return self.acc_before - self.acc_after


def joint_robust_criticality(
    model: nn.Module,
    module_names: Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    *,
    epsilon: float = 0.1,
    epochs: int = 10,
    batch_size: int = 512,
    lr: float = 1.0,
    projection: Literal["epoch", "step"] = "epoch",
    shuffle: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
    fast: bool = True,
    max_cache_bytes: int = 2 * 1024**3,
    channels_last: bool = False,
) -> JointMRCResult:
    """MRC of several modules perturbed together, each inside its own ball:

        max over ||dW_m||_2 <= eps ||W_m||_2 for every m in S of  L_rob(W + dW) - L_rob(W)

    The same ascent as :func:`module_robust_criticality` (same arguments, same batches and
    order for a given ``seed``) with all the weights of ``module_names`` moving at once in
    one SGD optimizer; each perturbation is projected onto its own ball (per epoch or per
    step). A one-module set gives exactly the result of :func:`module_robust_criticality`.
    ``fast`` caches the input of the earliest block that runs one of the modules (and gives
    the frozen batch norms their lean backward, :func:`freeze_batch_norms`).

    A finite ascent is not guaranteed to find at least the largest single-module MRC of
    the members (the joint problem's maximum is at least as large, the ascent's estimate
    need not be).
    """
    names = list(module_names)
    if not names:
        raise ValueError("joint_robust_criticality: needs at least one module")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"{name}: listed twice")
    if projection not in ("epoch", "step"):
        raise ValueError(f"projection: must be 'epoch' or 'step' (got {projection!r})")
    if epochs < 1 or len(targets) == 0:
        raise ValueError("joint_robust_criticality: needs epochs >= 1 and a non-empty set")
    start = time.perf_counter()
    net, device = _frozen_copy(model, device, channels_last)
    weights: list[nn.Parameter] = []
    for name in names:
        weight = _module_weight(net, name)
        if any(weight is w for w in weights):
            raise ValueError(f"{name}: shares its weight with another module of the set")
        weights.append(weight)
    for weight in weights:
        weight.requires_grad_(True)
    if fast:
        freeze_batch_norms(net)
    w0s = [w.detach().clone() for w in weights]
    radii = [epsilon * float(w0.norm()) for w0 in w0s]
    optimizer = torch.optim.SGD(weights, lr=lr, momentum=0.0, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def project() -> None:
        with torch.no_grad():
            for weight, w0, radius in zip(weights, w0s, radii, strict=True):
                delta = weight - w0
                if float(delta.norm()) > radius:  # inside its ball a weight stays bit-identical
                    weight.copy_(w0 + project_l2_ball(delta, radius))

    def delta_norms() -> list[float]:
        with torch.no_grad():
            return [float((w - w0).norm()) for w, w0 in zip(weights, w0s, strict=True)]

    forward: Tail = net
    tensors: tuple[Tensor, ...] = (inputs,)
    cached_block, cache_bytes = "", 0
    if fast:  # the earliest block running one of the modules: its input never changes
        blocks = model_blocks(net)
        first = min(names, key=lambda m: block_index(blocks, m))
        # block inputs only (split=False): other modules of the set may run in that block
        cache = _cached_tail(
            net, first, inputs, batch_size, device, max_cache_bytes, channels_last, split=False
        )
        forward, tensors, cached_block = cache.tail, cache.tensors, cache.block
        if cached_block:
            cache_bytes = _nbytes(tensors)
    if channels_last:
        forward = _channels_last(forward)

    loss_before, acc_before = _set_loss(forward, tensors, targets, batch_size, device)
    epoch_losses: list[float] = []
    epoch_accs: list[float] = []
    norms: list[list[float]] = []
    n = len(targets)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            xs, y = _batch(tensors, targets, order[i : i + batch_size], device)
            optimizer.zero_grad(set_to_none=True)
            (-F.cross_entropy(forward(*xs), y)).backward()
            optimizer.step()
            if projection == "step":
                project()
        if projection == "epoch":
            project()
        loss, acc = _set_loss(forward, tensors, targets, batch_size, device)
        epoch_losses.append(loss)
        epoch_accs.append(acc)
        norms.append(delta_norms())
    best = max(range(epochs), key=lambda e: (epoch_losses[e], -e))  # first epoch on ties
    return JointMRCResult(
        modules=tuple(names),
        mrc=epoch_losses[best] - loss_before,
        loss_before=loss_before,
        loss_after=epoch_losses[best],
        acc_before=acc_before,
        acc_after=epoch_accs[best],
        epoch_losses=epoch_losses,
        best_epoch=best + 1,
        num_params=sum(w.numel() for w in weights),
        seconds=time.perf_counter() - start,
        radii=radii,
        delta_norms=norms,
        cached_block=cached_block,
        cache_bytes=cache_bytes,
    )
