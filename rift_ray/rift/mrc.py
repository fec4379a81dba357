"""Stage 2: Module Robust Criticality (MRC), as the RiFT reference code computes it.

    MRC(m) = max_{||dW||_2 <= eps ||W||_2} L_rob(W_m + dW) - L_rob(W_m)

where W is the flattened weight of module m alone (never bias or BatchNorm) and
L_rob the mean cross-entropy on a FIXED set of adversarial examples made once from
the adversarially trained model. The max is approximated by gradient ascent:

    x_adv, y = adversarial_set(model, val)            # PGD-10, eps 8/255, seeded
    res = robust_criticality(model, "layer2.1.conv2", x_adv, y)
    res.mrc, res.acc_before - res.acc_after            # loss rise, robust-acc drop (points)

The same function takes a set of modules, perturbed together, each weight in its own
ball (joint MRC, what the greedy selection scores):

    robust_criticality(model, ["layer2.1.conv2", "layer3.0.conv1"], x_adv, y, MRCOptions(epochs=5))

Fast path (``MRCOptions.fast``, the default): the model is in eval mode and only the
weights of the module(s) move, so everything computed before the earliest of them is
used never changes:

1. The input of the block that runs the (earliest) module (:mod:`rift_ray.models.blocks`)
   is computed once for the whole set; inside a residual block also its frozen part (for
   ``conv2``: the output of conv1/bn1/relu and the shortcut; for the shortcut conv: the
   residual branch), so every ascent step and every evaluation runs only the module
   onward (for the classifier: the pooled features are cached). A set caches inside a
   block only when the block runs no other module of the set.
2. The evaluation before each epoch (the unperturbed loss, then each end-of-epoch loss)
   runs in that epoch's batch order and hands the first batch's forward pass, graph and
   all, to the first ascent step, which would compute exactly that again.
3. Evaluations run under ``torch.inference_mode``.
4. Batch norms, all frozen, backpropagate only their input's gradient
   (:func:`~rift_ray.rift.mrc_fast.freeze_batch_norms`; PyTorch's backward also reduces
   for their own weights).
5. With ``base`` (:func:`mrc_base`, what the MRC stage passes): the unperturbed evaluation
   and the first ascent step's gradient, the same for every module, are computed once for
   all modules instead of once per trial.

Same batches, same order, same seed as the reference path (``fast=False``, a full
forward and backward per step); on CPU the results are bit-identical (benchmarks/README.md).
The machinery lives in :mod:`rift_ray.rift.mrc_fast`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_ray.attacks import eval_mode, iter_batches, pgd_attack
from rift_ray.compute import AMP_MODES, Amp, autocast
from rift_ray.rift.mrc_fast import (
    Cache,
    Tail,
    batch,
    cached_tail,
    channels_last_inputs,
    freeze_batch_norms,
    nbytes,
    set_loss,
    set_loss_and_first_step,
)


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
    How the stage stores it: :mod:`rift_ray.advset`.
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
class MRCOptions:
    """How :func:`robust_criticality` runs the ascent.

    The ascent (RIFT.md; these define the number): SGD (``lr``, no momentum, no weight
    decay) ascends the CE over mini-batches of ``batch_size`` (order from a generator seeded
    with ``seed`` when ``shuffle``) for ``epochs`` epochs; each perturbation dW = W - W0 is
    projected onto its L2 ball of radius ``epsilon * ||W0||_2`` after each epoch
    (``projection="epoch"``, the reference) or after each step (``"step"``).

    How it is computed (the same numbers on CPU unless said otherwise):

    - ``fast``: the fast path (module docstring): cache what is frozen before the module(s)
      (at most ``max_cache_bytes``, on the device; else an earlier block's input, or
      nothing) and run only the rest per step and per evaluation. False is the reference
      procedure: a full forward and backward per step, a full forward per evaluation.
    - ``split_blocks`` (fast path): cache inside the module's block too (for a residual
      block's ``conv2``: conv1's branch and the shortcut), where the model's blocks say how
      (``Block.split_at``); False caches block inputs only.
    - ``reuse_eval`` (fast path): the evaluation after an epoch (and before the first) runs
      in the next epoch's batch order and keeps its first batch's graph, which is the first
      ascent step's forward pass (same weights, same images): one forward per epoch saved.
    - ``channels_last``: run the copy in channels_last layout (faster convolutions on CPU
      and with cuDNN; results differ from the default layout by float rounding).
    - ``amp="bf16"``: the cache, the ascent and the evaluations under bf16 autocast (the
      cache is then stored in bf16; MRC values move by about 1e-2 relative, see
      benchmarks/README.md).
    - ``compile``: ``torch.compile`` the per-step forward.
    """

    epsilon: float = 0.1
    epochs: int = 10
    batch_size: int = 512
    lr: float = 1.0
    projection: Literal["epoch", "step"] = "epoch"
    shuffle: bool = True
    seed: int = 0

    fast: bool = True
    max_cache_bytes: int = 2 * 1024**3
    split_blocks: bool = True
    reuse_eval: bool = True
    channels_last: bool = False
    amp: Amp = "none"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.projection not in ("epoch", "step"):
            raise ValueError(f"projection: must be 'epoch' or 'step' (got {self.projection!r})")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("MRCOptions: needs epochs >= 1 and batch_size >= 1")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: must be one of {AMP_MODES} (got {self.amp!r})")

    def base_key(self, set_size: int) -> tuple[int, int, int, bool]:
        """What an :class:`MRCBase` holds for: (set size, batch size, seed, shuffle)."""
        return (set_size, self.batch_size, self.seed, self.shuffle)


@dataclass(frozen=True)
class MRCResult:
    """MRC of one module or of a set of modules perturbed together. Losses are mean CE
    (nats) on the fixed set, accuracies in percent.

    ``modules``: the module, or the set in the order given; ``num_params``: their weights
    summed. ``loss_after`` is the largest end-of-epoch loss (epoch ``best_epoch``, 1-based)
    and ``acc_after`` the accuracy at that epoch, so ``mrc == loss_after - loss_before``.
    ``radii[m]`` is ``epsilon * ||W_m||_2`` and ``delta_norms[e][m]`` the norm of module m's
    perturbation when epoch ``e + 1``'s loss was measured (so ``delta_norms[best_epoch - 1]``
    is the perturbation of ``loss_after``). ``cached_block``: the block whose input the
    fast path cached ("" when none was, e.g. the stem or ``fast=False``);
    ``cached_inside``: the cache holds the frozen part of that block before the module (and
    its shortcut) instead of its input; ``cache_bytes``: the size of that cache.
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
    cached_inside: bool = False

    @property
    def module(self) -> str:
        """The module's name; for a set, the names joined by ``+`` (as the tables write it)."""
        return "+".join(self.modules)

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
    in every module's trial (and in a set's, for each of its weights). :func:`mrc_base`
    computes them for all modules in one forward over the set and one backward of that
    batch; ``robust_criticality(..., base=)`` then starts at the first step's update.
    ``first_grads``: per module name, on CPU. ``key``: (set size, batch size, seed,
    shuffle) they hold for (:meth:`MRCOptions.base_key`).
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
    opts: MRCOptions = MRCOptions(),
    *,
    device: torch.device | str | None = None,
) -> MRCBase:
    """The :class:`MRCBase` of ``module_names`` (each must have a weight parameter) for the
    fast-path ascent of :func:`robust_criticality` with the same set and options (it uses
    ``batch_size``, ``shuffle``, ``seed``, ``channels_last`` and ``amp``).

    The whole network, in eval mode, runs the evaluation in epoch 1's batch order (the one
    ``robust_criticality`` draws first from ``seed``); the first batch's graph is
    backpropagated once with every listed weight trainable. On CPU the results are
    bit-identical to what each trial computes itself (tests/test_perf_paths.py).
    """
    if len(targets) == 0:
        raise ValueError("mrc_base: needs a non-empty set")
    net, device = _frozen_copy(model, device, opts.channels_last)
    weights = {name: _module_weight(net, name) for name in module_names}
    for weight in weights.values():
        weight.requires_grad_(True)
    freeze_batch_norms(net)
    n, batch_size = len(targets), opts.batch_size
    gen = torch.Generator().manual_seed(opts.seed)
    order = torch.randperm(n, generator=gen) if opts.shuffle else torch.arange(n)
    forward: Tail = channels_last_inputs(net) if opts.channels_last else net
    with autocast(opts.amp, device):
        loss, acc, first = set_loss_and_first_step(
            forward, (inputs,), targets, batch_size, device, order
        )
        objective = -F.cross_entropy(first, targets[order[:batch_size]].to(device))
    objective.backward()
    grads = {name: w.grad.detach().cpu() for name, w in weights.items() if w.grad is not None}
    return MRCBase(loss, acc, grads, opts.base_key(n))


