"""L-inf PGD (and the TRADES KL attack) plus evaluation: clean, PGD and corruption accuracy.

Every function takes images in [0, 1] (float32 [B, C, H, W]); normalization lives
inside the model. Accuracies are in percent, losses are mean cross-entropy (nats).

    x_adv = pgd_attack(model, x, y, eps=8/255, step_size=2/255, steps=10)
    metrics = evaluate(model, val, attack={"eps": 8/255, "step_size": 2/255, "steps": 10})
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rift_ray.compute import Amp, autocast

LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def iter_batches(
    data: Any, batch_size: int, device: torch.device | str = "cpu"
) -> Iterator[tuple[Tensor, Tensor]]:
    """(x float [B,C,H,W] in [0,1], y int64 [B]) on ``device``, in order, no augmentation.

    ``data`` is an ``ImageData`` (batched by ``rift_ray.data.batches``) or any iterable
    of ``(x, y)`` pairs; uint8 images are scaled to [0, 1].
    """
    if hasattr(data, "images") and hasattr(data, "labels"):
        from rift_ray.data import batches  # lazy: data.py is optional for plain-tensor callers

        yield from batches(data, batch_size, shuffle=False, augment=False, seed=0, device=device)
        return
    for x, y in data:
        x = x.to(device)
        if x.dtype == torch.uint8:
            x = x.float() / 255
        yield x, y.to(device)


def _random_like(x: Tensor, generator: torch.Generator | None, normal: bool) -> Tensor:
    """Uniform [0,1) (or standard normal) noise shaped like ``x``, drawn on the generator's device."""
    dev = generator.device if generator is not None else x.device
    draw = torch.randn if normal else torch.rand
    return draw(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)


def _pgd_steps(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    x_start: Tensor,
    eps: float,
    step_size: float,
    steps: int,
    loss_fn: LossFn,
) -> Tensor:
    """Signed-gradient ascent of ``loss_fn(model(x_adv), target)``, projected on the eps-ball and [0,1].

    Gradients are taken w.r.t. the input only, so parameters never accumulate ``.grad``.
    """
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    x_adv = x_start.detach()
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), target)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.max(torch.min(x_adv, hi), lo)
    return x_adv.detach()


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    loss_fn: LossFn = F.cross_entropy,
) -> Tensor:
    """L-inf PGD (Madry et al.): adversarial images [B,C,H,W] in [0,1] with ||x_adv - x||_inf <= eps.

    The model runs in eval mode (each submodule's mode is restored afterwards) and
    parameters' ``requires_grad`` is left as is. ``random_start`` draws the start
    uniformly from the eps-ball (seeded by ``generator``). With ``restarts > 1`` each
    example keeps its worst restart: misclassified first, else highest per-example
    cross-entropy (CE is used for this choice whatever ``loss_fn`` is). So an image stays
    correctly classified only if every restart fails: accuracy on the result is the
    per-image worst of the restarts, never above the lowest of the restarts' separate
    accuracies (the paper's "worst of 3 runs"). ``steps=0`` returns a copy of the clean
    images.
    """
    x = x.detach()
    if steps == 0:
        return x.clone()
    with eval_mode(model):
        best: Tensor | None = None
        best_wrong = best_loss = torch.empty(0)
        for _ in range(restarts):
            start = x
            if random_start:
                start = (x + (2 * _random_like(x, generator, normal=False) - 1) * eps).clamp(0, 1)
            x_adv = _pgd_steps(model, x, y, start, eps, step_size, steps, loss_fn)
            if restarts == 1:
                return x_adv
            with torch.no_grad():
                logits = model(x_adv)
                wrong = logits.argmax(1) != y
                loss = F.cross_entropy(logits, y, reduction="none")
            if best is None:
                best, best_wrong, best_loss = x_adv, wrong, loss
                continue
            better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
            best = torch.where(better.view(-1, *[1] * (x.dim() - 1)), x_adv, best)
            best_wrong = torch.where(better, wrong, best_wrong)
            best_loss = torch.where(better, loss, best_loss)
        assert best is not None
        return best


