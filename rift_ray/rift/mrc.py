"""Stage 2: Module Robust Criticality (MRC), as the RiFT reference code computes it.

    MRC(m) = max_{||dW||_2 <= eps ||W||_2} L_rob(W_m + dW) - L_rob(W_m)

where W is the flattened weight of module m alone (never bias or BatchNorm) and
L_rob the mean cross-entropy on a FIXED set of adversarial examples made once from
the adversarially trained model. The max is approximated by gradient ascent:

    x_adv, y = adversarial_set(model, val)            # PGD-10, eps 8/255, seeded
    res = module_robust_criticality(model, "layer2.1.conv2", x_adv, y)
    res.mrc, res.acc_before - res.acc_after            # loss rise, robust-acc drop (points)

Fast path (``fast=True``, the default): the model is in eval mode and only one weight
moves, so the input of the block that runs the module (:mod:`rift_ray.models.blocks`)
never changes. It is computed once for the whole set, and every ascent step and every
end-of-epoch evaluation runs only the rest of the network (for the classifier: the
pooled features are cached). Same batches, same order, same seed as the reference
path (``fast=False``, a full forward and backward per step); the results agree to
float rounding (benchmarks/README.md gives the measured difference).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_ray.attacks import eval_mode, iter_batches, pgd_attack
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


@dataclass(frozen=True)
class MRCResult:
    """MRC of one module. Losses are mean CE (nats) on the fixed set, accuracies in percent.

    ``loss_after`` is the largest end-of-epoch loss (epoch ``best_epoch``, 1-based) and
    ``acc_after`` the accuracy at that epoch, so ``mrc == loss_after - loss_before``.
    ``cached_block``: the block whose input the fast path cached ("" when none was, e.g.
    the stem or ``fast=False``); ``cache_bytes``: the size of that cache.
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


Tail = Callable[[Tensor], Tensor]  # a forward pass (possibly of part of a network)


def _set_loss(
    model: Tail,
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
    device: torch.device,
) -> tuple[float, float]:
    """Mean CE and accuracy (percent) of ``model`` over the whole set, in order, under no_grad."""
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(targets), batch_size):
            x, y = _batch(inputs, targets, slice(i, i + batch_size), device)
            logits = model(x)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return total / len(targets), 100.0 * correct / len(targets)


def _images(inputs: Tensor, idx: Tensor | slice, device: torch.device) -> Tensor:
    """``inputs[idx]`` as float on ``device`` (uint8 images scaled to [0, 1])."""
    x = inputs[idx].to(device)
    if x.dtype == torch.uint8:
        x = x.float() / 255
    return x.float()


def _channels_last(fn: Tail) -> Tail:
    """``fn`` taking its 4-D inputs in channels_last layout (a no-op copy when they already are)."""

    def call(x: Tensor) -> Tensor:
        return fn(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)

    return call


def _batch(
    inputs: Tensor, targets: Tensor, idx: Tensor | slice, device: torch.device
) -> tuple[Tensor, Tensor]:
    return _images(inputs, idx, device), targets[idx].to(device)


