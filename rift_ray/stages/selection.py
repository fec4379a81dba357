"""Which module sets stage 3 fine-tunes, on Ray: one entry per ``finetune.strategies`` item.

What each strategy means is :mod:`rift_ray.rift.selection`. This file runs the one that
needs Ray, ``greedy``: a set grown by joint MRC, one step at a
time, the candidates of a step scored in parallel as Ray tasks
(:func:`rift_ray.rift.greedy_joint_selection`, :func:`rift_ray.rift.robust_criticality`,
on the same fixed adversarial set as stage 2). Every scored set is a row of
``tables/joint_mrc.parquet``, written after each step under a hash of the MRC stage and
``finetune.greedy``: a re-run reuses the sets already scored and continues with the rest.

After interpolation :func:`compare_strategies` gives, per strategy, its best trial by the
paper's rule on validation, with validation and test accuracy: the comparison table.
"""

from __future__ import annotations

import math
import time
from typing import Any

import ray
import torch

from rift_ray.errors import one_line
from rift_ray.hashing import joint_mrc_hash
from rift_ray.progress import log
from rift_ray.rift import (
    ScoredSet,
    greedy_joint_selection,
    robust_criticality,
)
from rift_ray.rift.interpolate import best_trial
from rift_ray.rift.selection import SelectionInput, strategy_lrs, strategy_sets
from rift_ray.stages.base import SweepContext
from rift_ray.stages.common import device_name, start_worker
from rift_ray.stages.mrc import build_adversarial_set, mrc_options
from rift_ray.store import JOINT_MRC_TABLE, trial_name

JOINT_COLUMNS = [
    "step", "modules", "added", "size", "mrc", "chosen", "loss_before", "loss_after",
    "acc_before", "acc_after", "robust_acc_drop", "best_epoch", "num_params", "seconds",
    "status", "error", "node", "device",
]  # fmt: skip


@ray.remote
def _joint_mrc_task(
    cfg_dict: dict[str, Any],
    spec: Any,
    at_state: dict[str, torch.Tensor],
    adv: tuple[torch.Tensor, torch.Tensor],
    modules: list[str],
) -> dict[str, Any]:
    """Joint MRC of one module set; a failure is a row with its error, not a dead sweep."""
    t0 = time.time()
    row: dict[str, Any]
    device = None
    try:
        cfg, device, model = start_worker(cfg_dict, "mrc", spec, at_state, compute=False)
        assert model is not None
        res = robust_criticality(model, modules, adv[0], adv[1], mrc_options(cfg), device=device)
        if not math.isfinite(res.mrc):
            raise FloatingPointError(f"joint MRC of {'+'.join(modules)} is not finite ({res.mrc})")
        row = {
            "mrc": res.mrc,
            "loss_before": res.loss_before,
            "loss_after": res.loss_after,
            "acc_before": res.acc_before,
            "acc_after": res.acc_after,
            "robust_acc_drop": res.acc_drop,
            "best_epoch": res.best_epoch,
            "num_params": res.num_params,
            "status": "done",
            "error": "",
        }
    except Exception as e:  # noqa: BLE001 - a failed set is a row in the table
        row = {"status": "failed", "error": one_line(e, typed=True)}
    row["seconds"] = time.time() - t0
    row["node"] = ray.get_runtime_context().get_node_id()[:12]
    row["device"] = device_name(device) if device is not None else None
    return row


def run_greedy(
    ctx: SweepContext, at_state: dict[str, torch.Tensor], mrc_rows: list[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]], int]:
    """The greedy set; return (its modules, the joint-MRC table rows, sets scored now)."""
    cfg, store, splits_ref, spec, mrc_hash = (
        ctx.cfg,
        ctx.store,
        ctx.splits_ref,
        ctx.spec,
        ctx.hashes["mrc"],
    )
    g, r = cfg.finetune.greedy, cfg.resources.mrc
    done = [row for row in mrc_rows if row["status"] == "done"]
    ranked = [row["module"] for row in done]
    h = joint_mrc_hash(cfg, mrc_hash)
    cache: dict[str, dict[str, Any]] = {}
    if store.valid(JOINT_MRC_TABLE, h):  # sets scored by an earlier (maybe interrupted) run
        cache = {row["modules"]: row for row in store.get_table(JOINT_MRC_TABLE).to_pylist()}
    first = done[0]
    cache["+".join(ranked[:1])] = {**{c: first.get(c) for c in JOINT_COLUMNS}, "error": ""}
    state: dict[str, Any] = {"adv": None, "at": None, "computed": 0, "records": []}

    def score(sets: list[tuple[str, ...]]) -> list[float | None]:
        todo = {"+".join(s): s for s in sets if "+".join(s) not in cache}
        if todo:
            if state["adv"] is None:
                adv = build_adversarial_set(cfg, store, splits_ref, at_state, mrc_hash)
                state["adv"], state["at"] = ray.put(adv), ray.put(at_state)
            pending = {
                _joint_mrc_task.options(num_cpus=r.cpu, num_gpus=r.gpu).remote(
                    cfg.to_dict(), spec, state["at"], state["adv"], list(s)
                ): key
                for key, s in todo.items()
            }
            step = len(sets[0])
            while pending:  # store each set as it finishes: a re-run keeps it
                ready, _ = ray.wait(list(pending), num_returns=1)
                cache[pending.pop(ready[0])] = ray.get(ready[0])
                state["computed"] += 1
                partial = [
                    ScoredSet(step, s, s[-1], None, False) for s in sets if "+".join(s) in cache
                ]
                save(state["records"] + partial)
        return [cache["+".join(s)].get("mrc") for s in sets]

    def rows_of(records: list[ScoredSet]) -> list[dict[str, Any]]:
        out = []
        for rec in records:
            key = "+".join(rec.modules)
            row = {c: cache.get(key, {}).get(c) for c in JOINT_COLUMNS}
            row.update(
                step=rec.step, modules=key, added=rec.added, size=len(rec.modules),
                chosen=rec.chosen, error=row["error"] or "",
            )  # fmt: skip
            out.append(row)
        return out

    def save(records: list[ScoredSet]) -> None:
        store.put_table(JOINT_MRC_TABLE, rows_of(records), stage_hash=h)

    def on_step(records: list[ScoredSet]) -> None:
        state["records"] = records
        save(records)

    chosen, records = greedy_joint_selection(
        ranked, g.size, g.candidates, score, first_mrc=first.get("mrc"), on_step=on_step
    )
    return list(chosen), rows_of(records), state["computed"]