def _module_names(modules: str | Sequence[str]) -> tuple[str, ...]:
    """``modules`` as a tuple of distinct names (a string is one module)."""
    names = (modules,) if isinstance(modules, str) else tuple(modules)
    if not names:
        raise ValueError("robust_criticality: needs at least one module")
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"{name}: listed twice")
    return names


def _check_base(base: MRCBase, names: Sequence[str], set_size: int, opts: MRCOptions) -> None:
    """ValueError unless ``base`` was computed for this trial."""
    if not opts.fast:
        raise ValueError("base: only the fast path takes a shared MRCBase (fast=True)")
    if base.key != opts.base_key(set_size):
        raise ValueError(
            f"base: computed for (set size, batch size, seed, shuffle) = {base.key}, "
            f"not {opts.base_key(set_size)}"
        )
    for name in names:
        if name not in base.first_grads:
            raise ValueError(f"base: has no first-step gradient for {name}")


class _Balls:
    """The weights that move (trainable, in ``net``), where they start and their balls."""

    def __init__(self, net: nn.Module, names: Sequence[str], epsilon: float) -> None:
        self.weights: list[nn.Parameter] = []
        for name in names:
            weight = _module_weight(net, name)
            if any(weight is w for w in self.weights):
                raise ValueError(f"{name}: shares its weight with another module of the set")
            self.weights.append(weight)
        for weight in self.weights:
            weight.requires_grad_(True)
        self.w0s = [w.detach().clone() for w in self.weights]
        self.radii = [epsilon * float(w0.norm()) for w0 in self.w0s]

    def project(self) -> None:
        """Each perturbation onto its own ball."""
        with torch.no_grad():
            for weight, w0, radius in zip(self.weights, self.w0s, self.radii, strict=True):
                delta = weight - w0
                if float(delta.norm()) > radius:  # inside its ball a weight stays bit-identical
                    weight.copy_(w0 + project_l2_ball(delta, radius))

    def delta_norms(self) -> list[float]:
        with torch.no_grad():
            return [float((w - w0).norm()) for w, w0 in zip(self.weights, self.w0s, strict=True)]


