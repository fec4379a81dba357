"""Stage 4: the alpha grid between AT and fine-tuned weights, evaluated by Ray tasks.

The AT model (alpha = 0, identical for every trial) is evaluated once; the other
alpha points of every surviving fine-tuning trial are evaluated in batches of
``interpolate.alphas_per_task`` per task (``interpolate.search: monotone``: one task per
trial binary-searching the alphas instead), on validation and test (clean, PGD and,
when configured, corruption accuracy), keeping every image's result
(:mod:`rift_ray.stages.per_image`). alpha* is chosen per trial on validation by
``interpolate.rule``; the trial with the largest feasible clean gain is the final model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import ray
import torch

from rift_ray.attacks import corruption_accuracy
from rift_ray.config import SweepConfig
from rift_ray.corruptions import load_cifar_c
from rift_ray.data import DatasetSplits, ImageData
from rift_ray.downloads import cifar_c_dir
from rift_ray.errors import StageFailed
from rift_ray.hashing import config_hash
from rift_ray.metrics import ACCURACIES
from rift_ray.progress import Progress, log
from rift_ray.results import corruption_fields, environment_info, summary_table, versions
from rift_ray.rift import interpolate, search_alpha
from rift_ray.rift.interpolate import best_trial
from rift_ray.stages.base import Stage, SweepContext, SweepState
from rift_ray.stages.common import (
    device_name,
    evaluate_pgd,
    peak_memory,
    start_worker,
)
from rift_ray.stages.per_image import (
    AT_TRIAL,
    PER_IMAGE_KEYS,
    alpha_choice,
    confirmation,
    images_of,
    noise_fields,
    split_per_image,
    strip_live,
)
from rift_ray.stages.selection import strategy_table
from rift_ray.store import (
    INTERPOLATION_TABLE,
    PER_IMAGE_TABLE,
    RIFT_CHECKPOINT,
    STRATEGIES_TABLE,
    SUMMARY,
    SUMMARY_TABLE,
    trial_name,
)


def eval_sets(cfg: SweepConfig, splits: DatasetSplits) -> dict[str, ImageData]:
    """The validation and test sets the interpolation grid is measured on (subsets as
    configured); with ``interpolate.confirm_size`` N, ``confirm`` is the first N validation
    images and ``val`` (selection) the ones after them."""
    out = {}
    val, k = splits.val, min(cfg.interpolate.confirm_size, len(splits.val))
    if k:
        out["confirm"] = val.subset(torch.arange(k))
        val = val.subset(torch.arange(k, len(val)))
    for split, data, n in (
        ("val", val, cfg.eval.val_subset),
        ("test", splits.test, cfg.eval.test_subset),
    ):
        if n is not None and len(data) > n:
            data = data.subset(torch.arange(n))
        if len(data):
            out[split] = data
    return out


def evaluate_state(
    cfg: SweepConfig,
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    sets: dict[str, ImageData],
    cdata: dict[Any, ImageData] | None,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Clean / PGD (/ corruption) accuracy of one state dict on each named set."""
    model.load_state_dict(state)
    model.to(device)
    out: dict[str, dict[str, float]] = {}
    for split, data in sets.items():
        row: dict[str, Any] = evaluate_pgd(cfg, model, data, device, cfg.eval.restarts, True)
        row["corruption_acc"] = None  # same columns in every row (measured on test only)
        if cdata and split == "test":
            c = corruption_accuracy(
                model, cdata, batch_size=cfg.eval.batch_size, device=device,
                amp=cfg.compute.amp, per_image=True,
            )  # fmt: skip
            row["corruption_acc"], row["corruption_correct"] = c["mean"], c["per_image"]
        out[split] = row
    return out


def _evaluate_point(
    cfg: SweepConfig,
    model: torch.nn.Module,
    at_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor] | None,
    alpha: float,
    sets: dict[str, ImageData],
    cdata: dict[Any, ImageData] | None,
    device: torch.device,
) -> list[dict[str, Any]]:
    """The rows (one per set) of one alpha point, with its time and peak memory."""
    t0 = time.time()
    mem = peak_memory(cfg, device)
    with mem:  # the interpolated state and every evaluation
        state = at_state if ft_state is None else interpolate(at_state, ft_state, alpha)
        metrics = evaluate_state(cfg, model, state, sets, cdata, device)
    return [
        {
            "alpha": alpha,
            "split": split,
            **m,
            "seconds": time.time() - t0,
            "peak_mem_bytes": mem.peak_bytes,
            "mem_method": mem.method,
            "device": device_name(device),
        }
        for split, m in metrics.items()
    ]