def trades_attack(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The TRADES inner maximization (Zhang et al. 2019): PGD on KL(p(x) || p(x_adv)).

    Starts from ``x + 0.001 * N(0, 1)`` as in the official code; eval mode like
    :func:`pgd_attack`. Returns images [B,C,H,W] in [0,1] inside the eps-ball.
    """
    x = x.detach()
    with eval_mode(model):
        with torch.no_grad():
            log_p_clean = F.log_softmax(model(x), dim=1)
        start = x + 0.001 * _random_like(x, generator, normal=True)

        def kl(logits: Tensor, target: Tensor) -> Tensor:
            return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="sum", log_target=True)

        return _pgd_steps(model, x, log_p_clean, start, eps, step_size, steps, kl)


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    attack: dict[str, Any] | None = None,
    restarts: int = 1,
    seed: int = 0,
    amp: Amp = "none",
    per_image: bool = False,
) -> dict[str, Any]:
    """Clean (and, with ``attack``, PGD) accuracy in percent and mean CE loss.

    ``data``: an ``ImageData`` or an iterable of (x, y) batches. ``attack``: keys
    ``eps``, ``step_size``, ``steps`` and optionally ``random_start`` (default True);
    the random starts are seeded by ``seed``. ``restarts``: ``robust_acc`` is the per-image
    worst of that many PGD restarts (:func:`pgd_attack`). The model must already be on ``device``;
    it runs in eval mode and its modes are restored afterwards. ``amp="bf16"``: forwards
    and the attack under bf16 autocast (:mod:`rift_ray.compute`).
    Returns ``clean_acc``, ``clean_loss``, ``n`` and, with an attack, ``robust_acc``, ``robust_loss``;
    ``per_image=True`` adds ``clean_correct`` (and ``robust_correct``): bool CPU tensors, one
    entry per image in data order (the per-image results paired statistics need).
    """
    gen = torch.Generator(device=device).manual_seed(seed) if attack else None
    n, correct, loss_sum, rob_correct, rob_loss_sum = 0, 0, 0.0, 0, 0.0
    clean_hits: list[Tensor] = []
    robust_hits: list[Tensor] = []
    with eval_mode(model), autocast(amp, device):
        for x, y in iter_batches(data, batch_size, device):
            with torch.no_grad():
                logits = model(x)
            n += len(y)
            hit = logits.argmax(1) == y
            correct += int(hit.sum())
            if per_image:
                clean_hits.append(hit.cpu())
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            if attack:
                x_adv = pgd_attack(
                    model,
                    x,
                    y,
                    eps=attack["eps"],
                    step_size=attack["step_size"],
                    steps=attack["steps"],
                    random_start=attack.get("random_start", True),
                    restarts=restarts,
                    generator=gen,
                )
                with torch.no_grad():
                    logits = model(x_adv)
                rob_hit = logits.argmax(1) == y
                rob_correct += int(rob_hit.sum())
                if per_image:
                    robust_hits.append(rob_hit.cpu())
                rob_loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    if n == 0:
        raise ValueError("evaluate: no images in data")
    out: dict[str, Any] = {"clean_acc": 100.0 * correct / n, "clean_loss": loss_sum / n, "n": n}
    if attack:
        out |= {"robust_acc": 100.0 * rob_correct / n, "robust_loss": rob_loss_sum / n}
    if per_image:
        out["clean_correct"] = torch.cat(clean_hits)
        if attack:
            out["robust_correct"] = torch.cat(robust_hits)
    return out


def corruption_accuracy(
    model: nn.Module,
    cdata: dict[tuple[str, int], Any],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp: Amp = "none",
    per_image: bool = False,
) -> dict[str, Any]:
    """Clean accuracy (percent) on each corruption cell and their unweighted mean.

    ``cdata`` maps ``(corruption, severity)`` to an ``ImageData`` (or iterable of
    batches). Returns ``{"<corruption>-<severity>": acc, ..., "mean": acc}``. Given the
    15 standard corruptions x severities 1-5 the mean is the RobustBench protocol
    (mean over 75 cells); other selections give a mean over whatever cells were passed.
    ``per_image=True`` adds ``per_image``: each image's fraction of the cells it is classified
    correctly in (the cells must hold the same images in the same order).
    """
    if not cdata:
        raise ValueError("corruption_accuracy: no corruption data given")
    out: dict[str, Any] = {}
    hits: Tensor | None = None
    for (name, severity), data in cdata.items():
        m = evaluate(
            model, data, batch_size=batch_size, device=device, amp=amp, per_image=per_image
        )
        out[f"{name}-{severity}"] = m["clean_acc"]
        if per_image:
            cell = m["clean_correct"].to(torch.int32)
            if hits is not None and len(hits) != len(cell):
                raise ValueError("corruption_accuracy: per_image needs cells of the same images")
            hits = cell if hits is None else hits + cell
    out["mean"] = sum(out.values()) / len(out)
    if per_image:  # per image: the fraction of the cells it is classified correctly in
        out["per_image"] = hits.to(torch.float32) / len(cdata)  # type: ignore[union-attr]
    return out