class _Passes:
    """The passes of one ascent over the fixed set: evaluations, batch orders, ascent steps."""

    def __init__(
        self, cache: Cache, targets: Tensor, opts: MRCOptions, device: torch.device
    ) -> None:
        forward = cache.tail
        if opts.channels_last:
            forward = channels_last_inputs(forward)
        if opts.compile:
            forward = torch.compile(forward)
        self.forward, self.tensors, self.targets = forward, cache.tensors, targets
        self.opts, self.device = opts, device
        self.reuse = opts.fast and opts.reuse_eval
        self.gen = torch.Generator().manual_seed(opts.seed)

    def next_order(self) -> Tensor:
        n = len(self.targets)
        return torch.randperm(n, generator=self.gen) if self.opts.shuffle else torch.arange(n)

    def evaluate(self) -> tuple[float, float]:
        o = self.opts
        with autocast(o.amp, self.device):
            return set_loss(
                self.forward, self.tensors, self.targets, o.batch_size, self.device, o.fast
            )

    def evaluate_then_order(self, last: bool) -> tuple[float, float, Tensor | None, Tensor | None]:
        """(loss, acc) now; the next epoch's order and, with ``reuse``, its first logits."""
        if last:
            return *self.evaluate(), None, None
        if not self.reuse:
            return *self.evaluate(), self.next_order(), None
        order = self.next_order()  # drawn where the reference draws it: no other draws between
        with autocast(self.opts.amp, self.device):
            loss, acc, first = set_loss_and_first_step(
                self.forward, self.tensors, self.targets, self.opts.batch_size, self.device, order
            )
        return loss, acc, order, first

    def backward(self, idx: Tensor, logits: Tensor | None) -> None:
        """Backpropagate -CE of the batch ``idx`` (``logits``: its forward, when already run)."""
        y = self.targets[idx].to(self.device)
        with autocast(self.opts.amp, self.device):
            if logits is None:
                xs, _ = batch(self.tensors, self.targets, idx, self.device)
                logits = self.forward(*xs)
            objective = -F.cross_entropy(logits, y)
        objective.backward()