@ray.remote
def _alpha_task(
    cfg_dict: dict[str, Any],
    spec: Any,
    splits: DatasetSplits,
    at_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor] | None,
    alphas: list[float],
    cdata: dict[Any, ImageData] | None = None,
) -> list[dict[str, Any]]:
    cfg, device, model = start_worker(cfg_dict, "interpolate", spec)
    assert model is not None
    sets = eval_sets(cfg, splits)
    rows = []
    for alpha in alphas:
        rows += _evaluate_point(cfg, model, at_state, ft_state, alpha, sets, cdata, device)
    return rows


@ray.remote
def _search_task(
    cfg_dict: dict[str, Any],
    spec: Any,
    splits: DatasetSplits,
    at_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor],
    baseline: dict[str, Any],
    cdata: dict[Any, ImageData] | None = None,
) -> list[dict[str, Any]]:
    """``interpolate.search: monotone``: search_alpha on validation for one trial; every
    evaluated alpha is measured on each set (test too), like a grid task's rows."""
    cfg, device, model = start_worker(cfg_dict, "interpolate", spec)
    assert model is not None
    sets = eval_sets(cfg, splits)
    rows: list[dict[str, Any]] = []

    def evaluate_val(alpha: float) -> dict[str, Any]:
        point = _evaluate_point(cfg, model, at_state, ft_state, alpha, sets, cdata, device)
        rows.extend(point)
        val = next(r for r in point if r["split"] == "val")
        return {k: v for k, v in val.items() if k not in PER_IMAGE_KEYS}

    alphas = [a for a in cfg.interpolate.alphas if a > 0]
    if alphas:
        search_alpha(evaluate_val, [0.0, *alphas], cfg.interpolate.tolerance, baseline=baseline)
    return rows


def corruption_sets(
    cfg: SweepConfig, splits: DatasetSplits, data_seed: int | None = None
) -> dict[Any, ImageData] | None:
    """The corrupted test sets, built once by the driver: the official CIFAR-10-C / -100-C
    files (``eval.corruption_source: files``) or regenerated from the test split
    (``generated``, noise seeded by ``data_seed``, default ``cfg.seed``: data, like the
    split, so every seed of a ``seeds`` sweep is measured on the same images), each cell
    cut to the evaluated test subset (and to ``eval.corruption_subset``)."""
    if not cfg.eval.corruptions:
        return None
    test = eval_sets(cfg, splits).get("test")
    if test is None:
        return None
    n_cell = cfg.eval.corruption_subset
    if n_cell is not None and len(test) > n_cell:
        test = test.subset(torch.arange(n_cell))
    if cfg.eval.corruption_source == "generated":
        from rift_ray.corruptions import generate_cifar_c

        seed = cfg.seed if data_seed is None else data_seed
        return generate_cifar_c(test, cfg.eval.corruptions, cfg.eval.severities, seed=seed)
    root = cifar_c_dir(cfg)
    assert root is not None  # checked before any compute
    cells = load_cifar_c(root, cfg.eval.corruptions, cfg.eval.severities)
    n = len(test)
    return {k: (v.subset(torch.arange(n)) if len(v) > n else v) for k, v in cells.items()}


