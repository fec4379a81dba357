"""Stage 3: fine-tune the lowest-MRC module(s) on clean data, a Tune grid under ASHA.

Trials are (module set) x (learning rate), single-process Tune function trials.
After every epoch a trial measures what the user finally wants, cheaply: the
clean-accuracy gain of the *interpolated* model over the AT model at the best
alpha in ``finetune.metric_alphas`` whose PGD accuracy stays within
``interpolate.tolerance`` of the AT model, on ``finetune.metric_subset``
validation images (``val_gain``, 0 when no alpha qualifies). ASHA stops trials on ``val_score``,
the same quantity with infeasible alphas penalised instead of discarded (see
:func:`rift_ray.rift.finetune.asha_score`); each trial checkpoints its latest epoch (to resume) together with its
best epoch by the same metric (the state that goes on to interpolation).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from rift_ray.config import SweepConfig
from rift_ray.data import DatasetSplits, ImageData
from rift_ray.errors import StageFailed, one_line
from rift_ray.progress import TrialBoard, log
from rift_ray.rift import finetune, interpolate, select_alpha
from rift_ray.rift.finetune import asha_score
from rift_ray.stages.base import Stage, SweepContext, SweepState, failures
from rift_ray.stages.common import (
    cpu_state,
    device_name,
    evaluate_pgd,
    fault,
    fault_sleep,
    start_worker,
    worker_model,
)
from rift_ray.stages.selection import module_groups
from rift_ray.stages.tuning import LiveTrials, prune_checkpoints, run_tune
from rift_ray.store import (
    FINETUNE_EPOCHS_TABLE,
    FINETUNE_TABLE,
    experiment_name,
    finetune_checkpoint,
    trial_name,
)


def metric_subset(cfg: SweepConfig, splits: DatasetSplits) -> ImageData:
    n = min(cfg.finetune.metric_subset, len(splits.val))
    return splits.val.subset(torch.arange(n))


def _eval(
    cfg: SweepConfig, model: torch.nn.Module, data: ImageData, device: torch.device
) -> dict[str, float]:
    m = evaluate_pgd(cfg, model, data, device)
    return {"clean_acc": m["clean_acc"], "robust_acc": m["robust_acc"]}


@ray.remote
def _baseline_task(
    cfg_dict: dict[str, Any], spec: Any, splits: DatasetSplits, at_state: dict[str, torch.Tensor]
) -> dict[str, float]:
    """The AT model's clean and PGD accuracy on the metric subset (the alpha = 0 point)."""
    cfg, device, model = start_worker(cfg_dict, "finetune", spec, at_state)
    assert model is not None
    return _eval(cfg, model, metric_subset(cfg, splits), device)


def interpolated_gain(
    cfg: SweepConfig,
    eval_model: torch.nn.Module,
    at_state: dict[str, torch.Tensor],
    ft_state: dict[str, torch.Tensor],
    data: ImageData,
    baseline: dict[str, float],
    device: torch.device,
) -> dict[str, float]:
    """val_gain (the paper's rule), val_score (the ASHA metric), the alpha and the points measured."""
    rows = [{"alpha": 0.0, **baseline}]
    for a in cfg.finetune.metric_alphas:
        eval_model.load_state_dict(interpolate(at_state, ft_state, a))
        rows.append({"alpha": a, **_eval(cfg, eval_model, data, device)})
    choice = select_alpha(rows, tolerance=cfg.interpolate.tolerance)
    out = {
        "val_gain": float(choice.clean_gain or 0.0),
        "val_alpha": float(choice.alpha or 0.0),
        "val_score": asha_score(rows, cfg.interpolate.tolerance, cfg.finetune.metric_penalty),
    }
    for r in rows[1:]:
        out[f"val_clean_acc@{r['alpha']:g}"] = r["clean_acc"]
        out[f"val_robust_acc@{r['alpha']:g}"] = r["robust_acc"]
    return out


def state_delta(
    state: dict[str, torch.Tensor] | None, base: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The entries of ``state`` that differ from ``base`` (fine-tuning changes a few modules)."""
    if state is None:
        return None
    return {
        k: v
        for k, v in state.items()
        if k not in base or v.shape != base[k].shape or not torch.equal(v, base[k])
    }


def load_trial_state(ckpt: Any, at_state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A fine-tuning trial checkpoint with whole state dicts (older sweeps stored them whole)."""
    with ckpt.as_directory() as d:
        saved = torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)
    if "model_delta" in saved:
        saved["model"] = {**at_state, **saved.pop("model_delta")}
    best = saved["best"]
    if "state_delta" in best:
        delta = best.pop("state_delta")
        best["state"] = None if delta is None else {**at_state, **delta}
    return dict(saved)