def _ascend(
    passes: _Passes,
    balls: _Balls,
    order: Tensor | None,
    first: Tensor | None,
    first_grads: list[Tensor] | None,
) -> tuple[list[float], list[float], list[list[float]]]:
    """The epochs of the ascent, epoch 1 in batch ``order``; per epoch (loss, accuracy, norms
    of the perturbations) when it ends. ``first``: the logits of epoch 1's first batch
    (from the evaluation before); ``first_grads``: its weights' gradients (from a base)."""
    opts, n = passes.opts, len(passes.targets)
    optimizer = torch.optim.SGD(balls.weights, lr=opts.lr, momentum=0.0, weight_decay=0.0)
    losses: list[float] = []
    accs: list[float] = []
    norms: list[list[float]] = []
    for epoch in range(opts.epochs):
        assert order is not None
        for i in range(0, n, opts.batch_size):
            optimizer.zero_grad(set_to_none=True)
            if first_grads is not None:  # epoch 1's first step, from the shared base
                for weight, grad in zip(balls.weights, first_grads, strict=True):
                    weight.grad = grad.clone()
                first_grads = None
            else:  # the first step's forward may come from the evaluation just before
                passes.backward(order[i : i + opts.batch_size], first if i == 0 else None)
                first = None
            optimizer.step()
            if opts.projection == "step":
                balls.project()
        if opts.projection == "epoch":
            balls.project()
        loss, acc, order, first = passes.evaluate_then_order(last=epoch == opts.epochs - 1)
        losses.append(loss)
        accs.append(acc)
        norms.append(balls.delta_norms())
    return losses, accs, norms


def robust_criticality(
    model: nn.Module,
    modules: str | Sequence[str],
    inputs: Tensor,
    targets: Tensor,
    opts: MRCOptions = MRCOptions(),
    *,
    base: MRCBase | None = None,
    device: torch.device | str | None = None,
) -> MRCResult:
    """MRC of ``modules`` (one name, or a set perturbed together) on the fixed set
    ``(inputs [N,C,H,W] in [0,1] or uint8, targets [N])``:

        max over ||dW_m||_2 <= eps ||W_m||_2 for every m in the set of  L_rob(W + dW) - L_rob(W)

    Works on a deep copy in eval mode (``model`` is not touched). Only the modules'
    ``weight``s move, all in one SGD optimizer, each projected onto its own ball
    (:class:`MRCOptions`); then the loss on the whole set is measured. As in the
    reference, MRC = max over the end-of-epoch losses minus the unperturbed loss. This raw
    definition could in principle be negative (if every epoch ended below the start); with
    ascent at a modest lr it is >= 0 in practice. For a set, a finite ascent is not
    guaranteed to find at least the largest single-module MRC of the members (the joint
    problem's maximum is at least as large, the ascent's estimate need not be). A
    one-module set gives exactly the result of that module alone.

    ``device``: where the copy runs (default: the model's). ``base`` (fast path): the
    :func:`mrc_base` of this set and these options, holding every module of ``modules``:
    the unperturbed evaluation and the first ascent step's backward are then not
    recomputed (same values).
    """
    names = _module_names(modules)
    n = len(targets)
    if base is not None:
        _check_base(base, names, n, opts)
    if n == 0:
        raise ValueError("robust_criticality: needs a non-empty set")
    start = time.perf_counter()
    net, dev = _frozen_copy(model, device, opts.channels_last)
    balls = _Balls(net, names, opts.epsilon)
    cache = Cache(net, (inputs,))
    if opts.fast:
        freeze_batch_norms(net)
        with autocast(opts.amp, dev):
            cache = cached_tail(
                net,
                names,
                inputs,
                opts.batch_size,
                dev,
                opts.max_cache_bytes,
                opts.channels_last,
                opts.split_blocks,
            )
    passes = _Passes(cache, targets, opts, dev)
    if base is not None:  # the unperturbed evaluation and the first backward, done once
        loss_before, acc_before = base.loss_before, base.acc_before
        first_grads = [base.first_grads[name].to(dev) for name in names]
        losses, accs, norms = _ascend(passes, balls, passes.next_order(), None, first_grads)
    else:
        loss_before, acc_before, order, first = passes.evaluate_then_order(last=False)
        losses, accs, norms = _ascend(passes, balls, order, first, None)
    best = max(range(opts.epochs), key=lambda e: (losses[e], -e))  # first epoch on ties
    return MRCResult(
        modules=names,
        mrc=losses[best] - loss_before,
        loss_before=loss_before,
        loss_after=losses[best],
        acc_before=acc_before,
        acc_after=accs[best],
        epoch_losses=losses,
        best_epoch=best + 1,
        num_params=sum(w.numel() for w in balls.weights),
        seconds=time.perf_counter() - start,
        radii=balls.radii,
        delta_norms=norms,
        cached_block=cache.block,
        cache_bytes=nbytes(cache.tensors) if cache.block else 0,
        cached_inside=cache.inside,
    )


def mrc_table(results: Iterable[MRCResult]) -> list[dict[str, Any]]:
    """One row per result (all fields plus ``module`` and ``acc_drop``), least
    robust-critical (lowest MRC) first."""
    rows = [dataclasses.asdict(r) | {"module": r.module, "acc_drop": r.acc_drop} for r in results]
    return sorted(rows, key=lambda r: r["mrc"])
