"""AutoAttack (Croce & Hein 2020) at L-inf: the official implementation.

The code is fra31/auto-attack, the one RobustBench runs, as published on PyPI as
``pyautoattack`` (:data:`IMPLEMENTATION`, a regular dependency of rift-ray). Its
"standard" version, unchanged (``docs/evaluation.md`` lists every parameter):

    apgd-ce   APGD on cross-entropy, 100 iterations, 1 restart
    apgd-t    APGD on the targeted DLR loss, 100 iterations, 9 target classes
    fab-t     targeted FAB, 100 iterations, 9 target classes
    square    Square Attack, 5000 queries, p_init 0.8

As the official code does: the images are classified first and only correctly classified
ones are attacked; each attack sees the images that survived the previous ones, in batches
of ``batch_size``, with the torch RNG reseeded to ``seed`` per batch. Each attack runs as
one call of the official ``run_standard_evaluation`` on the images still robust, which
gives the official batches and seeds, so the result is image for image the official one
(``tests/test_autoattack.py``). On top of it, every counted adversarial image is checked
to lie in the eps-ball and in [0, 1] (an error, not a log line).

``state_path``: after each finished attack, the robust flags and the accuracy after each
attack are written there, so an interrupted evaluation resumes with the next attack. This
is rift-ray's own small JSON file: pyautoattack 0.2.0's ``state_path`` cannot resume (it
writes its attack set as a string, reads the finished attacks back as a list, and returns
an unset ``y_adv`` after a resume). Images are float [0, 1]; normalization lives inside the
model. No Ray here.

    res = autoattack_accuracy(model, test_data, eps=8/255)   # res["robust_acc"] in percent
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rift_ray.attacks import eval_mode
from rift_ray.data import ImageData

Version = Literal["standard"]
ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
INSTALL_HINT = "pip install pyautoattack==0.2.0"
IMPLEMENTATION = "pyautoattack 0.2.0 (fra31/auto-attack)"
EPS_SLACK = 1e-6
"""Float rounding allowed beyond eps in the final check (the official code lands ~3e-8 over)."""


def require_autoattack() -> Any:
    """The ``pyautoattack`` module, or an ImportError naming the install (before any compute)."""
    try:
        import pyautoattack
    except ImportError as e:
        raise ImportError(
            f"AutoAttack needs the package pyautoattack: {INSTALL_HINT}; import failed: {e}"
        ) from None
    return pyautoattack


def build_autoattack(
    model: nn.Module,
    *,
    eps: float,
    seed: int,
    device: torch.device | str = "cpu",
    steps: int | None = None,
    n_queries: int | None = None,
) -> Any:
    """The official ``AutoAttack(version="standard")`` object.

    ``steps`` (APGD, APGD-T, FAB iterations) and ``n_queries`` (Square) shrink the budget:
    for tests and smoke runs only, such a number is not AutoAttack."""
    aa = require_autoattack().AutoAttack(
        model, norm="Linf", eps=eps, version="standard", seed=seed, device=device
    )
    if steps:
        aa.apgd.n_iter = aa.apgd_targeted.n_iter = aa.fab.n_iter = steps
    if n_queries:
        aa.square.n_queries = n_queries
    return aa


def _one_attack(
    aa: Any, attack: str, x: torch.Tensor, y: torch.Tensor, batch_size: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One attack of the standard sequence on the images still robust, through the official
    ``run_standard_evaluation`` (so its batches and per-batch seeds are the official ones):
    (adversarial images, fooled mask). The final check: a counted adversarial image must lie
    in the eps-ball and in [0, 1] (an error otherwise, not a log line)."""
    aa.attacks_to_run = [attack]
    adv, pred = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    adv, fooled = adv.cpu(), pred.cpu() != y
    dist = (adv - x).abs().flatten(1).amax(1)
    bad = fooled & ((dist > eps + EPS_SLACK) | (adv.flatten(1).amin(1) < 0)
                    | (adv.flatten(1).amax(1) > 1))  # fmt: skip
    if bad.any():
        raise RuntimeError(
            f"AutoAttack ({attack}) returned {int(bad.sum())} adversarial image(s) outside the "
            f"eps-ball or [0, 1] (max L-inf {float(dist[bad].max()):.6g}, eps {eps:.6g})"
        )
    return adv, fooled


