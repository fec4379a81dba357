"""What a sweep costs: FLOPs per stage, converted to GPU-hours, wall hours and dollars.

    mf = model_flops(model, (3, 32, 32), modules)     # F per image, each MRC module's tail
    flops = stage_flops(cfg, Sizes(45000, 5000, 10000), mf)
    rows = cost_rows(flops, stage_gpus(cfg, 8, len(modules), 10000), GPUS["h100"], "none", 0.35)

No Ray, no data, no timing: the forward FLOPs of one image are counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (2 FLOPs per multiply-add;
convolutions and matmuls only, so BatchNorm, ReLU and pooling are left out) and every stage
is a count of passes over the images the config names. Units are "forward equivalents" F:

- a training step is 3F: the forward, the input gradients and the weight gradients (each
  about one forward); a step that trains one module is 1 + 2t F, t the share of F from that
  module's block to the logits (the backward stops there);
- a PGD step is 2F: forward and input gradient only (``torch.autograd.grad`` w.r.t. the image,
  :mod:`rift_ray.attacks`); PGD-k evaluation of an image with R restarts is
  ``2 + 2kR + (R if R > 1)`` F: the clean forward, the attack, a forward per restart to keep
  the worst one, and the forward on the result;
- AutoAttack (standard) is counted at its standard budgets, see :data:`AUTOATTACK_PASSES`.

GPU-hours = FLOPs / (peak x utilisation), peak from :data:`GPUS` (the vendor datasheets'
dense figures) and the utilisation an assumption the output states. Wall hours divide the
GPU-hours by the GPUs a stage keeps busy at once (:func:`stage_gpus`), ignoring the waits at
ASHA rungs and the last, lonely trials: a lower bound on the wall time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rift_ray.config import SweepConfig
from rift_ray.rift.asha import kept, milestones
from rift_ray.rift.selection import STRATEGIES, max_trials, strategy_lrs

COST_STAGES = ("adv_train", "mrc", "finetune", "interpolate", "autoattack")
"""Rows of an estimate; ``autoattack`` runs inside the interpolate stage (its seconds too)."""


@dataclass(frozen=True)
class GPU:
    """Peak dense (no structured sparsity) FLOP/s of one card, from its datasheet."""

    label: str
    fp32: float
    tf32: float
    bf16: float
    source: str


# Vendor datasheet figures, dense (the datasheets print the sparse figure, twice these, with
# an asterisk). A10G: NVIDIA publishes no datasheet of AWS's variant; its figures as AWS and
# NVIDIA give them (collected in Baseten's "NVIDIA A10 vs A10G for ML model inference"):
# 35 TFLOP/s FP32, 70 BF16 tensor; TF32 tensor is half of BF16 on every Ampere card.
GPUS: dict[str, GPU] = {
    "a10g": GPU("NVIDIA A10G (AWS g5)", 35e12, 35e12, 70e12, "AWS / NVIDIA A10G figures"),
    "l4": GPU("NVIDIA L4", 30.3e12, 60e12, 121e12, "NVIDIA L4 datasheet (2023)"),
    "a100": GPU("NVIDIA A100 SXM 80GB", 19.5e12, 156e12, 312e12, "NVIDIA A100 datasheet (2021)"),
    "h100": GPU("NVIDIA H100 SXM", 67e12, 494.5e12, 989e12, "NVIDIA H100 datasheet (2023)"),
    "h200": GPU("NVIDIA H200 SXM", 67e12, 494.5e12, 989e12, "NVIDIA H200 datasheet (2024)"),
}
DEFAULT_GPU = "h100"
DEFAULT_UTILISATION = 0.35
"""Achieved / peak for these convnets (batch 128-512, 32x32 images): an assumption, not a
measurement; the output says so and ``--utilisation`` replaces it."""

AUTOATTACK_PASSES = {"clean": 1.0, "apgd-ce": 200.0, "apgd-t": 1800.0, "fab-t": 1800.0,
                     "square": 5000.0}  # fmt: skip
"""Forward equivalents per attacked image of AutoAttack's standard version, at its standard
budgets: APGD-CE 100 iterations x 2F; APGD-T 9 target classes x 100 iterations x 2F; FAB-T
9 targets x 100 iterations x ~2F (a forward and one gradient of a logit difference); Square
5,000 queries x 1F. Each attack runs only on the images still robust after the ones before:
see :data:`AUTOATTACK_SURVIVORS`."""
AUTOATTACK_SURVIVORS = {"clean": 1.0, "apgd-ce": 0.85, "apgd-t": 0.55, "fab-t": 0.55,
                        "square": 0.55}  # fmt: skip
"""Share of the images each attack still runs on, assumed: a robust CIFAR-10 model (about 85%
clean and 55% robust accuracy); APGD-CE starts on the correctly classified images."""


@dataclass(frozen=True)
class Sizes:
    """Images of the train, validation and test splits a sweep uses (after subsets)."""

    train: int
    val: int
    test: int


@dataclass(frozen=True)
class ModelFlops:
    """``forward``: FLOPs of one image's forward pass; ``tails``: per MRC module, the share of
    them from the module's block to the logits (what the MRC fast path and fine-tuning run)."""

    forward: float
    tails: dict[str, float]

    def mean_tail(self) -> float:
        return sum(self.tails.values()) / len(self.tails) if self.tails else 1.0


