"""AutoAttack (Croce & Hein 2020) at L-inf through the ``torchattacks`` implementations.

The official ``autoattack`` package is not on PyPI, so the four attacks come from PyPI
``torchattacks`` (install with ``pip install 'rift-ray[autoattack]'``), configured here
with the official "standard" parameters (``docs/evaluation.md`` lists every one):

    apgd-ce   APGD on cross-entropy, 100 iterations, 1 restart
    apgd-t    APGD on the targeted DLR loss, 100 iterations, 9 target classes, 1 restart each
    fab-t     targeted FAB, 100 iterations, 9 target classes, 1 restart each
    square    Square Attack, 5000 queries, p_init 0.8, the official (unrescaled) p schedule

``version="torchattacks-standard"`` is ``torchattacks.AutoAttack(version="standard")``
as shipped (10 iterations, n_classes - 1 target classes, rescaled Square schedule): a
weaker, cheaper variant whose numbers must not be reported as AutoAttack.

As in the official code, each batch is first classified; only correctly classified images
are attacked, and each attack only sees the images that survived the previous ones.
Images are float [0, 1]; normalization lives inside the model. No Ray here.

    res = autoattack_accuracy(model, test_data, eps=8/255)   # res["robust_acc"] in percent
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from rift_ray.attacks import eval_mode
from rift_ray.data import ImageData

Version = Literal["standard", "torchattacks-standard"]
ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
INSTALL_HINT = "pip install 'rift-ray[autoattack]'"


def require_torchattacks() -> Any:
    """The torchattacks module, or an ImportError naming the extra (call it before any compute)."""
    try:
        import torchattacks
    except ImportError as e:
        raise ImportError(
            f"AutoAttack needs the optional package torchattacks: {INSTALL_HINT} "
            f"(or pip install 'torchattacks>=3.5'); import failed: {e}"
        ) from None
    return torchattacks


def build_attacks(
    model: nn.Module,
    *,
    eps: float,
    version: Version,
    n_classes: int,
    seed: int,
    steps: int | None = None,
    n_queries: int | None = None,
) -> list[tuple[str, Any]]:
    """The four torchattacks objects of AutoAttack ``version``, in the order they run.

    ``steps`` (APGD, APGD-T, FAB iterations) and ``n_queries`` (Square) override the
    version's budget: for tests and smoke runs only, such a number is not AutoAttack.
    """
    if n_classes < 4:
        raise ValueError(f"AutoAttack needs >= 4 classes (targeted DLR loss), got {n_classes}")
    if version == "standard":
        default_steps, targets, rescale = 100, min(9, n_classes - 1), False
    elif version == "torchattacks-standard":
        default_steps, targets, rescale = 10, n_classes - 1, True
    else:
        raise ValueError(f"unknown AutoAttack version {version!r}")
    steps = steps or default_steps
    ta = require_torchattacks()
    common = {"norm": "Linf", "eps": eps, "seed": seed}
    apgd = ta.APGD(model, steps=steps, n_restarts=1, loss="ce", rho=0.75, **common)
    apgdt = ta.APGDT(model, steps=steps, n_restarts=1, n_classes=n_classes, rho=0.75, **common)
    apgdt.n_target_classes = targets
    fab = ta.FAB(
        model, steps=steps, n_restarts=1, multi_targeted=True, n_classes=n_classes, **common
    )
    fab.n_target_classes = targets
    square = ta.Square(
        model,
        n_queries=n_queries or 5000,
        n_restarts=1,
        p_init=0.8,
        loss="margin",
        resc_schedule=rescale,
        **common,
    )
    return list(zip(ATTACKS, (apgd, apgdt, fab, square)))


def _attack_batch(
    model: nn.Module, attacks: list[tuple[str, Any]], x: Tensor, y: Tensor, eps: float
) -> tuple[Tensor, Tensor, dict[str, int]]:
    """(robust mask [B], adversarial images [B,...], images still robust after each attack)."""
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    x_adv = x.clone()
    after: dict[str, int] = {}
    for name, attack in attacks:
        idx = robust.nonzero().flatten()
        if len(idx):
            adv = attack(x[idx], y[idx]).detach()
            with torch.no_grad():
                fooled = model(adv).argmax(1) != y[idx]
            # an adversarial example counts only if it is a valid one: inside the eps-ball and [0,1]
            dist = (adv - x[idx]).abs().flatten(1).amax(1)
            fooled &= (
                (dist <= eps + 1e-6) & (adv.flatten(1).amin(1) >= 0) & (adv.flatten(1).amax(1) <= 1)
            )
            x_adv[idx[fooled]] = adv[fooled]
            robust[idx[fooled]] = False
        after[name] = int(robust.sum())
    return robust, x_adv, after


def autoattack_accuracy(
    model: nn.Module,
    data: ImageData,
    *,
    eps: float = 8 / 255,
    version: Version = "standard",
    batch_size: int = 250,
    device: torch.device | str = "cpu",
    seed: int = 0,
    n_classes: int | None = None,
    steps: int | None = None,
    n_queries: int | None = None,
    return_adv: bool = False,
) -> dict[str, Any]:
    """AutoAttack robust accuracy (percent) of ``model`` on ``data`` at L-inf ``eps``.

    The model must already be on ``device``; it runs in eval mode (modes restored after).
    Batches of ``batch_size`` consecutive images are attacked independently, each with the
    torch RNG reseeded to ``seed`` (the official behaviour), so the result is a function of
    the weights, the images, ``seed`` and the batch boundaries; the global RNG state is
    restored afterwards. ``n_classes`` defaults to ``len(data.classes)``. ``steps`` and
    ``n_queries`` shrink the attack budget for tests (see :func:`build_attacks`); they are
    echoed in the result so such a number is never mistaken for AutoAttack.

    Returns ``robust_acc``, ``clean_acc``, ``n``, ``correct_mask`` (bool [N], robust images),
    ``clean_mask`` (bool [N]), ``after`` (robust accuracy after each attack, cumulative),
    ``version``, ``eps``, ``steps``, ``n_queries`` (None = the version's own) and, with ``return_adv``, ``x_adv`` (float [N,C,H,W] on the CPU;
    clean images where no attack succeeded).
    """
    n = len(data)
    if n == 0:
        raise ValueError("autoattack_accuracy: no images in data")
    n_classes = n_classes or len(data.classes)
    attacks = build_attacks(
        model,
        eps=eps,
        version=version,
        n_classes=n_classes,
        seed=seed,
        steps=steps,
        n_queries=n_queries,
    )
    device = torch.device(device)
    masks, clean_masks, advs = [], [], []
    after = dict.fromkeys(ATTACKS, 0)
    fork_devices = [device] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=fork_devices):
        for start in range(0, n, batch_size):
            x = data.images[start : start + batch_size].to(device).float() / 255
            y = data.labels[start : start + batch_size].to(device)
            with torch.no_grad():
                clean_masks.append((model(x).argmax(1) == y).cpu())
            robust, x_adv, counts = _attack_batch(model, attacks, x, y, eps)
            masks.append(robust.cpu())
            for k, v in counts.items():
                after[k] += v
            if return_adv:
                advs.append(x_adv.cpu())
    mask, clean = torch.cat(masks), torch.cat(clean_masks)
    out: dict[str, Any] = {
        "robust_acc": 100.0 * int(mask.sum()) / n,
        "clean_acc": 100.0 * int(clean.sum()) / n,
        "n": n,
        "correct_mask": mask,
        "clean_mask": clean,
        "after": {k: 100.0 * v / n for k, v in after.items()},
        "version": version,
        "eps": eps,
        "steps": steps,
        "n_queries": n_queries,
    }
    if return_adv:
        out["x_adv"] = torch.cat(advs)
    return out
