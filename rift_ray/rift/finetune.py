"""Stage 3: fine-tune the chosen (non-robust-critical) modules on clean data.

    for row in finetune(model, ["layer2.1.conv2"], train, lr=0.001, evaluate_fn=val_metrics):
        print(row["epoch"], row["lr"], row["train_acc"], row["clean_acc"])

One dict per epoch, so a Ray Tune trial can report each and ASHA can stop early.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_ray.attacks import eval_mode
from rift_ray.compute import Amp, autocast

Batches = Iterable[tuple[Tensor, Tensor]]


ALL_WEIGHTS = ":all"
"""The module set of the ``full`` ablation: every parameter of the model (BatchNorm's included)."""
BN_STATS = ":bn_stats"
"""The module set of the ``bn_stats`` ablation: no parameter trains; the epochs only move the
BatchNorm running statistics to clean data (forward passes in train mode)."""


def trainable_parameters(model: nn.Module, module_names: Sequence[str]) -> list[nn.Parameter]:
    """Parameters of the named modules and their children (exact module match, no substrings).

    The reference matches parameter names by substring (``"layer2.1.conv2" in name``),
    which also catches e.g. ``layer2.1.conv2x``; matching modules avoids that.
    ``[ALL_WEIGHTS]``: every parameter; ``[BN_STATS]``: none (only BatchNorm statistics move).
    Raises ValueError naming an unknown module or one without parameters.
    """
    if not module_names:
        raise ValueError("module_names: must name at least one module")
    if list(module_names) == [BN_STATS]:
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError("bn_stats: the model has no BatchNorm layer to re-estimate")
        return []
    if list(module_names) == [ALL_WEIGHTS]:
        return list(model.parameters())
    params: dict[int, nn.Parameter] = {}
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{name}: no such module in the model") from None
        own = list(module.parameters())
        if not own:
            raise ValueError(f"{name}: module has no parameters to fine-tune")
        params.update((id(p), p) for p in own)
    return list(params.values())


def finetune(
    model: nn.Module,
    module_names: Sequence[str],
    train_data: Any,
    *,
    epochs: int = 10,
    lr: float = 0.001,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lr_milestones: Sequence[int] = (5,),
    lr_gamma: float = 0.1,
    batch_size: int = 128,
    augment: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    evaluate_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    with_optimizer_state: bool = False,
    amp: Amp = "none",
) -> Iterator[dict[str, Any]]:
    """Fine-tune ``model`` IN PLACE, training only the parameters of ``module_names``.

    The model (already on ``device``) trains in train mode, so the running statistics
    of every BatchNorm layer move toward clean data, as in the reference. SGD with
    momentum and weight decay; the lr is multiplied by ``lr_gamma`` after each epoch in
    ``lr_milestones`` (MultiStepLR: with (5,), epochs 6.. use lr * gamma).

    ``train_data``: an ``ImageData`` (shuffled, augmented when ``augment``, via
    ``rift_ray.data.batches`` seeded by ``(seed, epoch)``) or a callable ``epoch (0-based)
    -> iterable of (x in [0,1], y)``.

    Yields per epoch ``epoch`` (1-based), ``lr`` (used in that epoch), ``train_loss``
    (mean CE), ``train_acc`` (percent, train-mode logits on augmented images),
    ``images``, ``seconds``, ``images_per_s`` and the entries of ``evaluate_fn(model)``,
    which is called with the model in eval mode. Unknown module names raise ValueError
    at call time. Other parameters get ``requires_grad=False`` while the generator runs;
    the original flags and mode are restored when it finishes or is closed.

    Resuming: ``start_epoch`` (epochs already done, with the model already holding their
    weights) and ``optimizer_state`` (the SGD momentum saved then) continue the same
    schedule; ``with_optimizer_state=True`` adds the optimizer's ``state_dict()`` to each
    row under ``"optimizer_state"`` so a caller can checkpoint it.
    ``amp="bf16"``: the training forward under bf16 autocast (:mod:`rift_ray.compute`;
    ``evaluate_fn`` chooses its own).
    """
    params = trainable_parameters(model, module_names)  # validate before the first next()
    if callable(train_data):
        epoch_batches: Callable[[int], Batches] = train_data
    else:

        def epoch_batches(epoch: int) -> Batches:
            from rift_ray.data import batches

            return batches(
                train_data,
                batch_size,
                shuffle=True,
                augment=augment,
                seed=seed,
                epoch=epoch,
                device=device,
            )

    return _epochs(
        model,
        params,
        epoch_batches,
        epochs,
        lr,
        momentum,
        weight_decay,
        lr_milestones,
        lr_gamma,
        evaluate_fn,
        start_epoch,
        optimizer_state,
        with_optimizer_state,
        amp,
    )


def _epochs(
    model: nn.Module,
    params: list[nn.Parameter],
    epoch_batches: Callable[[int], Batches],
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    lr_milestones: Sequence[int],
    lr_gamma: float,
    evaluate_fn: Callable[[nn.Module], dict[str, Any]] | None,
    start_epoch: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    with_optimizer_state: bool = False,
    amp: Amp = "none",
) -> Iterator[dict[str, Any]]:
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_modes = [(m, m.training) for m in model.modules()]
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    if not params:  # bn_stats: forward passes only, so only BatchNorm statistics move
        try:
            yield from _statistics_epochs(
                model, epoch_batches, epochs, evaluate_fn, start_epoch, amp
            )
        finally:
            _restore(saved_flags, saved_modes)
        return
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(lr_milestones), gamma=lr_gamma
    )
    if start_epoch:
        with warnings.catch_warnings():  # stepping the schedule without optimizer steps is intended
            warnings.simplefilter("ignore")
            for _ in range(start_epoch):
                scheduler.step()
    if optimizer_state is not None:
        lrs = [g["lr"] for g in optimizer.param_groups]
        optimizer.load_state_dict(optimizer_state)
        for g, group_lr in zip(optimizer.param_groups, lrs):
            g["lr"] = group_lr
    try:
        for epoch in range(start_epoch, epochs):
            model.train()
            current_lr = optimizer.param_groups[0]["lr"]
            start = time.perf_counter()
            n, loss_sum, correct = 0, 0.0, 0
            for x, y in epoch_batches(epoch):
                with autocast(amp, x.device):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                n += len(y)
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.detach().argmax(1) == y).sum())
            scheduler.step()
            seconds = time.perf_counter() - start
            if n == 0:
                raise ValueError("finetune: an epoch had no batches")
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": current_lr,
                "train_loss": loss_sum / n,
                "train_acc": 100.0 * correct / n,
                "images": n,
                "seconds": seconds,
                "images_per_s": n / seconds if seconds > 0 else float("inf"),
            }
            if evaluate_fn is not None:
                with eval_mode(model):
                    row |= evaluate_fn(model)
            if with_optimizer_state:
                row["optimizer_state"] = optimizer.state_dict()
            yield row
    finally:
        _restore(saved_flags, saved_modes)