def model_flops(
    model: nn.Module, image_shape: tuple[int, ...], modules: list[str] | None = None
) -> ModelFlops:
    """Count ``model``'s forward FLOPs on one image, block by block (``models.model_blocks``),
    on the meta device when the model's parameters are there (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rift_ray.models import block_index, model_blocks

    device = next(model.parameters()).device
    x = torch.empty(1, *image_shape, device=device)
    blocks = model_blocks(model)
    per_block = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in blocks:
                with FlopCounterMode(display=False) as c:
                    x = b.fn(x)
                per_block.append(float(c.get_total_flops()))
    finally:
        model.train(was_training)
    total = sum(per_block)
    tails = {}
    for name in modules or []:
        k = block_index(blocks, name)
        tails[name] = sum(per_block[k:]) / total if total else 1.0
    return ModelFlops(total, tails)


def meta_model_flops(cfg: SweepConfig, num_classes: int, image_shape: tuple[int, int, int],
                     modules: list[str] | None = None) -> ModelFlops:  # fmt: skip
    """:func:`model_flops` of the configured architecture, built on the meta device."""
    from rift_ray.models import build_model

    with torch.device("meta"):
        model = build_model(
            cfg.model.arch, num_classes, mean=(0.5,) * image_shape[0],
            std=(0.5,) * image_shape[0], depth=cfg.model.depth,
            widen_factor=cfg.model.widen_factor, image_size=image_shape[1:],
        )  # fmt: skip
    return model_flops(model, image_shape, modules)


# -- passes per image, in forward equivalents -------------------------------------------------
TRAIN_STEP = 3.0
PGD_STEP = 2.0


def pgd_eval(steps: int, restarts: int) -> float:
    """F per image of a clean + PGD evaluation (:func:`rift_ray.attacks.evaluate`)."""
    return 2 + PGD_STEP * steps * restarts + (restarts if restarts > 1 else 0)


def halving_epochs(n_trials: int, epochs: int, grace: int, factor: float) -> tuple[int, int]:
    """(trial-epochs, trials that run every epoch) of successive halving over ``n_trials``
    at ``rift.asha.milestones``: all reach the first rung, the best ``max(1, n // factor)`` go
    on to the next, and so on to ``epochs``. Tune's async ASHA keeps about as many in
    expectation (a trial goes on above the ``1 - 1/factor`` quantile of its rung)."""
    n, done, total = n_trials, 0, 0
    for rung in milestones(grace, factor, epochs):
        total += n * (rung - done)
        n, done = kept(n, factor), rung
    return total + n * (epochs - done), n


def _val_images(cfg: SweepConfig, n_val: int) -> int:
    """Validation images the interpolation measures: selection images (``eval.val_subset``) and
    those held out to confirm alpha*."""
    confirm = min(cfg.interpolate.confirm_size, n_val)
    rest = n_val - confirm
    return confirm + min(rest, cfg.eval.val_subset or rest)


def points_per_trial(cfg: SweepConfig) -> float:
    """Validation PGD points per fine-tuning trial besides alpha = 0: the whole grid; a
    monotone search's binary search plus the tie check; ``clean_first``: half the grid (it
    measured 34 of 72 on the docs/results.md run; at worst the whole grid), the others clean
    accuracy only (counted in :func:`interpolation_flops`)."""
    n = len([a for a in cfg.interpolate.alphas if a > 0])
    if cfg.interpolate.search == "monotone":
        return min(n, math.ceil(math.log2(n + 1)) + 1)
    if cfg.interpolate.search == "clean_first":
        return n / 2
    return n


def alphas_on_test_per_trial(cfg: SweepConfig) -> int:
    """Test points per trial besides alpha = 0: its alpha* (every alpha with
    ``interpolate.test_curve``)."""
    return len([a for a in cfg.interpolate.alphas if a > 0]) if cfg.interpolate.test_curve else 1


def interpolation_flops(
    cfg: SweepConfig, f: float, sizes: Sizes, trials: int, val_points: float, test_points: int
) -> float:
    """Stage 4: the AT model once, then ``val_points`` validation and ``test_points`` test alpha
    points per surviving trial, each a clean + PGD evaluation (test: and the corruptions);
    ``clean_first`` adds a clean forward of the validation images at every alpha."""
    k, r = cfg.attack.steps, cfg.eval.restarts
    n_test = min(sizes.test, cfg.eval.test_subset or sizes.test)
    cells = len(cfg.eval.corruptions) * len(cfg.eval.severities)
    corrupted = cells * min(n_test, cfg.eval.corruption_subset or n_test)  # clean forwards
    val_point = _val_images(cfg, sizes.val) * pgd_eval(k, r)
    test_point = n_test * pgd_eval(k, r) + corrupted
    clean = 0.0
    if cfg.interpolate.search == "clean_first":
        clean = len([a for a in cfg.interpolate.alphas if a > 0]) * _val_images(cfg, sizes.val)
    return f * (
        (1 + trials * val_points) * val_point
        + trials * clean
        + (1 + trials * test_points) * test_point
    )


def autoattack_passes() -> float:
    """Forward equivalents per attacked image, :data:`AUTOATTACK_PASSES` x survivors."""
    return sum(AUTOATTACK_PASSES[a] * AUTOATTACK_SURVIVORS[a] for a in AUTOATTACK_PASSES)


def autoattack_flops(cfg: SweepConfig, f: float, n_test: int) -> float:
    """AutoAttack (standard) of the AT model, alpha* and ``autoattack.alphas`` (0 when off)."""
    aa = cfg.eval.autoattack
    if not aa.enabled:
        return 0.0
    images = min(n_test, aa.subset or n_test)
    return f * (2 + len(aa.alphas)) * images * autoattack_passes()


def finetune_grid(cfg: SweepConfig) -> list[tuple[str, int]]:
    """(strategy, trials) of each strategy's ASHA experiment, at most."""
    ft = cfg.finetune
    return [(s, STRATEGIES[s].max_sets(ft) * len(strategy_lrs(s, ft.lrs))) for s in ft.strategies]