@dataclass
class TrialProgress:
    """What a fine-tuning trial carries from epoch to epoch, and what its checkpoint holds.

    Checkpoints store only what fine-tuning changed from the AT model (:func:`state_delta`):
    the latest epoch's model, to resume, and the best epoch's (by ``val_score``), which goes on
    to interpolation.
    """

    at_state: dict[str, torch.Tensor]
    epoch: int = 0
    optimizer: Any = None
    best: dict[str, Any] = field(
        default_factory=lambda: {"val_score": float("-inf"), "epoch": 0, "state": None}
    )
    history: list[dict[str, Any]] = field(default_factory=list)
    best_delta: dict[str, torch.Tensor] | None = None

    @classmethod
    def resume(
        cls, ckpt: Any, at_state: dict[str, torch.Tensor]
    ) -> tuple[TrialProgress, dict[str, torch.Tensor] | None]:
        """The progress saved in Tune's checkpoint (a fresh one without), and its model state."""
        if ckpt is None:
            return cls(at_state), None
        saved = load_trial_state(ckpt, at_state)
        progress = cls(
            at_state, saved["epoch"], saved["optimizer"], saved["best"], saved["history"]
        )
        progress.best_delta = state_delta(progress.best["state"], at_state)
        return progress, saved["model"]

    def add_epoch(
        self, row: dict[str, Any], state: dict[str, torch.Tensor], extra: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Record one finished epoch (``row`` from :func:`rift_ray.rift.finetune`, the model's
        ``state`` after it): (the metrics Tune gets, the checkpoint's content)."""
        self.optimizer = row.pop("optimizer_state", None)
        delta = state_delta(state, self.at_state)
        if row["val_score"] > self.best["val_score"]:
            keys = ("val_score", "val_gain", "val_alpha", "epoch")
            self.best = {**{k: row[k] for k in keys}, "state": state}
            self.best_delta = delta
        metrics = {
            **row,
            **extra["trial"],
            "best_val_score": self.best["val_score"],
            "best_val_gain": self.best["val_gain"],
            "best_epoch": self.best["epoch"],
            **extra["worker"],
            "status": "running",
        }
        self.history.append(
            {k: v for k, v in metrics.items() if k not in ("run_token", "status", "error")}
        )
        self.epoch = row["epoch"]
        best = {k: v for k, v in self.best.items() if k != "state"}
        saved = {
            "model_delta": delta,
            "optimizer": self.optimizer,
            "epoch": self.epoch,
            "best": {**best, "state_delta": self.best_delta},
            "history": self.history,
        }
        return metrics, saved


def finetune_trial(
    config: dict[str, Any],
    cfg_dict: dict[str, Any] | None = None,
    spec: Any = None,
    splits: DatasetSplits | None = None,
    at_state: dict[str, torch.Tensor] | None = None,
    baseline: dict[str, float] | None = None,
    run_token: str = "",
) -> None:
    """Tune function trial: fine-tune ``config["modules"]`` with ``config["lr"]``, report every
    epoch with a checkpoint. Any error, a GPU Ray gave but torch cannot use included, is
    reported as a failed trial row (the sweep goes on without it)."""
    assert (
        cfg_dict is not None
        and splits is not None
        and at_state is not None
        and baseline is not None
    )
    modules, lr = list(config["modules"]), float(config["lr"])
    trial = trial_name(modules, lr)
    ident = {"trial": trial, "modules": "+".join(modules), "lr": lr}
    t0 = time.time()
    try:
        cfg, device, model = start_worker(cfg_dict, "finetune", spec, at_state)
        assert model is not None
        eval_model = worker_model(cfg, spec).to(device)
        at_dev = {k: v.to(device) for k, v in at_state.items()}
        data = metric_subset(cfg, splits)
        progress, resumed = TrialProgress.resume(tune.get_checkpoint(), at_state)
        if resumed is not None:  # an interrupted trial goes on from its last epoch
            model.load_state_dict(resumed)

        def evaluate_fn(m: torch.nn.Module) -> dict[str, float]:
            return interpolated_gain(
                cfg, eval_model, at_dev, m.state_dict(), data, baseline, device
            )

        t0 = time.time()
        fault_sleep("finetune_sleep", lr=lr)
        if fault("finetune_raise", lr=lr):
            raise RuntimeError(f"injected fault (RIFT_RAY_FAULTS) in fine-tuning trial {trial}")
        f = cfg.finetune
        rows = finetune(
            model, modules, splits.train, epochs=f.epochs, lr=lr, momentum=f.momentum,
            weight_decay=f.weight_decay, lr_milestones=f.lr_milestones, lr_gamma=f.lr_gamma,
            batch_size=f.batch_size, augment=cfg.data.augment, seed=cfg.seed, device=device,
            evaluate_fn=evaluate_fn, start_epoch=progress.epoch,
            optimizer_state=progress.optimizer, with_optimizer_state=True, amp=cfg.compute.amp,
        )  # fmt: skip
        extra = {"trial": ident, "worker": {"device": device_name(device), "run_token": run_token}}
        for row in rows:
            if fault("finetune_nan", lr=lr):
                row["train_loss"] = float("nan")
            if not torch.isfinite(torch.tensor(row["train_loss"])):
                raise FloatingPointError(
                    f"fine-tuning loss is {row['train_loss']} at epoch {row['epoch']}"
                )
            metrics, saved = progress.add_epoch(row, cpu_state(model), extra)
            with tempfile.TemporaryDirectory() as d:
                torch.save(saved, os.path.join(d, "state.pt"))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
    except Exception as e:  # noqa: BLE001 - reported as a failed trial row, the sweep goes on
        failed = {**ident, "status": "failed", "run_token": run_token}
        tune.report({**failed, "error": one_line(e, typed=True),
                     "traceback": traceback.format_exc()[-2000:],
                     "val_score": float("-inf"), "seconds": time.time() - t0})  # fmt: skip


def finetune_baseline(ctx: SweepContext, at_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """The AT model on the ASHA metric's subset (one Ray task): every trial's alpha = 0 point."""
    r = ctx.cfg.resources.finetune
    return ray.get(
        _baseline_task.options(num_cpus=r.cpu, num_gpus=r.gpu).remote(
            ctx.cfg.to_dict(), ctx.spec, ctx.splits_ref, at_state
        )
    )


def run_finetune(
    ctx: SweepContext,
    at_state: dict[str, torch.Tensor],
    groups: list[list[str]],
    experiment: str,
    baseline: dict[str, float],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], int]:
    """Run the ASHA grid of ``groups`` x ``finetune.lrs`` as the Tune experiment ``experiment``;
    return (trial rows, epoch rows, surviving trials with best states, trials computed now).

    ``baseline``: :func:`finetune_baseline` (the same for every strategy, so measured once)."""
    cfg, run_token = ctx.cfg, ctx.run_token
    f = cfg.finetune
    trainable = tune.with_parameters(
        finetune_trial,
        cfg_dict=cfg.to_dict(),
        spec=ctx.spec,
        splits=ctx.splits_ref,
        at_state=at_state,
        baseline=baseline,
        run_token=run_token,
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=f.epochs,
        grace_period=min(f.asha.grace_period, f.epochs),
        reduction_factor=f.asha.reduction_factor,
    )
    board = TrialBoard("finetune", len(groups) * len(f.lrs), "val_score")
    live = LiveTrials(experiment, board, lambda c: trial_name(c["modules"], c["lr"]), "val_score",
                      on_result=_trial_result(ctx), on_end=_trial_end(ctx))  # fmt: skip
    with board:
        results = _fit(trainable, groups, f, experiment, ctx, scheduler, live)
    trial_rows, epoch_rows, survivors, computed = [], [], [], 0
    for res in results:
        row, history, survivor = trial_result(res, at_state, cfg.finetune.epochs)
        trial_rows.append(row)
        epoch_rows += history
        survivors += [survivor] if survivor else []
        computed += (res.metrics or {}).get("run_token") == run_token
    try:
        prune_checkpoints(results)
    except OSError as e:  # disk space only: the stage's result stands
        print(
            f"[rift-ray] warning: pruning old fine-tuning checkpoints failed: {e}", file=sys.stderr
        )
    sort_trials(trial_rows, survivors)
    return trial_rows, epoch_rows, survivors, computed


def _trial_result(ctx: SweepContext) -> Any:
    """Each epoch a fine-tuning trial reports goes to its W&B run as Tune receives it."""

    def on_result(config: dict[str, Any], result: dict[str, Any]) -> None:
        ctx.tracker.trial_epoch(result)

    return on_result


def _trial_end(ctx: SweepContext) -> Any:
    """A trial's end: finished (every epoch), stopped (ASHA's decision) or failed."""

    def on_end(config: dict[str, Any], last: dict[str, Any], how: str) -> str:
        if how == "error" or last.get("status") == "failed":
            status = "failed"
        elif int(last.get("epoch") or 0) >= ctx.cfg.finetune.epochs:
            status = "finished"
        else:
            status = "stopped"
        name = trial_name(list(config.get("modules", [])), float(config.get("lr", 0.0)))
        ctx.tracker.trial_end({"trial": name, **last}, status)
        return status

    return on_end


def _fit(
    trainable: Any, groups: list[list[str]], f: Any, experiment: str, ctx: SweepContext,
    scheduler: Any, live: LiveTrials,
) -> Any:  # fmt: skip
    """The Tune grid of ``groups`` x ``f.lrs`` under ``scheduler``."""
    r = ctx.cfg.resources.finetune
    return run_tune(
        trainable,
        {"modules": tune.grid_search(groups), "lr": tune.grid_search(list(f.lrs))},
        store=ctx.store,
        name=experiment,
        resources={"cpu": r.cpu, "gpu": r.gpu},
        max_concurrent=ctx.cfg.resources.max_concurrent_trials,
        metric="val_score",
        mode="max",
        scheduler=scheduler,
        # Every epoch's checkpoint is kept while the grid runs: with num_to_keep, Tune deletes
        # the previous one as soon as the next is registered, and a driver killed before its
        # next experiment snapshot leaves a snapshot naming the deleted one, which no restore
        # gets past. Checkpoints hold only what fine-tuning changed (state_delta), and all but
        # each trial's last are pruned once the grid is done.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        callbacks=[live],
    )


def trial_result(
    res: Any, at_state: dict[str, torch.Tensor], epochs: int
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """One Tune result of :func:`finetune_trial`: (its row in the trial table, its epoch rows,
    the survivor that goes on to interpolation: a trial that ran every epoch, with its best
    state; None for a failed or stopped one)."""
    conf = res.config or {}
    modules, lr = list(conf.get("modules", [])), float(conf.get("lr", 0.0))
    met = dict(res.metrics or {})
    name = trial_name(modules, lr)
    saved = load_trial_state(res.checkpoint, at_state) if res.checkpoint else None
    history = list(saved["history"]) if saved else []
    failed = met.get("status") == "failed" or res.error is not None
    best = (
        saved["best"] if saved else {"val_score": None, "val_gain": None, "epoch": 0, "state": None}
    )
    finished = not failed and len(history) >= epochs
    row = {
        "trial": name,
        "modules": "+".join(modules),
        "lr": lr,
        "epochs": len(history),
        "status": "failed" if failed else ("finished" if finished else "stopped"),
        "best_epoch": best["epoch"],
        "best_val_score": best["val_score"],
        "best_val_gain": best["val_gain"],
        "best_val_alpha": best.get("val_alpha"),
        "last_val_score": history[-1]["val_score"] if history else None,
        "seconds": sum(h.get("seconds", 0.0) for h in history),
        "device": history[-1].get("device") if history else None,
        "error": met.get("error") or (one_line(res.error, typed=True) if res.error else ""),
    }
    survivor = None
    if finished and best["state"] is not None:
        survivor = {"trial": name, "modules": modules, "lr": lr, "state": best["state"]}
    return row, [dict(h) for h in history], survivor


def sort_trials(trial_rows: list[dict[str, Any]], survivors: list[dict[str, Any]]) -> None:
    """Trial rows best ASHA score first (failed trials last); survivors by name."""
    survivors.sort(key=lambda t: t["trial"])
    trial_rows.sort(
        key=lambda t: -(t["best_val_score"] if t["best_val_score"] is not None else float("-inf"))
    )


def finetune_strategies(
    ctx: SweepContext, at_state: dict[str, torch.Tensor], by_strategy: dict[str, list[list[str]]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], int]:
    """:func:`run_finetune` once per strategy, each its own Tune experiment under its own
    ASHA, the primary strategy first (experiment ``finetune-<hash>``, as a sweep without
    other strategies names it; the others ``finetune-<hash>-<strategy>``).

    Why not one grid: ASHA stops a trial by comparing it with the other trials at the same
    epoch, so in one grid the comparison strategies' trials would change which of the
    primary's trials survive (the default result would depend on what else runs), and a
    strategy whose trials all rank low could lose every trial (no comparison row). A set
    two strategies share is fine-tuned once, in the experiment of the first of them.
    Returns what ``run_finetune`` does, over all experiments.
    """
    cfg = ctx.cfg
    primary = cfg.finetune.primary
    order = [primary, *[s for s in by_strategy if s != primary]]
    trial_rows: list[dict[str, Any]] = []
    epoch_rows: list[dict[str, Any]] = []
    survivors: list[dict[str, Any]] = []
    computed, seen = 0, set()
    baseline = None  # the same for every strategy: measured once
    for strategy in order:
        groups = [g for g in by_strategy.get(strategy, []) if frozenset(g) not in seen]
        seen |= {frozenset(g) for g in groups}
        if not groups:
            continue
        if len(by_strategy) > 1:
            log(
                f"stage 3/4 finetune: strategy {strategy}: {len(groups)} module set(s) x "
                f"{len(cfg.finetune.lrs)} lr(s) under its own ASHA"
            )
        name = experiment_name(
            "finetune", ctx.hashes["finetune"], None if strategy == primary else strategy
        )
        if baseline is None:
            baseline = finetune_baseline(ctx, at_state)
        t, e, s, c = run_finetune(ctx, at_state, groups, name, baseline)
        trial_rows += t
        epoch_rows += e
        survivors += s
        computed += c
    sort_trials(trial_rows, survivors)
    return trial_rows, epoch_rows, survivors, computed


class FinetuneStage(Stage):
    """Stage 3: the module sets of every strategy, fine-tuned over ``finetune.lrs`` under ASHA;
    the best epoch of every trial that ran to the end goes on to interpolation."""

    name = "finetune"
    reuses = FINETUNE_TABLE

    def load(self, ctx: SweepContext, st: SweepState) -> None:
        record = ctx.store.read_stage(self.name) or {}
        st.ft_rows = ctx.store.get_table(FINETUNE_TABLE).to_pylist()
        st.survivors = [
            {
                **r,
                "modules": r["modules"].split("+"),
                "state": ctx.load_state(finetune_checkpoint(r["trial"])),
            }
            for r in st.ft_rows
            if r["trial"] in record["survivors"]
        ]
        st.by_strategy = record.get("strategies") or {
            "lowest": [m.split("+") for m in dict.fromkeys(r["modules"] for r in st.ft_rows)]
        }  # a record from before finetune.strategies: every set was `lowest`

    def compute(self, ctx: SweepContext, st: SweepState) -> dict[str, Any]:
        cfg, store, h = ctx.cfg, ctx.store, ctx.hashes[self.name]
        st.by_strategy, groups = module_groups(ctx, st.at_state, st.mrc_rows)
        self.say(
            f"{len(groups)} module set(s) x {len(cfg.finetune.lrs)} lr(s) under ASHA"
            + (f" (strategies: {', '.join(st.by_strategy)})" if len(st.by_strategy) > 1 else "")
        )
        st.ft_rows, st.epoch_rows, st.survivors, computed = finetune_strategies(
            ctx, st.at_state, st.by_strategy
        )
        failed = failures(st.ft_rows, "trial")
        if failed:
            self.say(f"{len(failed)} trial(s) failed and are left out: " + "; ".join(failed))
        if not st.survivors:
            store.put_table(FINETUNE_TABLE, st.ft_rows, stage_hash=h)
            first = f" (first: {failed[0]})" if failed else ""
            raise StageFailed(
                f"fine-tuning produced no usable trial{first}; see tables/finetune.parquet",
                error="no fine-tuning trial finished",
            )
        for s in st.survivors:
            store.put(
                finetune_checkpoint(s["trial"]),
                ctx.checkpoint_bytes(s["state"], trial=s["trial"]),
                stage_hash=h,
            )
        store.put_table(FINETUNE_EPOCHS_TABLE, st.epoch_rows, stage_hash=h)
        store.put_table(FINETUNE_TABLE, st.ft_rows, stage_hash=h)
        return {
            "computed": computed,
            "survivors": [s["trial"] for s in st.survivors],
            "strategies": st.by_strategy,
        }

    def track(self, ctx: SweepContext, st: SweepState) -> None:
        ctx.tracker.log_finetune(st.ft_rows, st.epoch_rows)
