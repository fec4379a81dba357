"""``rift-ray sweep --dry-run``: the plan of a sweep and what it costs, without computing.

    rift-ray sweep sweeps/wrn.yaml --dry-run --gpu h100 --price 2.5

The cost is counted, not timed: the model's forward FLOPs per image (FlopCounterMode on the
meta device) times the passes each stage makes over the images the config names
(:mod:`rift_ray.cost`), then GPU-hours, wall hours and dollars on a named card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rift_ray.config import ConfigError, SweepConfig
from rift_ray.cost import (
    DEFAULT_GPU,
    DEFAULT_UTILISATION,
    GPUS,
    ModelFlops,
    Sizes,
    autoattack_passes,
    config_gpus,
    cost_rows,
    finetune_grid,
    finetune_survivors,
    halving_epochs,
    meta_model_flops,
    peak,
    points_per_trial,
    stage_flops,
    stage_gpus,
)
from rift_ray.rift.selection import max_module_sets

STAGES_2_4 = ("mrc", "finetune", "interpolate")
_PUBLISHED = {  # (train, test, classes, image side) of the datasets whose sizes are fixed
    "cifar10": (50000, 10000, 10, 32),
    "cifar100": (50000, 10000, 100, 32),
    "tinyimagenet": (100000, 10000, 200, 64),
}


@dataclass
class CostOptions:
    """How ``--dry-run`` turns FLOPs into hours: the card (None: the default card, labelled
    so), the assumed utilisation, dollars per GPU-hour, and the cluster's GPUs (None: the
    cluster the dry-run sees, else what the config asks for)."""

    gpu: str | None = None
    utilisation: float = DEFAULT_UTILISATION
    price: float | None = None
    gpus: int | None = None


@dataclass
class _Inputs:
    """What the plan needs from the checks: sizes, model shape, MRC modules, storage state."""

    uri: str
    sizes: Sizes
    num_classes: int
    image_shape: tuple[int, int, int]
    modules: list[str]
    store: Any = None
    """None when the checks failed: nothing is known to be done."""


def joint_sets(cfg: SweepConfig) -> int:
    """Module sets the greedy strategy scores by joint MRC, at most (0 without it)."""
    g = cfg.finetune.greedy
    return (g.size - 1) * g.candidates if "greedy" in cfg.finetune.strategies else 0


def nominal_inputs(cfg: SweepConfig) -> _Inputs | None:
    """The plan's inputs from the config alone, for datasets of published sizes (the dry-run
    of a sweep whose data, storage or checkpoint this machine cannot reach); None otherwise."""
    from rift_ray.data import resolved_val_size
    from rift_ray.models import build_model, mrc_candidates, select_modules

    d = cfg.data
    if d.dataset == "synthetic":
        s = d.synthetic
        train, test, classes, side = s.train_size, s.test_size, s.num_classes, s.image_size
    elif d.dataset in _PUBLISHED:
        train, test, classes, side = _PUBLISHED[d.dataset]
    else:
        return None
    train = min(train, d.train_subset or train)
    test = min(test, d.test_subset or test)
    val = resolved_val_size(d, train)
    shape = (3, side, side)
    with torch.device("meta"):
        model = build_model(cfg.model.arch, classes, depth=cfg.model.depth,
                            widen_factor=cfg.model.widen_factor, image_size=side)  # fmt: skip
    modules = select_modules(mrc_candidates(model, (1, *shape)), cfg.mrc.include, cfg.mrc.exclude)
    return _Inputs(f"{cfg.storage.rstrip('/')}/{cfg.name}", Sizes(train - val, val, test),
                   classes, shape, modules)  # fmt: skip


def _inputs(cfg: SweepConfig) -> tuple[_Inputs, Exception | None]:
    """The checks' findings; when a check fails (bad input) and the sizes are published, the
    config's nominal inputs and the error, which the plan reports after the estimate."""
    from rift_ray.checkpoint import CheckpointError
    from rift_ray.checks import preflight
    from rift_ray.data import DataError
    from rift_ray.stages.common import ModelSpec
    from rift_ray.store import StorageError

    try:
        prep = preflight(cfg)
    except (ConfigError, DataError, StorageError, CheckpointError) as e:
        nominal = nominal_inputs(cfg)
        if nominal is None:
            raise
        return nominal, e
    s, spec = prep.splits, ModelSpec.of(prep.splits)
    sizes = Sizes(len(s.train), len(s.val), len(s.test))
    return (_Inputs(prep.store.uri, sizes, s.num_classes, spec.image_shape, prep.modules,
                    prep.store), None)  # fmt: skip


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
    n_alphas, search = len(cfg.interpolate.alphas), cfg.interpolate.search
    interp_desc = {
        "monotone": f"binary search over {n_alphas} alphas per surviving trial "
        f"(~{points_per_trial(cfg)} evaluated when monotone), 1 task per trial + 1 for AT ",
        "clean_first": f"{n_alphas} alphas per surviving trial: clean accuracy at each, PGD in "
        "order of clean gain until the rule is met, 1 task per trial + 1 for AT ",
        "grid": f"{n_alphas} alphas per surviving trial, {tasks} task(s) per trial + 1 for AT ",
    }[search] + f"x {{CPU: {r.interpolate.cpu:g}, GPU: {r.interpolate.gpu:g}}}; test at "
    interp_desc += "every alpha" if cfg.interpolate.test_curve else "alpha 0 and each alpha*"
    return [("adv_train", at_desc), ("mrc", mrc_desc), ("finetune", ft_desc),
            ("interpolate", interp_desc)]  # fmt: skip