def finetune_survivors(cfg: SweepConfig) -> int:
    """Trials expected to run every epoch (and so to be interpolated), over all strategies."""
    a = cfg.finetune.asha
    return sum(halving_epochs(n, cfg.finetune.epochs, a.grace_period, a.reduction_factor)[1]
               for _, n in finetune_grid(cfg))  # fmt: skip


def stage_flops(cfg: SweepConfig, sizes: Sizes, mf: ModelFlops) -> dict[str, float]:
    """FLOPs of each stage of one sweep (stages 2-4 once per seed of ``seeds``)."""
    f, k, ft = mf.forward, cfg.attack.steps, cfg.finetune
    n_val = min(sizes.val, cfg.eval.val_subset or sizes.val)
    out = dict.fromkeys(COST_STAGES, 0.0)
    if not cfg.adv_train.checkpoint:
        # PGD-AT: the attack and a training step on the adversarial images; TRADES also
        # forwards the clean images for the attack's KL target and trains on both; FGSM-RS
        # attacks with one step; free AT takes free_replays training steps per minibatch.
        at = cfg.adv_train
        step = {
            "pgd": PGD_STEP * k + TRAIN_STEP,
            "trades": PGD_STEP * k + 1 + 2 * TRAIN_STEP,
            "fgsm_rs": PGD_STEP + TRAIN_STEP,
            "free": at.free_replays * TRAIN_STEP,
        }[at.method]
        per_epoch = sizes.train * step + n_val * pgd_eval(k, cfg.eval.restarts)
        out["adv_train"] = f * cfg.adv_train.epochs * per_epoch
    n_adv = min(sizes.val, cfg.mrc.adv_set_size or sizes.val)
    epochs = cfg.mrc.epochs
    tails = list(mf.tails.values()) or [1.0]
    if cfg.mrc.fast:  # the tail from the module's block, ascent and evaluation per epoch
        per_module = [n_adv * (t + epochs * 3 * t) for t in tails]
    else:  # the reference: a whole forward and the backward to the module, and an evaluation
        per_module = [n_adv * (1 + epochs * (2 + 2 * t)) for t in tails]
    mrc_one = sum(per_module) / len(per_module)
    out["mrc"] = f * (n_adv * PGD_STEP * k + sum(per_module))  # + the adversarial set
    t = mf.mean_tail()
    metric = len(ft.metric_alphas) * min(sizes.val, ft.metric_subset) * pgd_eval(k, 1)
    for strategy, n in finetune_grid(cfg):
        step = {"full": TRAIN_STEP, "bn_stats": 1.0}.get(strategy, 1 + 2 * t)
        trial_epochs, _ = halving_epochs(n, ft.epochs, ft.asha.grace_period,
                                         ft.asha.reduction_factor)  # fmt: skip
        out["finetune"] += f * trial_epochs * (sizes.train * step + metric)
    if "greedy" in ft.strategies:  # joint MRC of each candidate set
        out["finetune"] += f * (ft.greedy.size - 1) * ft.greedy.candidates * mrc_one
    out["interpolate"] = interpolation_flops(
        cfg, f, sizes, finetune_survivors(cfg), points_per_trial(cfg), alphas_on_test_per_trial(cfg)
    )
    out["autoattack"] = autoattack_flops(
        cfg, f, min(sizes.test, cfg.eval.test_subset or sizes.test)
    )
    runs = len(cfg.seeds) if cfg.seeds else 1
    return {s: v * (runs if s != "adv_train" else 1) for s, v in out.items()}