def _evaluate_points(
    cfg: SweepConfig, spec: Any, splits_ref: Any, at_state: dict[str, torch.Tensor],
    trials: list[dict[str, Any]], cdata: Any, on_rows: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:  # fmt: skip
    """The AT model's rows (alpha 0) and each trial's alpha rows (by trial name), computed as Ray
    tasks of ``interpolate.alphas_per_task`` alphas each (one search task per trial with
    ``interpolate.search: monotone``). ``on_rows(rows)``: each task's rows as it ends."""
    r = cfg.resources.interpolate
    opts = {"num_cpus": r.cpu, "num_gpus": r.gpu}
    cfg_dict = cfg.to_dict()
    at_ref = ray.put(at_state)
    c_ref = ray.put(cdata) if cdata else None
    alphas = [a for a in cfg.interpolate.alphas if a > 0]
    search = cfg.interpolate.search == "monotone"
    at_job = _alpha_task.options(**opts).remote(
        cfg_dict, spec, splits_ref, at_ref, None, [0.0], c_ref
    )
    jobs: dict[Any, str | None] = {at_job: None}
    results: dict[Any, list[dict[str, Any]]] = {}
    with Progress("interpolate", 1 + len(alphas) * len(trials), unit="alpha points") as bar:
        base_val = None
        if search:  # the search needs the AT model's validation figures first
            results[at_job] = ray.get(at_job)
            bar.advance(1)
            if on_rows is not None:
                on_rows([{**row, "trial": "AT"} for row in results[at_job]])
            base_val = next((r for r in results[at_job] if r["split"] == "val"), None)
        k = cfg.interpolate.alphas_per_task
        for t in trials:
            ft_ref = ray.put(t["state"])
            if base_val is not None:
                job = _search_task.options(**opts).remote(
                    cfg_dict, spec, splits_ref, at_ref, ft_ref, base_val, c_ref
                )
                jobs[job] = t["trial"]
                continue
            for i in range(0, len(alphas), k):
                job = _alpha_task.options(**opts).remote(
                    cfg_dict, spec, splits_ref, at_ref, ft_ref, alphas[i : i + k], c_ref
                )
                jobs[job] = t["trial"]
        pending = [ref for ref in jobs if ref not in results]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                results[ref] = ray.get(ref)
                if on_rows is not None:
                    on_rows([{**row, "trial": jobs[ref] or "AT"} for row in results[ref]])
                # a search skips alphas: count them as done so the bar ends at its total
                bar.advance(len(alphas) if search else len({row["alpha"] for row in results[ref]}))
    per_trial: dict[str, list[dict[str, Any]]] = {t["trial"]: [] for t in trials}
    for ref, name in jobs.items():
        if name is not None:
            per_trial[name] += results[ref]
    return results[at_job], per_trial


def run_interpolation(
    cfg: SweepConfig,
    spec: Any,
    splits_ref: Any,
    at_state: dict[str, torch.Tensor],
    trials: list[dict[str, Any]],
    splits: DatasetSplits | None = None,
    data_seed: int | None = None,
    finalists: set[str] | None = None,
    on_rows: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evaluate every trial's alpha grid; return (table rows, choice of the winning trial).

    ``data_seed``: the seed of the data (generated corruptions), default ``cfg.seed``.
    ``finalists``: the trials the winner is chosen from (default: all; the sweep passes the
    primary strategy's trials, the others are evaluated for comparison only).
    ``on_rows``: called with each task's rows as it ends (live logging).
    """
    cdata = corruption_sets(cfg, splits, data_seed) if splits is not None else None
    strip = strip_live(on_rows)
    baseline, per_trial = _evaluate_points(cfg, spec, splits_ref, at_state, trials, cdata, strip)
    baseline, per_image = split_per_image(baseline, AT_TRIAL)
    at_images = {r["split"]: images_of(r) for r in per_image}
    table: list[dict[str, Any]] = []
    choices = []
    source = cfg.eval.corruption_source  # "generated": a fallback, labelled wherever it is shown
    for t in trials:
        own, images = split_per_image(per_trial[t["trial"]], t["trial"])
        per_image += images
        rows = [dict(row) for row in baseline] + own
        for row in rows:
            row.update(trial=t["trial"], modules="+".join(t["modules"]), lr=t["lr"])
            row["corruption_source"] = source if row.get("corruption_acc") is not None else None
        rows.sort(key=lambda row: (row["split"], row["alpha"]))
        table += [r for r in rows if r["split"] != "confirm"]
        val = [row for row in rows if row["split"] == "val"]
        val_images = {float(r["alpha"]): images_of(r) for r in images if r["split"] == "val"}
        if "val" in at_images:
            val_images[0.0] = at_images["val"]
        choices.append(
            alpha_choice(
                t["trial"], val, cfg.interpolate.tolerance, cfg.interpolate.rule, val_images
            )
        )
    best = best_trial(choices, finalists)
    for row in table:
        row["selected"] = (
            best is not None and row["trial"] == best["trial"] and row["alpha"] == best["alpha"]
        )
    out: dict[str, Any] = {"choices": choices, "best": best, "per_image": per_image}
    confirm_rows = [r for r in per_image if r["split"] == "confirm"]
    if best is not None and confirm_rows:
        out["confirmation"] = confirmation(confirm_rows, best, cfg.interpolate.tolerance)
    return table, out


class InterpolateStage(Stage):
    """Stage 4: the alpha grid of every surviving trial, alpha*, the final model and the
    summary (with AutoAttack and the strategy comparison where configured)."""

    name = "interpolate"
    reuses = SUMMARY

    def load(self, ctx: SweepContext, st: SweepState) -> None:
        st.summary = ctx.store.get_json(SUMMARY)
        st.summary["reused"] = True

    def compute(self, ctx: SweepContext, st: SweepState) -> dict[str, Any]:
        cfg, store, h = ctx.cfg, ctx.store, ctx.hashes[self.name]
        t0 = time.time()
        self.say(f"{len(cfg.interpolate.alphas)} alphas x {len(st.survivors)} trial(s)")
        primary = cfg.finetune.primary  # its best trial is the final model; others compare
        finalists = {
            trial_name(g, lr) for g in st.by_strategy.get(primary, []) for lr in cfg.finetune.lrs
        }
        table, choice = run_interpolation(
            cfg,
            ctx.spec,
            ctx.splits_ref,
            st.at_state,
            st.survivors,
            ctx.splits,
            data_seed=ctx.data_seed,
            finalists=finalists or None,
            on_rows=ctx.tracker.interp_rows,
        )
        best = choice["best"]
        if best is None:
            raise StageFailed(
                "no trial"
                + (f" of finetune.primary ({primary})" if len(st.by_strategy) > 1 else "")
                + " has an alpha within interpolate.tolerance of the AT robust accuracy",
                error="no alpha satisfies the robust-accuracy constraint",
            )
        winner = next(s for s in st.survivors if s["trial"] == best["trial"])
        rift_state = interpolate(st.at_state, winner["state"], best["alpha"])
        aa_curve = self._autoattack(ctx, st, table, winner, best)
        store.put_table(INTERPOLATION_TABLE, table, stage_hash=h)
        store.put_table(PER_IMAGE_TABLE, choice["per_image"], stage_hash=h)
        store.put(
            RIFT_CHECKPOINT,
            ctx.checkpoint_bytes(rift_state, trial=best["trial"], alpha=best["alpha"]),
            stage_hash=h,
        )
        st.timings[self.name] = time.time() - t0
        summary = build_summary(
            cfg,
            st.mrc_rows,
            st.ft_rows,
            table,
            choice,
            winner,
            st.timings,
            time.time() - st.t_start,
        )
        summary["primary"] = primary
        summary.update(noise_fields(cfg, choice, best))
        summary["strategies"] = strategy_table(ctx, st.by_strategy, st.mrc_rows, choice, table)
        if aa_curve:
            add_autoattack(summary, aa_curve, best)
        summary["environment"] = environment_info(
            ray.cluster_resources(), sum(bool(n["Alive"]) for n in ray.nodes())
        )
        store.put_json(SUMMARY, summary, stage_hash=h)
        store.put_table(SUMMARY_TABLE, summary_table(summary), stage_hash=h)
        store.put_table(STRATEGIES_TABLE, summary["strategies"], stage_hash=h)
        st.summary, st.table = summary, table
        return {"seconds": st.timings[self.name]}

    def _autoattack(
        self,
        ctx: SweepContext,
        st: SweepState,
        table: list[dict[str, Any]],
        winner: dict[str, Any],
        best: Mapping[str, Any],
    ) -> dict[float, dict[str, Any]]:
        """AutoAttack of the AT model, alpha* and ``eval.autoattack.alphas`` when enabled;
        each test row gets ``autoattack_acc`` (alpha 0 for every trial, the rest for the winner)."""
        aa = ctx.cfg.eval.autoattack
        curve: dict[float, dict[str, Any]] = {}
        if aa.enabled:
            from rift_ray.stages.autoattack import autoattack_curve

            log(
                f"AutoAttack ({aa.version}) of the AT model, alpha* and "
                f"{len(aa.alphas)} more alpha(s) of {best['trial']}"
            )
            curve = autoattack_curve(
                ctx.cfg, ctx.store, ctx.spec, ctx.splits_ref, st.at_state, winner["state"],
                best["alpha"], best["trial"],
            )  # fmt: skip
        for row in table:
            hit = row["split"] == "test" and (row["alpha"] == 0.0 or row["trial"] == best["trial"])
            point = curve.get(row["alpha"]) if hit else None
            row["autoattack_acc"] = point["robust_acc"] if point else None
        return curve

    def track(self, ctx: SweepContext, st: SweepState) -> None:
        ctx.tracker.log_interpolation(st.table, st.summary)
        urls = ctx.tracker.urls()
        if urls:  # online runs link back from summary.json and the report
            st.summary["wandb"] = {"group": ctx.tracker.group, "runs": urls}
            ctx.store.put_json(SUMMARY, st.summary, stage_hash=ctx.hashes[self.name])


def add_autoattack(
    summary: dict[str, Any], curve: dict[float, dict[str, Any]], best: Mapping[str, Any]
) -> None:
    """The AutoAttack figures of the AT model and of alpha*, and the curve, in the summary."""
    keep = ("robust_acc", "clean_acc", "n", "after", "settings")
    summary["autoattack"] = {
        who: {k: curve[a][k] for k in keep}
        for who, a in (("at", 0.0), ("rift", float(best["alpha"])))
    }
    summary["autoattack_curve"] = [
        {"alpha": a, "trial": best["trial"], **{k: r[k] for k in ("robust_acc", "n")}}
        for a, r in sorted(curve.items())
    ]
    for who in ("at", "rift"):
        summary[who].setdefault("test", {})["autoattack_acc"] = summary["autoattack"][who][
            "robust_acc"
        ]


def build_summary(
    cfg: SweepConfig,
    mrc_rows: list[dict[str, Any]],
    ft_rows: list[dict[str, Any]],
    table: list[dict[str, Any]],
    choice: dict[str, Any],
    winner: dict[str, Any],
    timings: dict[str, float],
    wall: float,
) -> dict[str, Any]:
    """The sweep's summary (``summary.json``): the chosen trial and alpha*, AT vs RiFT on
    validation and test, the MRC ranking, failures, timings and versions."""
    best = choice["best"]

    def metrics(alpha: float, split: str) -> dict[str, Any]:
        row = next(
            (
                r
                for r in table
                if r["trial"] == best["trial"] and r["alpha"] == alpha and r["split"] == split
            ),
            None,
        )
        if row is None:
            return {}
        return {k: row.get(k) for k in ACCURACIES if row.get(k) is not None}

    return {
        "name": cfg.name,
        "seed": cfg.seed,
        "config_hash": config_hash(cfg),
        "modules": winner["modules"],
        "lr": winner["lr"],
        "trial": best["trial"],
        "alpha": best["alpha"],
        "clean_gain_val": best["clean_gain"],
        "robust_drop_val": best["robust_drop"],
        "reason": best["reason"],
        "mrc_ranking": [
            {"module": r["module"], "mrc": r.get("mrc"), "status": r["status"]} for r in mrc_rows
        ],
        "failed_modules": [r["module"] for r in mrc_rows if r["status"] != "done"],
        "finetune_trials": len(ft_rows),
        "failures": [
            {"stage": stage, "name": r[key], "error": r.get("error") or ""}
            for stage, rows, key in (("mrc", mrc_rows, "module"), ("finetune", ft_rows, "trial"))
            for r in rows
            if r["status"] not in ("done", "finished", "stopped")
        ],
        "choices": choice["choices"],
        **corruption_fields(cfg),
        "at": {s: metrics(0.0, s) for s in ("val", "test")},
        "rift": {s: metrics(best["alpha"], s) for s in ("val", "test")},
        "seconds": {**timings, "total": wall},
        "versions": versions(),
    }