def module_groups(
    ctx: SweepContext, at_state: dict[str, torch.Tensor], mrc_rows: list[dict[str, Any]]
) -> tuple[dict[str, list[list[str]]], list[list[str]]]:
    """(strategy -> its module sets, the distinct module sets to fine-tune, in order):
    :func:`rift_ray.rift.selection.strategy_sets`, the greedy strategy's joint MRC scored by
    Ray tasks (:func:`run_greedy`)."""
    f = ctx.cfg.finetune

    def greedy() -> list[str]:
        log(
            f"stage 3/4 finetune: greedy joint MRC selection of {f.greedy.size} modules "
            f"({f.greedy.candidates} candidates per step, Ray tasks)"
        )
        chosen, rows, computed = run_greedy(ctx, at_state, mrc_rows)
        kept = ", ".join(
            f"{r['modules']} {r['mrc']:.4g}" for r in rows if r["chosen"] and r["mrc"] is not None
        )
        failed = [f"{r['modules']} ({r['error']})" for r in rows if r["status"] == "failed"]
        log(
            f"stage 3/4 finetune: greedy set {'+'.join(chosen)} (joint MRC per step: {kept}; "
            f"{computed} set(s) scored now, {len(rows) - 1 - computed} reused)"
            + (f"; failed: {'; '.join(failed)}" if failed else "")
        )
        return chosen

    ranked = [row["module"] for row in mrc_rows if row["status"] == "done"]
    return strategy_sets(SelectionInput(ranked, ctx.modules, f, ctx.cfg.seed, greedy))


def compare_strategies(
    by_strategy: dict[str, list[list[str]]],
    primary: str,
    lrs: list[float],
    choices: list[dict[str, Any]],
    table: list[dict[str, Any]],
    set_mrc: dict[str, float | None],
) -> list[dict[str, Any]]:
    """One row per strategy: its best trial by the paper's rule on validation (largest
    feasible clean gain, ties to the smaller robust drop, then the trial name) and that
    trial's accuracy at its alpha* on val and test. ``set_mrc``: modules joined by ``+`` ->
    the set's (joint) MRC where one was measured."""
    by_trial = {c["trial"]: c for c in choices}
    rows = []
    for strategy, groups in by_strategy.items():
        names = {trial_name(g, lr): g for g in groups for lr in strategy_lrs(strategy, lrs)}
        best = best_trial(by_trial.values(), names)
        row: dict[str, Any] = {
            "strategy": strategy,
            "primary": strategy == primary,
            "module_sets": "; ".join("+".join(g) for g in groups),
            "modules": None, "set_mrc": None, "trial": None, "lr": None, "alpha": None,
            "clean_gain_val": None, "robust_drop_val": None,
            "trials": sum(t in names for t in by_trial),
        }  # fmt: skip
        for split in ("val", "test"):
            for k in ("clean_acc", "robust_acc", "corruption_acc"):
                row[f"{split}_{k}"] = None
        if best is not None:
            mods = names[best["trial"]]
            row.update(
                modules="+".join(mods), set_mrc=set_mrc.get("+".join(mods)), trial=best["trial"],
                lr=next(r["lr"] for r in table if r["trial"] == best["trial"]),
                alpha=best["alpha"], clean_gain_val=best["clean_gain"],
                robust_drop_val=best["robust_drop"],
            )  # fmt: skip
            for r in table:
                if r["trial"] == best["trial"] and r["alpha"] == best["alpha"]:
                    for k in ("clean_acc", "robust_acc", "corruption_acc"):
                        row[f"{r['split']}_{k}"] = r.get(k)
        rows.append(row)
    return rows


def strategy_table(
    ctx: SweepContext,
    by_strategy: dict[str, list[list[str]]],
    mrc_rows: list[dict[str, Any]],
    choice: dict[str, Any],
    table: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """:func:`compare_strategies` for a sweep: set MRCs from ``mrc.parquet`` and, when the
    greedy strategy ran, ``joint_mrc.parquet``."""
    cfg, store = ctx.cfg, ctx.store
    set_mrc: dict[str, float | None] = {
        r["module"]: r.get("mrc") for r in mrc_rows if r["status"] == "done"
    }
    h = joint_mrc_hash(cfg, ctx.hashes["mrc"])
    if "greedy" in by_strategy and store.valid(JOINT_MRC_TABLE, h):
        for r in store.get_table(JOINT_MRC_TABLE).to_pylist():
            if r["status"] == "done":
                set_mrc[r["modules"]] = r["mrc"]
    return compare_strategies(
        by_strategy, cfg.finetune.primary, list(cfg.finetune.lrs), choice["choices"], table, set_mrc
    )