def config_gpus(cfg: SweepConfig) -> int:
    """GPUs a cluster for this config has at least: adversarial training's workers (or
    ``resources.num_gpus``), else 1."""
    a = cfg.resources.adv_train
    at = a.num_workers * (a.gpus_per_worker or 1) if a.use_gpu else 0
    return max(1, math.ceil(at), cfg.resources.num_gpus or 0)


def stage_gpus(
    cfg: SweepConfig, cluster_gpus: float, n_modules: int, n_test: int
) -> dict[str, float]:
    """GPUs each stage keeps busy at once on a cluster of ``cluster_gpus``: DDP workers, or
    concurrent trials/tasks x their GPU share, at least one (a share is a scheduling label,
    not a cap: one task alone has the whole GPU; a share of 0, a CPU trial, counts as 1 GPU:
    the figure says what the stage would take on GPUs)."""
    r, a = cfg.resources, cfg.resources.adv_train
    cap = r.max_concurrent_trials or math.inf
    aa = cfg.eval.autoattack
    n_test = min(n_test, cfg.eval.test_subset or n_test)
    shards = math.ceil(min(aa.subset or n_test, n_test) / aa.shard_size) if aa.enabled else 0
    tasks_per_trial = (
        1
        if cfg.interpolate.search == "monotone"
        else math.ceil(points_per_trial(cfg) / cfg.interpolate.alphas_per_task)
    )
    units = {
        "adv_train": (a.num_workers, (a.gpus_per_worker or 1) if a.use_gpu else 1, math.inf),
        "mrc": (n_modules, r.mrc.gpu or 1, cap),
        "finetune": (max_trials(cfg.finetune), r.finetune.gpu or 1, cap),
        "interpolate": (1 + finetune_survivors(cfg) * tasks_per_trial, r.interpolate.gpu or 1,
                        math.inf),
        "autoattack": (max(1, shards * (2 + len(aa.alphas))), r.interpolate.gpu or 1, math.inf),
    }  # fmt: skip
    return {s: max(1.0, min(cluster_gpus, min(n, c) * share)) for s, (n, share, c) in units.items()}