def _seed_runs(cfg: SweepConfig, store: Any) -> list[tuple[int | None, str, dict[str, bool]]]:
    """(seed, where it lives, which stages are done) for each run of stages 2-4: once, or once
    per seed of a seeds sweep (each in seeds/<s>/ with its own hashes). ``store`` None: the
    checks failed, nothing is known to be done."""
    from rift_ray.hashing import stage_hashes

    def done(st: Any, hashes: dict[str, str]) -> dict[str, bool]:
        return {k: st is not None and st.stage_done(k, hashes[k]) for k in STAGES_2_4}

    if cfg.seeds is None:
        return [(None, "", done(store, stage_hashes(cfg)))]
    runs: list[tuple[int | None, str, dict[str, bool]]] = []
    for seed in cfg.seeds:
        st = store.for_seed(seed) if store is not None else None
        uri = st.uri if st is not None else f"seeds/{seed}"
        runs.append((seed, uri, done(st, stage_hashes(cfg, seed))))
    return runs


def print_plan(cfg: SweepConfig, cluster: Any = None, opts: CostOptions | None = None) -> None:
    """The plan and its cost; with ``cluster`` (a ``rift_ray.cluster.ClusterShape``) also how
    each stage's bundles pack onto its nodes, ending in ConfigError when one fits no node.
    When a check fails on input this machine cannot reach (data, storage, a checkpoint) and
    the dataset's sizes are published, the plan and cost are printed from the config and the
    check's error is raised at the end."""
    from rift_ray import cluster as cl
    from rift_ray.hashing import stage_hashes

    opts = opts or CostOptions()
    inp, problem = _inputs(cfg)
    at_done = inp.store is not None and inp.store.stage_done(
        "adv_train", stage_hashes(cfg)["adv_train"]
    )
    mf = meta_model_flops(cfg, inp.num_classes, inp.image_shape, inp.modules)
    flops = stage_flops(cfg, inp.sizes, mf)
    lines = _stage_lines(cfg, inp)
    print(f"sweep {cfg.name} -> {inp.uri}")
    s = inp.sizes
    print(
        f"data: {cfg.data.dataset} train {s.train} / val {s.val} / test {s.test}, "
        f"{inp.num_classes} classes; model {cfg.model.arch}"
        + (" (sizes from the config: the checks failed, see the end)" if problem else "")
    )
    runs = _seed_runs(cfg, inp.store)

    per = {k: (len(runs) if k in STAGES_2_4 or k == "autoattack" else 1) for k in flops}

    def show(i: int, stage: str, desc: str, is_done: bool, indent: str = "  ") -> None:
        state = "done (will be reused)" if is_done else "to run"
        print(f"{indent}{i}. {stage:<11} [{state}] {desc}; {_pflop(flops[stage] / per[stage])}")

    show(1, *lines[0], at_done)
    todo = {k: 0.0 for k in flops}
    todo["adv_train"] = 0.0 if at_done else flops["adv_train"]
    if cfg.seeds is not None:
        print(
            f"  stages 2-4 once per seed ({len(cfg.seeds)} seeds; each seed drives PGD starts, "
            f"MRC batch order, fine-tuning order and augmentation; split and AT model of seed "
            f"{cfg.seed}):"
        )
    for run_seed, uri, dn in runs:
        indent = "  "
        if run_seed is not None:
            print(f"    seed {run_seed} -> {uri}")
            indent = "      "
        for i, (stage, desc) in enumerate(lines[1:], 2):
            show(i, stage, desc, dn[stage], indent)
            for k in (stage, "autoattack") if stage == "interpolate" else (stage,):
                todo[k] += 0.0 if dn[stage] else flops[k] / per[k]
    print(alpha_rule_line(cfg, inp.sizes.val))
    for line in cost_lines(cfg, flops, todo, mf, inp, opts, cluster):
        print(line)
    if cluster is not None:
        at_runs = not (cfg.adv_train.checkpoint or at_done)  # as the sweep checks
        bundles = cl.stage_bundles(cfg, len(inp.modules), adv_train=at_runs)
        print(f"packing on {cluster.describe()}:")
        for line in cl.packing_lines(cluster, bundles):
            print(f"  {line}")
        if problem is not None:  # the checks' error first: the sweep would stop there
            raise problem
        cl.check_fits(cluster, bundles)
        cl.check_storage(cfg, cluster)
    if problem is not None:
        raise problem