def _load_state(path: Path | None, n: int) -> dict[str, Any]:
    """The evaluation state at ``path``: robust flags and the accuracy after each finished
    attack (a fresh one when there is none, or one for another number of images)."""
    fresh: dict[str, Any] = {"n": n, "robust": None, "after": {}, "resumed": []}
    if path is None or not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return fresh
    if state.get("n") != n or len(state.get("robust") or []) != n:
        return fresh
    state["after"] = {a: v for a, v in state.get("after", {}).items() if a in ATTACKS}
    state["resumed"] = list(state["after"])
    return state


def _save_state(path: Path | None, state: dict[str, Any]) -> None:
    """Write the state whole or not at all (a temp file, then renamed)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({k: v for k, v in state.items() if k != "resumed"}))
    os.replace(tmp, path)


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
    state_path: str | Path | None = None,
) -> dict[str, Any]:
    """AutoAttack robust accuracy (percent) of ``model`` on ``data`` at L-inf ``eps``.

    The model must already be on ``device``; it runs in eval mode (modes restored after),
    and the global RNG state is restored afterwards. ``n_classes`` defaults to
    ``len(data.classes)`` (AutoAttack needs >= 4). ``steps`` and ``n_queries`` shrink the
    budget for tests (echoed in the result). ``state_path``: the evaluation state; an existing
    one for the same number of images is resumed (the attacks it finished are not run again:
    ``resumed`` names them).

    Returns ``robust_acc``, ``clean_acc``, ``n``, ``correct_mask`` (bool [N], robust images),
    ``clean_mask`` (bool [N]), ``after`` (robust accuracy after each attack), ``resumed``,
    ``implementation``, ``version``, ``eps``, ``steps``, ``n_queries`` and, with
    ``return_adv``, ``x_adv`` (float [N,C,H,W] on the CPU; clean images where no attack
    succeeded).
    """
    n = len(data)
    if n == 0:
        raise ValueError("autoattack_accuracy: no images in data")
    if version != "standard":
        raise ValueError(f"unknown AutoAttack version {version!r}")
    if (n_classes or len(data.classes)) < 4:
        raise ValueError(f"AutoAttack needs >= 4 classes (targeted DLR loss), got {n_classes}")
    device = torch.device(device)
    aa = build_autoattack(model, eps=eps, seed=seed, device=device, steps=steps,
                          n_queries=n_queries)  # fmt: skip
    x, y = data.images.float() / 255, data.labels
    path = Path(state_path) if state_path is not None else None
    state = _load_state(path, n)
    log = logging.getLogger("auto-attack")
    quiet = log.propagate
    log.propagate = False  # the official code logs every batch (and its checks) itself
    fork_devices = [device] if device.type == "cuda" else []
    try:
        with eval_mode(model), torch.random.fork_rng(devices=fork_devices):
            with torch.no_grad():
                clean = torch.cat([
                    model(x[i : i + batch_size].to(device)).argmax(1).cpu() == y[i : i + batch_size]
                    for i in range(0, n, batch_size)
                ])  # fmt: skip
            robust = clean.clone() if state["robust"] is None else torch.tensor(state["robust"])
            x_adv = x.clone()
            for attack in ATTACKS:
                if attack in state["after"]:  # finished before an interruption
                    continue
                idx = robust.nonzero().flatten()
                if len(idx):
                    adv, fooled = _one_attack(aa, attack, x[idx], y[idx], batch_size, eps)
                    x_adv[idx[fooled]] = adv[fooled]
                    robust[idx[fooled]] = False
                state["after"][attack] = 100.0 * int(robust.sum()) / n
                state["robust"] = robust.tolist()
                _save_state(path, state)
    finally:
        log.propagate = quiet
    out: dict[str, Any] = {
        "robust_acc": 100.0 * int(robust.sum()) / n,
        "clean_acc": 100.0 * int(clean.sum()) / n,
        "n": n,
        "correct_mask": robust,
        "clean_mask": clean,
        "resumed": state["resumed"],
        "after": {a: state["after"][a] for a in ATTACKS},
        "implementation": IMPLEMENTATION,
        "version": version,
        "eps": eps,
        "steps": steps,
        "n_queries": n_queries,
    }
    if return_adv:
        out["x_adv"] = x_adv
    return out
