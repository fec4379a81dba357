"""Stage 4: the alpha grid between AT and fine-tuned weights, evaluated by Ray tasks.

alpha* is chosen per trial on validation by ``interpolate.rule``, measuring what
``interpolate.search`` needs (``clean_first``, the default: clean accuracy at every alpha, PGD
only down the clean-gain order until the rule is met); then test PGD and corruptions are
measured at each trial's alpha* and the AT model's (every alpha with
``interpolate.test_curve``): :mod:`rift_ray.stages.alpha_points`. Every image's result is
kept (:mod:`rift_ray.stages.per_image`). The trial with the largest feasible clean gain is
the final model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import ray
import torch

from rift_ray.config import SweepConfig
from rift_ray.corruptions import load_cifar_c
from rift_ray.data import DatasetSplits, ImageData
from rift_ray.downloads import cifar_c_dir
from rift_ray.errors import StageFailed
from rift_ray.hashing import config_hash
from rift_ray.metrics import ACCURACIES
from rift_ray.progress import log
from rift_ray.results import corruption_fields, environment_info, summary_table, versions
from rift_ray.rift import interpolate
from rift_ray.rift.interpolate import best_trial
from rift_ray.stages.alpha_points import (
    Points,
    eval_sets,
    plan_on_test,
    points_on_test,
    validation_points,
)
from rift_ray.stages.base import Stage, SweepContext, SweepState
from rift_ray.stages.per_image import (
    AT_TRIAL,
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
    pts = Points(cfg, spec, splits_ref, at_state)
    at_rows, val_rows, refs = validation_points(pts, trials, cdata, strip)
    baseline, per_image = split_per_image(at_rows, AT_TRIAL)
    at_val = {r["split"]: images_of(r) for r in per_image}.get("val")
    own: dict[str, list[dict[str, Any]]] = {}
    choices = []
    for t in trials:
        own[t["trial"]], images = split_per_image(val_rows[t["trial"]], t["trial"])
        per_image += images
        val = [r for r in baseline + own[t["trial"]] if r["split"] == "val"]
        measured = [r for r in val if r.get("robust_acc") is not None]  # PGD ran (the search)
        val_images = {float(r["alpha"]): images_of(r) for r in images if r["robust_bits"]}
        if at_val is not None:
            val_images[0.0] = at_val
        choices.append(alpha_choice(t["trial"], sorted(measured, key=lambda r: r["alpha"]),
                                    cfg.interpolate.tolerance, cfg.interpolate.rule, val_images))  # fmt: skip
    best = best_trial(choices, finalists)
    plan = plan_on_test(cfg, choices, best)
    for trial, rows in points_on_test(pts, plan, refs, cdata, best, strip).items():
        plain, images = split_per_image(rows, trial)
        own[trial] += plain
        per_image += images
    table: list[dict[str, Any]] = []
    source = cfg.eval.corruption_source  # "generated": a fallback, labelled wherever it is shown
    for t in trials:
        rows = [dict(row) for row in baseline] + own[t["trial"]]
        for row in rows:
            row.update(trial=t["trial"], modules="+".join(t["modules"]), lr=t["lr"])
            row["corruption_source"] = source if row.get("corruption_acc") is not None else None
            row["selected"] = (
                best is not None and row["trial"] == best["trial"] and row["alpha"] == best["alpha"]
            )
        table += sorted((r for r in rows if r["split"] != "confirm"),
                        key=lambda r: (r["split"], r["alpha"]))  # fmt: skip
    out: dict[str, Any] = {"choices": choices, "best": best, "per_image": per_image,
                           "points": points_measured(own)}  # fmt: skip
    confirm_rows = [r for r in per_image if r["split"] == "confirm"]
    if best is not None and confirm_rows:
        out["confirmation"] = confirmation(confirm_rows, best, cfg.interpolate.tolerance)
    return table, out


def points_measured(own: dict[str, list[dict[str, Any]]]) -> dict[str, int]:
    """What stage 4 measured besides the AT model: alpha points with PGD and with clean
    accuracy only on validation, and alpha points on test (the compute it spent)."""
    rows = [r for trial in own.values() for r in trial]
    return {
        "val_pgd": sum(r["split"] == "val" and r.get("robust_acc") is not None for r in rows),
        "val_clean_only": sum(r["split"] == "val" and r.get("robust_acc") is None for r in rows),
        "test": sum(r["split"] == "test" for r in rows),
    }


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
        summary["interpolate_points"] = choice["points"]  # what stage 4 measured (its compute)
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