def cluster_gpus(cfg: SweepConfig, cluster: Any, opts: CostOptions) -> tuple[float, str]:
    """GPUs the estimate spreads a stage over, and where that number comes from: ``--gpus``,
    else the cluster's (alive nodes, or a ``ray up`` config's node types at their maximum),
    else what the config's resources ask for."""
    if opts.gpus is not None:
        return float(opts.gpus), "--gpus"
    if cluster is not None:
        n = sum(x.gpu * (x.max_count if cluster.declared else x.alive) for x in cluster.nodes)
        if n > 0:
            return float(n), "the cluster's"
    return float(config_gpus(cfg)), "what resources.adv_train asks for; --gpus N for more"


def cost_lines(
    cfg: SweepConfig, flops: dict[str, float], todo: dict[str, float], mf: ModelFlops,
    inp: _Inputs, opts: CostOptions, cluster: Any = None,
) -> list[str]:  # fmt: skip
    """The cost table: per stage PFLOP, GPU-hours, GPUs at once, wall hours and dollars on the
    chosen card, then what remains to run, then the assumptions behind the counts."""
    card = GPUS[opts.gpu or DEFAULT_GPU]
    amp = cfg.compute.amp
    n_gpus, source = cluster_gpus(cfg, cluster, opts)
    gpus = stage_gpus(cfg, n_gpus, len(inp.modules), inp.sizes.test)
    rows = cost_rows(flops, gpus, card, amp, opts.utilisation, opts.price)
    left = cost_rows(todo, gpus, card, amp, opts.utilisation, opts.price)
    which = "--gpu" if opts.gpu else f"default card; --gpu {'|'.join(GPUS)}"
    kind = "BF16 tensor (compute.amp bf16)" if amp == "bf16" else "TF32 tensor (compute.amp none)"
    rate = peak(card, amp) * opts.utilisation
    out = [
        f"cost on {card.label} ({which}): {peak(card, amp) / 1e12:g} TFLOP/s dense {kind} peak "
        f"x {opts.utilisation:.0%} utilisation (assumed; --utilisation) = {rate / 1e12:.0f} "
        f"TFLOP/s per GPU; {n_gpus:g} GPU(s) ({source})",
        f"  {'stage':<14}{'PFLOP':>10}{'GPU-h':>10}{'GPUs':>6}{'wall h':>9}"
        + (f"{'$':>10}" if opts.price is not None else ""),
    ]
    for i, r in enumerate(rows):
        if r["stage"] != "autoattack" or cfg.eval.autoattack.enabled:
            out.append(_row(f"{min(i + 1, 4)} {r['stage']}", r, opts.price))
    total = {k: sum(r[k] for r in left) for k in ("pflop", "gpu_hours", "wall_hours")}
    total["dollars"] = sum(r.get("dollars", 0.0) for r in left)
    out.append(_row("to run", {**total, "gpus": None}, opts.price))
    if opts.price is not None:
        out.append(
            f"  $ = busy GPU-hours x ${opts.price:g}; renting {n_gpus:g} GPUs for the wall time: "
            f"${total['wall_hours'] * n_gpus * opts.price:,.2f}"
        )
    ft, a = cfg.finetune, cfg.finetune.asha
    epochs = sum(halving_epochs(n, ft.epochs, a.grace_period, a.reduction_factor)[0]
                 for _, n in finetune_grid(cfg))  # fmt: skip
    upper = sum(n for _, n in finetune_grid(cfg)) * ft.epochs
    out.append(
        f"counted: F = {mf.forward / 1e9:.3g} GFLOP per image forward (FlopCounterMode); "
        f"training step 3F, PGD step 2F, fine-tuning step 1+2t F (t = {mf.mean_tail():.2f}, "
        f"the mean MRC tail); fine-tuning {epochs} of {upper} trial-epochs under successive "
        f"halving, {finetune_survivors(cfg)} trial(s) interpolated; AutoAttack ~"
        f"{autoattack_passes():,.0f}F per image; wall h: the GPUs kept busy, no rung waits "
        f"(docs/cost.md)"
    )
    return out


def _row(label: str, r: dict[str, Any], price: float | None) -> str:
    gpus = "" if r["gpus"] is None else f"{r['gpus']:g}"
    text = (f"  {label:<14}{_num(r['pflop']):>10}{_num(r['gpu_hours']):>10}{gpus:>6}"
            f"{_num(r['wall_hours']):>9}")  # fmt: skip
    return text + (f"{r['dollars']:>10,.2f}" if price is not None else "")


def _num(x: float) -> str:
    """Three significant figures (thousands separated), however small the sweep."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _pflop(flops: float) -> str:
    value, unit = (flops / 1e15, "PFLOP") if flops >= 1e13 else (flops / 1e12, "TFLOP")
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


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