def _cached_tail(
    net: nn.Module,
    module_name: str,
    inputs: Tensor,
    batch_size: int,
    device: torch.device,
    max_cache_bytes: int,
    channels_last: bool = False,
) -> tuple[Tail, Tensor, str]:
    """(the network from block k on, the inputs of block k for the whole set, its name).

    Block k is the latest block, up to the one running ``module_name``, whose inputs for
    the whole set fit in ``max_cache_bytes``; k = 0 returns the net and ``inputs`` as they
    are. The cache is computed in eval mode, without grad, in batches of ``batch_size`` in
    order (the slices the end-of-epoch evaluation uses), and lives on ``device``.
    """
    blocks = model_blocks(net)
    k = block_index(blocks, module_name)
    if k > 0:  # shapes of every block input, from one image
        with torch.no_grad():
            x = _images(inputs, slice(0, 1), device)
            per_image = []
            for block in blocks[:k]:
                x = block.fn(x)
                per_image.append(x.numel() * x.element_size())
        while k > 0 and per_image[k - 1] * len(inputs) > max_cache_bytes:
            k -= 1
    if k == 0:
        return net, inputs, ""

    def prefix(x: Tensor) -> Tensor:
        return run_blocks(blocks[:k], x)

    run_prefix = _channels_last(prefix) if channels_last else prefix
    with torch.no_grad():
        parts = [
            run_prefix(_images(inputs, slice(i, i + batch_size), device))
            for i in range(0, len(inputs), batch_size)
        ]
    rest = blocks[k:]
    return (lambda f: run_blocks(rest, f)), torch.cat(parts), rest[0].name


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
    ``channels_last``: run the copy in channels_last layout (faster convolutions on CPU
    and with cuDNN; the results then differ from the default layout by float rounding).
    """
    if projection not in ("epoch", "step"):
        raise ValueError(f"projection: must be 'epoch' or 'step' (got {projection!r})")
    if epochs < 1 or len(targets) == 0:
        raise ValueError("module_robust_criticality: needs epochs >= 1 and a non-empty set")
    start = time.perf_counter()
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    net = copy.deepcopy(model).to(device).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    try:
        weight = net.get_submodule(module_name).weight
    except AttributeError:
        raise ValueError(f"{module_name}: no such module with a weight in the model") from None
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"{module_name}: its weight is not a parameter")
    for p in net.parameters():
        p.requires_grad_(False)
        p.grad = None
    weight.requires_grad_(True)
    w0 = weight.detach().clone()
    radius = epsilon * float(w0.norm())
    optimizer = torch.optim.SGD([weight], lr=lr, momentum=0.0, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def project() -> None:
        with torch.no_grad():
            delta = weight - w0
            if float(delta.norm()) > radius:  # inside the ball the weight stays bit-identical
                weight.copy_(w0 + project_l2_ball(delta, radius))

    forward: Tail = net
    cached_block, cache_bytes = "", 0
    if fast:
        forward, inputs, cached_block = _cached_tail(
            net, module_name, inputs, batch_size, device, max_cache_bytes, channels_last
        )
        if cached_block:
            cache_bytes = inputs.numel() * inputs.element_size()
    if channels_last:
        forward = _channels_last(forward)

    loss_before, acc_before = _set_loss(forward, inputs, targets, batch_size, device)
    epoch_losses: list[float] = []
    epoch_accs: list[float] = []
    n = len(targets)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            x, y = _batch(inputs, targets, order[i : i + batch_size], device)
            optimizer.zero_grad(set_to_none=True)
            (-F.cross_entropy(forward(x), y)).backward()
            optimizer.step()
            if projection == "step":
                project()
        if projection == "epoch":
            project()
        loss, acc = _set_loss(forward, inputs, targets, batch_size, device)
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
        cached_block=cached_block,
        cache_bytes=cache_bytes,
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
    ``fast`` caches the input of the earliest block that runs one of the modules.

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
    if device is None:
        device = next(iter(model.parameters())).device
    device = torch.device(device)
    net = copy.deepcopy(model).to(device).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    weights: list[nn.Parameter] = []
    for name in names:
        try:
            weight = net.get_submodule(name).weight
        except AttributeError:
            raise ValueError(f"{name}: no such module with a weight in the model") from None
        if not isinstance(weight, nn.Parameter):
            raise ValueError(f"{name}: its weight is not a parameter")
        if any(weight is w for w in weights):
            raise ValueError(f"{name}: shares its weight with another module of the set")
        weights.append(weight)
    for p in net.parameters():
        p.requires_grad_(False)
        p.grad = None
    for weight in weights:
        weight.requires_grad_(True)
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
    cached_block, cache_bytes = "", 0
    if fast:  # the earliest block running one of the modules: its input never changes
        blocks = model_blocks(net)
        first = min(names, key=lambda m: block_index(blocks, m))
        forward, inputs, cached_block = _cached_tail(
            net, first, inputs, batch_size, device, max_cache_bytes, channels_last
        )
        if cached_block:
            cache_bytes = inputs.numel() * inputs.element_size()
    if channels_last:
        forward = _channels_last(forward)

    loss_before, acc_before = _set_loss(forward, inputs, targets, batch_size, device)
    epoch_losses: list[float] = []
    epoch_accs: list[float] = []
    norms: list[list[float]] = []
    n = len(targets)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            x, y = _batch(inputs, targets, order[i : i + batch_size], device)
            optimizer.zero_grad(set_to_none=True)
            (-F.cross_entropy(forward(x), y)).backward()
            optimizer.step()
            if projection == "step":
                project()
        if projection == "epoch":
            project()
        loss, acc = _set_loss(forward, inputs, targets, batch_size, device)
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