def _restore(flags: list[tuple[nn.Parameter, bool]], modes: list[tuple[nn.Module, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)
    for m, training in modes:
        m.training = training


def _statistics_epochs(
    model: nn.Module,
    epoch_batches: Callable[[int], Batches],
    epochs: int,
    evaluate_fn: Callable[[nn.Module], dict[str, Any]] | None,
    start_epoch: int,
    amp: Amp,
) -> Iterator[dict[str, Any]]:
    """The ``bn_stats`` ablation's epochs: the same batches in train mode without gradients
    (rows as :func:`finetune` yields, ``lr`` 0). The caller restores modes and flags."""
    for epoch in range(start_epoch, epochs):
        model.train()
        start = time.perf_counter()
        n, loss_sum, correct = 0, 0.0, 0
        with torch.no_grad():
            for x, y in epoch_batches(epoch):
                with autocast(amp, x.device):
                    logits = model(x)
                    loss = F.cross_entropy(logits, y)
                n += len(y)
                loss_sum += float(loss) * len(y)
                correct += int((logits.argmax(1) == y).sum())
        seconds = time.perf_counter() - start
        if n == 0:
            raise ValueError("finetune: an epoch had no batches")
        row: dict[str, Any] = {
            "epoch": epoch + 1, "lr": 0.0, "train_loss": loss_sum / n,
            "train_acc": 100.0 * correct / n, "images": n, "seconds": seconds,
            "images_per_s": n / seconds if seconds > 0 else float("inf"),
        }  # fmt: skip
        if evaluate_fn is not None:
            with eval_mode(model):
                row |= evaluate_fn(model)
        yield row


INFEASIBLE_OFFSET = 200.0
"""Points subtracted from the penalised score of a trial with no feasible alpha: clean gains
lie in [-100, 100], so every such trial ranks below every trial with a feasible one."""


def asha_score(
    rows: Sequence[dict[str, float]], tolerance: float, penalty: float, score: str = "rule"
) -> float:
    """The ASHA metric of one epoch, in points; ``rows[0]`` is the AT model (alpha = 0), the
    others interpolated models (dicts with ``clean_acc``, ``robust_acc`` in percent).

    ``score="rule"`` (the default): where some alpha > 0 is feasible (robust drop at most
    ``tolerance``), the score is the paper's rule: the largest clean gain among the feasible
    alphas (negative when every feasible alpha loses clean accuracy), infeasible alphas
    ignored. Where none is feasible, the penalised score below minus
    :data:`INFEASIBLE_OFFSET`: it still ranks such trials by how close they come (instead of
    tying them all), always below every trial with a feasible alpha.

    ``score="penalised"`` (what sweeps ran before ``finetune.score`` existed): max over
    alpha > 0 of (clean gain - ``penalty`` x robust drop beyond the tolerance), infeasible
    alphas included, so an infeasible alpha can outrank the rule's choice.
    """
    base = rows[0]

    def drop(r: dict[str, float]) -> float:
        return base["robust_acc"] - r["robust_acc"]

    def penalised(r: dict[str, float]) -> float:
        return (r["clean_acc"] - base["clean_acc"]) - penalty * max(0.0, drop(r) - tolerance)

    if score == "penalised":
        return max(penalised(r) for r in rows[1:])
    if score != "rule":
        raise ValueError(f"asha_score: unknown score {score!r} (rule or penalised)")
    feasible = [r for r in rows[1:] if drop(r) <= tolerance + 1e-9]
    if feasible:
        return max(r["clean_acc"] - base["clean_acc"] for r in feasible)
    return max(penalised(r) for r in rows[1:]) - INFEASIBLE_OFFSET
