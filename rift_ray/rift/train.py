"""Stage 1: one epoch of adversarial training (PGD-AT, Madry et al. 2018; TRADES, Zhang et
al. 2019; or FGSM-RS, Wong, Rice and Kolter 2020, "Fast is better than free").

opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
for epoch in range(110):
    stats = adversarial_train_epoch(model, batches(train, 128, ...), opt,
                                    eps=8/255, step_size=2/255, steps=10)

FGSM-RS trains on one signed-gradient step of ``fgsm_step`` x eps from a uniform random
start (one attack forward/backward instead of PGD's ``steps``). It can overfit
catastrophically: PGD accuracy collapses within an epoch while FGSM accuracy climbs. The
guard is the caller's per-epoch PGD check on validation images and :func:`best_epoch`, which
never picks an epoch :func:`collapsed` flags.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_ray.attacks import eval_mode, pgd_attack, trades_attack
from rift_ray.compute import Amp, autocast

Method = Literal["pgd", "trades", "fgsm_rs", "free"]
METHODS: tuple[str, ...] = ("pgd", "trades", "fgsm_rs", "free")

FGSM_STEP = 1.25
"""FGSM-RS's step as a fraction of eps: Wong et al.'s alpha = 1.25 eps (10/255 at 8/255)."""

COLLAPSE_DROP = 20.0
"""Catastrophic overfitting: validation PGD accuracy this many points below the best epoch
before it (Wong et al. stop when PGD accuracy on a training batch falls by 20 points)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The network inside DataParallel/DDP: attacks and metric forwards need no gradient sync."""
    if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
        return model.module
    return model


def adversarial_train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    eps: float,
    step_size: float,
    steps: int,
    method: Method = "pgd",
    trades_beta: float = 6.0,
    fgsm_step: float = FGSM_STEP,
    free_replays: int = 8,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    scheduler: Any = None,
    amp: Amp = "none",
) -> dict[str, float]:
    """Train ``model`` in place for one pass over ``batches`` ((x in [0,1], y) on the model's device).

    Attacks run with the model in eval mode (BatchNorm uses running statistics and
    is not updated by attack forwards); the training step runs in train mode.

    - ``pgd``: loss = CE(model(x_adv), y), x_adv from L-inf PGD (uniform random start
      when ``random_start``).
    - ``trades``: x_adv from PGD on KL starting at x + 0.001 N(0,1); loss =
      CE(model(x), y) + beta * KL(p(x) || p(x_adv)) (batch mean), as in the official
      TRADES code (which the paper writes KL(f(x) || f(x_adv))).
    - ``fgsm_rs``: loss = CE(model(x_adv), y), x_adv from :func:`fgsm_rs_attack` with step
      ``fgsm_step * eps`` (``step_size``, ``steps`` and ``random_start`` are not used).
    - ``free``: "free" AT (Shafahi et al. 2019), :func:`free_replay_batch`: each minibatch is
      replayed ``free_replays`` times, one optimizer step each, the perturbation carried
      over between replays and minibatches (zero at the epoch's start). One pass costs
      ``free_replays`` clean-training passes: run ``epochs / free_replays`` passes.

    ``amp="bf16"``: the attack and the training forward run under bf16 autocast
    (:mod:`rift_ray.compute`; the backward follows the forward's dtypes, no scaler).

    ``scheduler`` (optional) is stepped after every optimizer step, for per-iteration
    schedules; epoch-level schedules (MultiStepLR) are stepped by the caller.

    Returns ``loss`` (mean training loss per image), ``clean_acc`` (percent: for pgd,
    eval-mode accuracy on the clean batch before the step; for trades, the train-mode
    clean logits of the loss), ``adv_acc`` (percent, train-mode logits on x_adv),
    ``images``, ``seconds``, ``images_per_s``.
    """
    if method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)} (got {method!r})")
    net = _unwrap(model)
    start = time.perf_counter()
    n, loss_sum, clean_correct, adv_correct = 0, 0.0, 0, 0
    delta: Tensor | None = None
    for x, y in batches:
        if method == "free":
            with eval_mode(net), torch.no_grad():
                clean_correct += int((net(x).argmax(1) == y).sum())
            delta, batch_loss, batch_correct = free_replay_batch(
                model, x, y, optimizer, delta, eps=eps, replays=free_replays,
                scheduler=scheduler, amp=amp,
            )  # fmt: skip
            n += len(y)
            loss_sum += batch_loss
            adv_correct += batch_correct
            continue
        with autocast(amp, x.device):
            loss, logits_adv, clean_hits = _forward(
                model,
                net,
                x,
                y,
                eps,
                step_size,
                steps,
                method,
                trades_beta,
                fgsm_step,
                random_start,
                generator,
            )
        clean_correct += clean_hits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n += len(y)
        loss_sum += float(loss.detach()) * len(y)
        adv_correct += int((logits_adv.detach().argmax(1) == y).sum())
    seconds = time.perf_counter() - start
    if n == 0:
        raise ValueError("adversarial_train_epoch: no batches")
    return {
        "loss": loss_sum / n,
        "clean_acc": 100.0 * clean_correct / n,
        "adv_acc": 100.0 * adv_correct / n,
        "images": n,
        "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("inf"),
    }


def _forward(
    model: nn.Module,
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    method: str,
    trades_beta: float,
    fgsm_step: float,
    random_start: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, int]:
    """One batch: (training loss, logits on x_adv, correct clean predictions)."""
    clean_correct = 0
    if method in ("pgd", "fgsm_rs"):
        with eval_mode(net), torch.no_grad():
            clean_correct += int((net(x).argmax(1) == y).sum())
        if method == "fgsm_rs":
            x_adv = fgsm_rs_attack(net, x, y, eps=eps, fgsm_step=fgsm_step, generator=generator)
        else:
            x_adv = pgd_attack(
                net, x, y, eps=eps, step_size=step_size, steps=steps,
                random_start=random_start, generator=generator,
            )  # fmt: skip
        model.train()
        logits_adv = model(x_adv)
        loss = F.cross_entropy(logits_adv, y)
    else:
        x_adv = trades_attack(
            net, x, eps=eps, step_size=step_size, steps=steps, generator=generator
        )
        model.train()
        logits_clean = model(x)
        logits_adv = model(x_adv)
        kl = F.kl_div(
            F.log_softmax(logits_adv, dim=1),
            F.log_softmax(logits_clean, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        loss = F.cross_entropy(logits_clean, y) + trades_beta * kl
        clean_correct += int((logits_clean.detach().argmax(1) == y).sum())
    return loss, logits_adv, clean_correct


def fgsm_rs_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    fgsm_step: float = FGSM_STEP,
    generator: torch.Generator | None = None,
) -> Tensor:
    """FGSM from a uniform random start (Wong et al. 2020): images [B,C,H,W] in [0,1].

    delta_0 ~ U[-eps, eps] (x + delta_0 clamped to [0,1]); one step
    ``fgsm_step * eps * sign(grad CE)``; the result projected on the eps-ball around ``x``
    and on [0,1]. That is L-inf PGD with one step from a random start, so it is
    :func:`rift_ray.attacks.pgd_attack` with ``steps=1`` (eval mode, input gradients only).
    """
    return pgd_attack(
        model, x, y, eps=eps, step_size=fgsm_step * eps, steps=1, random_start=True,
        generator=generator,
    )  # fmt: skip


def collapsed(robust_acc: float, best_before: float, drop: float = COLLAPSE_DROP) -> bool:
    """Whether an epoch's validation PGD accuracy (percent) shows catastrophic overfitting:
    more than ``drop`` points below ``best_before``, the best of the epochs before it
    (-1 or lower before any epoch)."""
    return best_before >= 0 and robust_acc < best_before - drop


def best_epoch(robust_accs: Sequence[float]) -> int:
    """The model a run keeps: the 1-based epoch of the highest validation PGD accuracy
    (percent; the earliest on ties). An epoch :func:`collapsed` flags is below an earlier
    one, so it is never kept. 0 when ``robust_accs`` is empty."""
    best, best_acc = 0, -1.0
    for epoch, acc in enumerate(robust_accs, start=1):
        if acc > best_acc:
            best, best_acc = epoch, acc
    return best


def free_replay_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    optimizer: torch.optim.Optimizer,
    delta: Tensor | None,
    *,
    eps: float,
    replays: int,
    scheduler: Any = None,
    amp: Amp = "none",
) -> tuple[Tensor, float, int]:
    """``replays`` training steps on one minibatch (Shafahi et al. 2019): each step's backward
    gives the weights' gradient and the input's; the perturbation then moves by
    ``eps * sign(input gradient)``, stays in the eps-ball, and carries over to the next replay.

    ``delta``: the perturbation of the previous minibatch ([B,C,H,W]; None or another shape:
    zero). Returns (the new perturbation, the sum over replays of the mean loss x B divided
    by replays, correct train-mode predictions of the last replay).
    """
    if delta is None or delta.shape != x.shape:
        delta = torch.zeros_like(x)
    loss_sum, correct = 0.0, 0
    model.train()
    for _ in range(replays):
        d = delta.clone().requires_grad_(True)
        with autocast(amp, x.device):
            logits = model((x + d).clamp(0, 1))
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        assert d.grad is not None
        delta = (delta + eps * d.grad.sign()).clamp(-eps, eps).detach()
        loss_sum += float(loss.detach()) * len(y) / replays
        correct = int((logits.detach().argmax(1) == y).sum())
    return delta, loss_sum, correct
