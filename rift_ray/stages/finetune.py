"""Stage 3: fine-tune the lowest-MRC module(s) on clean data, a Tune grid under ASHA.

Trials are (module set) x (learning rate), single-process Tune function trials
(:mod:`rift_ray.stages.ft_trial`). After every epoch a trial measures what the user finally
wants, cheaply: the clean-accuracy gain of the *interpolated* model over the AT model at the
best alpha in ``finetune.metric_alphas`` whose PGD accuracy stays within
``interpolate.tolerance`` of the AT model, on ``finetune.metric_subset`` validation images
(``val_gain``, 0 when no alpha qualifies). ASHA stops trials on ``val_score``
(:func:`rift_ray.rift.finetune.asha_score`): the rule's gain where some metric alpha is
feasible (it may be negative), and only for a trial with no feasible alpha a penalised score
that ranks it below all of those; each trial checkpoints its latest epoch (to
resume) together with its best epoch by the same metric (the state that goes on to
interpolation). ``--retry-failed`` reruns failed trials alone, each judged at ASHA's rungs
against the scores the other trials recorded there (:class:`RungStopper`).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from ray import tune

from rift_ray.errors import StageFailed, one_line
from rift_ray.progress import TrialBoard, log
from rift_ray.rift.asha import continues, milestones, rung_decisions
from rift_ray.rift.selection import strategy_lrs
from rift_ray.stages.base import Stage, SweepContext, SweepState, failures
from rift_ray.stages.ft_trial import finetune_baseline, finetune_trial, load_trial_state
from rift_ray.stages.rungs import RecordedASHA, SyncHalving
from rift_ray.stages.selection import module_groups
from rift_ray.stages.tuning import LiveTrials, prune_checkpoints, run_tune
from rift_ray.store import (
    FINETUNE_EPOCHS_TABLE,
    FINETUNE_TABLE,
    experiment_name,
    finetune_checkpoint,
    trial_name,
)


class RungStopper(tune.Stopper):
    """``--retry-failed`` for fine-tuning trials: ``trials`` (module set, lr) rerun without a
    scheduler; at each of ASHA's rungs a trial stops where the sweep's scheduler would have
    stopped it, judged against ``recorded``: trial name -> {rung epoch: {the other trials of
    its experiment: the val_score each recorded there}}. ``sync``: ranked with them
    (:func:`rift_ray.rift.asha.rung_decisions`); ``async``: as Tune's ASHA judges a trial
    that reports last (:func:`rift_ray.rift.asha.continues`)."""

    def __init__(
        self,
        trials: list[tuple[list[str], float]],
        recorded: dict[str, dict[int, dict[str, float]]],
        reduction_factor: float,
        mode: str = "sync",
    ) -> None:
        self.trials, self.recorded, self.rf, self.mode = trials, recorded, reduction_factor, mode

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        name = str(result.get("trial"))
        others = self.recorded.get(name, {}).get(int(result.get("epoch") or 0))
        if others is None or result.get("status") == "failed":
            return False
        score = float(result.get("val_score", float("-inf")))
        if self.mode == "sync":
            return not rung_decisions({**others, name: score}, self.rf)[name]
        return not continues(score, others.values(), self.rf)

    def stop_all(self) -> bool:
        return False

    @classmethod
    def for_trials(
        cls, failed: list[dict[str, Any]], st: SweepState, f: Any, primary: str
    ) -> RungStopper:
        """The stopper of the ``failed`` trial rows of stage result ``st``: each one's rungs
        hold the scores of the other trials of its experiment (its strategy's, as
        :func:`finetune_strategies` assigned the module sets)."""
        experiment_of: dict[str, str] = {}
        for strategy in [primary, *[s for s in st.by_strategy if s != primary]]:
            for g in st.by_strategy.get(strategy, []):
                experiment_of.setdefault("+".join(g), strategy)
        rungs = milestones(f.asha.grace_period, f.asha.reduction_factor, f.epochs)
        retried = {r["trial"] for r in failed}
        recorded: dict[str, dict[int, dict[str, float]]] = {}
        for r in failed:
            mine = experiment_of.get(r["modules"])
            peers = {t["trial"] for t in st.ft_rows
                     if t["trial"] not in retried and experiment_of.get(t["modules"]) == mine}  # fmt: skip
            recorded[r["trial"]] = {
                m: {e["trial"]: e["val_score"] for e in st.epoch_rows
                    if e.get("trial") in peers and e.get("epoch") == m and e.get("val_score") is not None}
                for m in rungs
            }  # fmt: skip
        trials = [(r["modules"].split("+"), float(r["lr"])) for r in failed]
        return cls(trials, recorded, f.asha.reduction_factor, f.asha.mode)


def run_finetune(
    ctx: SweepContext,
    at_state: dict[str, torch.Tensor],
    groups: list[list[str]],
    experiment: str,
    baseline: dict[str, float],
    retry: RungStopper | None = None,
    lrs: list[float] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], int]:
    """Run the ASHA grid of ``groups`` x ``lrs`` (default ``finetune.lrs``) as the Tune
    experiment ``experiment``; return (trial rows, epoch rows, surviving trials with best
    states, trials computed now).

    ``baseline``: :func:`finetune_baseline` (the same for every strategy, so measured once).
    ``retry``: rerun exactly ``retry.trials`` (module set, lr) instead, without a scheduler,
    each stopped at a rung where ``retry`` says ASHA would have stopped it."""
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
    scheduler = rung_scheduler(ctx, experiment)
    lrs = list(f.lrs) if lrs is None else lrs
    n = len(retry.trials) if retry else len(groups) * len(lrs)
    board = TrialBoard("finetune", n, "val_score")
    live = LiveTrials(experiment, board, lambda c: trial_name(c["modules"], c["lr"]), "val_score",
                      on_result=_trial_result(ctx), on_end=_trial_end(ctx))  # fmt: skip
    with board:
        results = _fit(trainable, groups, lrs, experiment, ctx, scheduler, live, retry)
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


def rung_scheduler(ctx: SweepContext, experiment: str) -> SyncHalving | RecordedASHA:
    """The scheduler of ``finetune.asha.mode`` at ASHA's rungs, recording its decisions in
    ``tables/finetune_rungs.parquet`` (:mod:`rift_ray.stages.rungs`)."""
    f = ctx.cfg.finetune
    rungs = milestones(f.asha.grace_period, f.asha.reduction_factor, f.epochs)
    if f.asha.mode == "sync":
        limit = ctx.cfg.resources.max_concurrent_trials
        return SyncHalving(ctx.store, experiment, rungs, f.asha.reduction_factor, limit)
    return RecordedASHA(
        ctx.store, experiment, rungs, time_attr="training_iteration", max_t=f.epochs,
        grace_period=min(f.asha.grace_period, f.epochs), reduction_factor=f.asha.reduction_factor,
    )  # fmt: skip


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
    trainable: Any, groups: list[list[str]], lrs: list[float], experiment: str,
    ctx: SweepContext, scheduler: Any, live: LiveTrials, retry: RungStopper | None = None,
) -> Any:  # fmt: skip
    """The Tune grid of ``groups`` x ``lrs`` under ``scheduler`` (``retry``: its trials,
    under its rung rule)."""
    r = ctx.cfg.resources.finetune
    space = {"modules": tune.grid_search(groups), "lr": tune.grid_search(lrs)}
    if retry is not None:  # given (modules, lr) pairs, not a product
        pairs = [(list(m), lr) for m, lr in retry.trials]
        space = {
            "retry": tune.grid_search(list(range(len(pairs)))),
            "modules": tune.sample_from(lambda spec: pairs[spec["config"]["retry"]][0]),
            "lr": tune.sample_from(lambda spec: pairs[spec["config"]["retry"]][1]),
        }
    return run_tune(
        trainable,
        space,
        store=ctx.store,
        name=experiment,
        resources={"cpu": r.cpu, "gpu": r.gpu},
        # sync halving limits concurrency itself (Tune's limit counts paused trials)
        max_concurrent=None
        if isinstance(scheduler, SyncHalving) and not retry
        else ctx.cfg.resources.max_concurrent_trials,
        metric="val_score",
        mode="max",
        scheduler=None if retry else scheduler,
        stop=retry,
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
        lrs = strategy_lrs(strategy, cfg.finetune.lrs)
        if len(by_strategy) > 1:
            what = "lr 0: no weight trains" if lrs == [0.0] else f"{len(lrs)} lr(s)"
            log(
                f"stage 3/4 finetune: strategy {strategy}: {len(groups)} module set(s) x "
                f"{what} under its own ASHA"
            )
        name = experiment_name(
            "finetune", ctx.hashes["finetune"], None if strategy == primary else strategy
        )
        if baseline is None:
            baseline = finetune_baseline(ctx, at_state)
        t, e, s, c = run_finetune(ctx, at_state, groups, name, baseline, lrs=lrs)
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
        cfg = ctx.cfg
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
        self._store(ctx, st, st.survivors)
        if not st.survivors:
            first = f" (first: {failed[0]})" if failed else ""
            raise StageFailed(
                f"fine-tuning produced no usable trial{first}; see tables/finetune.parquet",
                error="no fine-tuning trial finished", strategies=st.by_strategy,
            )  # fmt: skip
        return {
            "computed": computed,
            "survivors": [s["trial"] for s in st.survivors],
            "strategies": st.by_strategy,
        }

    def _store(self, ctx: SweepContext, st: SweepState, new: list[dict[str, Any]]) -> None:
        """The tables (atomic writes; also of a stage without survivors, to retry from) and
        the checkpoints of the survivors ``new``."""
        h = ctx.hashes[self.name]
        for s in new:
            ctx.store.put(
                finetune_checkpoint(s["trial"]),
                ctx.checkpoint_bytes(s["state"], trial=s["trial"]),
                stage_hash=h,
            )
        ctx.store.put_table(FINETUNE_EPOCHS_TABLE, st.epoch_rows, stage_hash=h)
        ctx.store.put_table(FINETUNE_TABLE, st.ft_rows, stage_hash=h)

    def load_failed(self, ctx: SweepContext, st: SweepState) -> bool:
        if not ctx.store.exists(FINETUNE_TABLE):
            return False
        st.ft_rows = ctx.store.get_table(FINETUNE_TABLE).to_pylist()
        st.survivors = []
        st.by_strategy = (ctx.store.read_stage(self.name) or {}).get("strategies") or {}
        return bool(st.by_strategy)

    def retry(self, ctx: SweepContext, st: SweepState) -> bool | None:
        """The failed trials again, alone, in ``finetune-<hash>-retry<n>`` (:class:`RungStopper`);
        merged into the stored tables. True when one of them survived (interpolation is
        then recomputed with it)."""
        store, h, f = ctx.store, ctx.hashes[self.name], ctx.cfg.finetune
        failed = [r for r in st.ft_rows if r["status"] == "failed"]
        if not failed:
            self.say("--retry-failed: no failed trial")
            return None
        if store.exists(FINETUNE_EPOCHS_TABLE):
            st.epoch_rows = store.get_table(FINETUNE_EPOCHS_TABLE).to_pylist()
        rec = store.read_stage(self.name) or {}
        retries = list(rec.get("retries") or [])
        names = [r["trial"] for r in failed]
        self.say(f"--retry-failed: {len(failed)} failed trial(s) again, alone: {', '.join(names)}")
        ctx.tracker.forget(names=[f"ft-{t}" for t in names])
        stopper = RungStopper.for_trials(failed, st, f, f.primary)
        experiment = experiment_name("finetune", h, retry=len(retries) + 1)
        rows, epochs, new, computed = run_finetune(
            ctx, st.at_state, [], experiment, finetune_baseline(ctx, st.at_state), retry=stopper
        )
        by_trial = {r["trial"]: r for r in rows}
        st.ft_rows = [by_trial.get(r["trial"], r) for r in st.ft_rows]
        st.epoch_rows = [e for e in st.epoch_rows if e.get("trial") not in by_trial] + epochs
        st.survivors += new
        sort_trials(st.ft_rows, st.survivors)
        self._store(ctx, st, new)
        still = failures(st.ft_rows, "trial")
        retries.append({"trials": names, "survivors": [s["trial"] for s in new],
                        "computed": computed, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})  # fmt: skip
        done = {"status": "done", "error": None} if st.survivors else {}
        store.write_stage(self.name, survivors=[s["trial"] for s in st.survivors],
                          retries=retries, **done)  # fmt: skip
        outcome = ", ".join(f"{r['trial']} {r['status']}" for r in rows)
        self.say(
            f"--retry-failed: {outcome}" + (f"; still failed: {'; '.join(still)}" if still else "")
        )
        self.track(ctx, st)
        return bool(new)

    def track(self, ctx: SweepContext, st: SweepState) -> None:
        ctx.tracker.log_finetune(st.ft_rows, st.epoch_rows)
