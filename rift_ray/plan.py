"""``rift-ray sweep --dry-run``: the plan of a sweep and a compute estimate, without computing.

The estimate times one forward+backward pass of the configured model on one batch on
this machine and multiplies by the number of passes each stage needs (PGD-k costs k+1
passes per image). It is a rough single-device figure, printed as device-seconds.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from rift_ray.config import SweepConfig
from rift_ray.rift.selection import max_module_sets, max_trials

STAGES_2_4 = ("mrc", "finetune", "interpolate")


def time_per_image(cfg: SweepConfig, spec: Any, batch: int = 32, repeats: int = 3) -> float:
    """Seconds for one forward+backward pass of one image, measured on a random batch."""
    from rift_ray.stages.common import new_model

    model = new_model(cfg, spec)
    x = torch.rand(batch, *spec.image_shape)
    y = torch.randint(0, spec.num_classes, (batch,))
    F.cross_entropy(model(x), y).backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return (time.perf_counter() - t0) / (repeats * batch)


def joint_sets(cfg: SweepConfig) -> int:
    """Module sets the greedy strategy scores by joint MRC, at most (0 without it)."""
    g = cfg.finetune.greedy
    return (g.size - 1) * g.candidates if "greedy" in cfg.finetune.strategies else 0


def estimate(
    cfg: SweepConfig, n_train: int, n_val: int, n_test: int, n_modules: int, t_img: float
) -> dict[str, float]:
    """Device-seconds per stage (upper bounds: ASHA usually stops part of the fine-tuning grid)."""
    k = cfg.attack.steps + 1
    val_eval = min(n_val, cfg.eval.val_subset or n_val)
    test_eval = min(n_test, cfg.eval.test_subset or n_test)
    at = (
        0.0
        if cfg.adv_train.checkpoint
        else cfg.adv_train.epochs * (n_train * k + val_eval * k * cfg.eval.restarts) * t_img
    )
    n_adv = min(n_val, cfg.mrc.adv_set_size or n_val)
    mrc = (
        n_adv * k * t_img + n_modules * cfg.mrc.epochs * n_adv * 1.3 * t_img
    )  # ascent + a forward pass per epoch
    trials = max_trials(cfg.finetune)
    metric = (len(cfg.finetune.metric_alphas) * min(n_val, cfg.finetune.metric_subset) * k) * t_img
    ft = trials * cfg.finetune.epochs * (n_train * t_img + metric)
    ft += joint_sets(cfg) * cfg.mrc.epochs * n_adv * 1.3 * t_img  # greedy joint MRC
    interp = (
        (1 + trials * _points_per_trial(cfg))
        * (val_eval + test_eval)
        * (k * cfg.eval.restarts + 1)
        * t_img
    )
    return {"adv_train": at, "mrc": mrc, "finetune": ft, "interpolate": interp}


def _points_per_trial(cfg: SweepConfig) -> int:
    """Alpha points evaluated per fine-tuning trial (besides alpha = 0): the whole grid, or a
    monotone search's binary search plus the tie check (the grid again if not monotone)."""
    n = len([a for a in cfg.interpolate.alphas if a > 0])
    if cfg.interpolate.search == "monotone":
        return min(n, math.ceil(math.log2(n + 1)) + 1)
    return n


def _stage_lines(cfg: SweepConfig, prep: Any) -> list[tuple[str, str]]:
    """(stage, what it will run) for the four stages."""
    r, modules = cfg.resources, prep.modules
    groups = max_module_sets(cfg.finetune)
    alphas = [a for a in cfg.interpolate.alphas if a > 0]
    tasks = math.ceil(len(alphas) / cfg.interpolate.alphas_per_task)
    at_desc = (
        f"start from {cfg.adv_train.checkpoint}"
        if cfg.adv_train.checkpoint
        else f"TorchTrainer, {r.adv_train.num_workers} worker(s) x {{CPU: {r.adv_train.cpus_per_worker:g}"
        f"{', GPU: %g' % (r.adv_train.gpus_per_worker or 1) if r.adv_train.use_gpu else ''}}}, "
        f"{cfg.adv_train.method} {cfg.adv_train.epochs} epochs"
    )
    mrc_desc = (
        f"{len(modules)} Tune trials (one per module) x {{CPU: {r.mrc.cpu:g}, GPU: {r.mrc.gpu:g}}}: "
        + ", ".join(modules[:6])
        + (" ..." if len(modules) > 6 else "")
    )
    ft_desc = (
        f"{groups} module set(s) x {len(cfg.finetune.lrs)} lr(s) = {groups * len(cfg.finetune.lrs)} Tune trials "
        f"under ASHA (grace {cfg.finetune.asha.grace_period}, factor {cfg.finetune.asha.reduction_factor:g}) "
        f"x {{CPU: {r.finetune.cpu:g}, GPU: {r.finetune.gpu:g}}}"
    )
    if len(cfg.finetune.strategies) > 1:
        ft_desc += (
            f"; strategies {', '.join(cfg.finetune.strategies)} (primary {cfg.finetune.primary})"
        )
    if joint_sets(cfg):
        ft_desc += f"; greedy joint MRC: up to {joint_sets(cfg)} Ray tasks in {cfg.finetune.greedy.size - 1} step(s)"
    interp_desc = (
        f"binary search over {len(cfg.interpolate.alphas)} alphas per surviving trial "
        f"(~{_points_per_trial(cfg)} evaluated when monotone), 1 task per trial + 1 for AT "
        if cfg.interpolate.search == "monotone"
        else f"{len(cfg.interpolate.alphas)} alphas per surviving trial, {tasks} task(s) per trial + 1 for AT "
    ) + f"x {{CPU: {r.interpolate.cpu:g}, GPU: {r.interpolate.gpu:g}}}"
    return [("adv_train", at_desc), ("mrc", mrc_desc), ("finetune", ft_desc),
            ("interpolate", interp_desc)]  # fmt: skip