Amp = Literal["none", "bf16"]


def peak(gpu: GPU, amp: Amp) -> float:
    """The peak the sweep's arithmetic runs at: BF16 tensor for ``compute.amp: bf16``, else
    TF32 tensor (PyTorch runs convolutions in TF32 on Ampere and later by default:
    ``torch.backends.cudnn.allow_tf32`` is True)."""
    return gpu.bf16 if amp == "bf16" else gpu.tf32


def cost_rows(
    flops: dict[str, float], gpus: dict[str, float], gpu: GPU, amp: Amp,
    utilisation: float, price: float | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per stage: PFLOP, GPU-hours, GPUs at once, wall hours and (priced) dollars."""
    rate = peak(gpu, amp) * utilisation
    rows = []
    for stage, fl in flops.items():
        hours = fl / rate / 3600
        row = {"stage": stage, "pflop": fl / 1e15, "gpu_hours": hours, "gpus": gpus[stage],
               "wall_hours": hours / gpus[stage]}  # fmt: skip
        if price is not None:
            row["dollars"] = hours * price
        rows.append(row)
    return rows


def estimate_record(
    cfg: SweepConfig, sizes: Sizes, mf: ModelFlops, cluster_gpus: float, n_modules: int
) -> dict[str, Any]:
    """The estimate a sweep stores with itself (``estimate.json``), in FLOPs and on the default
    card, for the report to set next to the measured seconds."""
    flops = stage_flops(cfg, sizes, mf)
    gpus = stage_gpus(cfg, cluster_gpus, n_modules, sizes.test)
    rows = cost_rows(flops, gpus, GPUS[DEFAULT_GPU], cfg.compute.amp, DEFAULT_UTILISATION)
    return {
        "forward_flops": mf.forward,
        "sizes": {"train": sizes.train, "val": sizes.val, "test": sizes.test},
        "gpu": DEFAULT_GPU,
        "utilisation": DEFAULT_UTILISATION,
        "amp": cfg.compute.amp,
        "stages": {
            r["stage"]: {
                "flops": flops[r["stage"]],
                "gpus": r["gpus"],
                "gpu_hours": r["gpu_hours"],
                "wall_hours": r["wall_hours"],
            }
            for r in rows
        },  # fmt: skip
    }


def report_rows(estimate: dict[str, Any], seconds: dict[str, float]) -> list[dict[str, Any]]:
    """The report's table: per stage the estimated PFLOP and wall time on the estimate's card
    next to the measured seconds, and the FLOP rate that measurement implies (AutoAttack is
    part of the interpolate stage's seconds)."""
    est = dict(estimate.get("stages") or {})
    aa = est.pop("autoattack", None)
    if aa and "interpolate" in est:
        it = est["interpolate"]
        est["interpolate"] = {k: it[k] + aa[k] for k in ("flops", "gpu_hours", "wall_hours")}
    rows = []
    for stage in [s for s in COST_STAGES if s in est]:
        e, measured = est[stage], seconds.get(stage)
        rows.append({
            "stage": stage + (" (+ AutoAttack)" if stage == "interpolate" and aa and aa["flops"]
                              else ""),
            "PFLOP": _sig(e["flops"] / 1e15),
            f"est. wall h ({estimate.get('gpu', '?')})": _sig(e["wall_hours"]),
            "measured s": round(measured, 1) if measured is not None else None,
            "achieved TFLOP/s": _sig(e["flops"] / measured / 1e12) if measured else None,
        })  # fmt: skip
    return rows


def _sig(x: float) -> float:
    """``x`` to three significant figures (small sweeps' figures stay readable)."""
    return float(f"{x:.3g}")