def _seed_runs(cfg: SweepConfig, store: Any) -> list[tuple[int | None, Any, dict[str, bool]]]:
    """(seed, its store, which stages are done) for each run of stages 2-4: once, or once per
    seed of a seeds sweep (each in seeds/<s>/ with its own hashes)."""
    from rift_ray.hashing import stage_hashes

    if cfg.seeds is None:
        return [(None, store, {k: store.stage_done(k, h) for k, h in stage_hashes(cfg).items()})]
    runs = []
    for seed in cfg.seeds:
        st, hs = store.for_seed(seed), stage_hashes(cfg, seed)
        runs.append((seed, st, {k: st.stage_done(k, hs[k]) for k in STAGES_2_4}))
    return runs


def print_plan(cfg: SweepConfig, cluster: Any = None) -> None:
    """The plan; with ``cluster`` (a ``rift_ray.cluster.ClusterShape``) also how each stage's
    bundles pack onto its nodes, ending in ConfigError when one fits no node."""
    from rift_ray import cluster as cl
    from rift_ray.checks import preflight
    from rift_ray.hashing import stage_hashes
    from rift_ray.stages.common import ModelSpec

    prep = preflight(cfg)
    spec = ModelSpec.of(prep.splits)
    s = prep.splits
    t_img = time_per_image(cfg, spec)
    est = estimate(cfg, len(s.train), len(s.val), len(s.test), len(prep.modules), t_img)
    at_done = prep.store.stage_done("adv_train", stage_hashes(cfg)["adv_train"])
    lines = _stage_lines(cfg, prep)
    print(f"sweep {cfg.name} -> {prep.store.uri}")
    print(
        f"data: {cfg.data.dataset} train {len(s.train)} / val {len(s.val)} / test {len(s.test)}, {s.num_classes} classes; "
        f"model {cfg.model.arch}"
    )

    def show(i: int, stage: str, desc: str, is_done: bool, indent: str = "  ") -> None:
        state = "done (will be reused)" if is_done else "to run"
        print(f"{indent}{i}. {stage:<11} [{state}] {desc}; est. {_fmt(est[stage])} device-time")

    show(1, *lines[0], at_done)
    total = 0.0 if at_done else est["adv_train"]
    if cfg.seeds is not None:
        print(
            f"  stages 2-4 once per seed ({len(cfg.seeds)} seeds; each seed drives PGD starts, "
            f"MRC batch order, fine-tuning order and augmentation; split and AT model of seed "
            f"{cfg.seed}):"
        )
    for run_seed, st, dn in _seed_runs(cfg, prep.store):
        indent = "  "
        if run_seed is not None:
            print(f"    seed {run_seed} -> {st.uri}")
            indent = "      "
        for i, (stage, desc) in enumerate(lines[1:], 2):
            show(i, stage, desc, dn[stage], indent)
            total += 0.0 if dn[stage] else est[stage]
    print(
        f"measured {t_img * 1e3:.2f} ms per image forward+backward on this machine's CPU; "
        f"remaining compute ~{_fmt(total)} on one such device (ASHA usually cuts fine-tuning)"
    )
    print(alpha_rule_line(cfg, len(prep.splits.val)))
    if cluster is not None:
        at_runs = not (cfg.adv_train.checkpoint or at_done)  # as the sweep checks
        bundles = cl.stage_bundles(cfg, len(prep.modules), adv_train=at_runs)
        print(f"packing on {cluster.describe()}:")
        for line in cl.packing_lines(cluster, bundles):
            print(f"  {line}")
        cl.check_fits(cluster, bundles)
        cl.check_storage(cfg, cluster)


def alpha_rule_line(cfg: SweepConfig, n_val: int) -> str:
    """The alpha* rule and its tolerance next to the noise floor of the validation images it
    is chosen on (:func:`rift_ray.rift.confidence.noise_floor`)."""
    from rift_ray.rift.confidence import noise_floor

    it = cfg.interpolate
    n = max(0, n_val - it.confirm_size)
    if cfg.eval.val_subset is not None:
        n = min(n, cfg.eval.val_subset)
    if n == 0:
        return f"alpha* rule {it.rule}: no validation images (alpha* = 0)"
    floor = noise_floor(n)
    verdict = "below" if it.tolerance < floor else "above"
    held = f", {it.confirm_size:,} more held out to confirm it" if it.confirm_size else ""
    return (
        f"alpha* rule {it.rule}, tolerance {it.tolerance:g} points on {n:,} validation images"
        f"{held}: noise floor {floor:.2f} points (the smallest robust drop {n:,} paired images "
        f"can resolve, sign test at 95%); the tolerance is {verdict} it"
    )


def _fmt(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"
