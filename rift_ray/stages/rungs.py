"""The fine-tuning grid's rung decisions, made once and kept as data.

    SyncHalving(store, "finetune-3f2a", rungs=[1, 2], reduction_factor=2)   # finetune.asha.mode: sync
    RecordedASHA(store, "finetune-3f2a", max_t=4, grace_period=1, reduction_factor=2)   # async

Both are Tune schedulers run by the driver, and both write every decision to
``tables/finetune_rungs.parquet`` (experiment, trial, rung, score, decision, and
``arrival``: the order in which the trials reported at that rung) as it is made.
A resumed sweep (``Tuner.restore`` brings back the scheduler as it was pickled, with no
rung state, ray-project/ray#30838) reads the table first and replays what it holds, so an
interrupted sweep makes the decisions of an uninterrupted one for the rungs already decided.

``sync`` is successive halving at ASHA's rungs (:func:`rift_ray.rift.asha.milestones`): a
trial reaching a rung pauses (Tune's PAUSE: it checkpoints and gives back its resources)
until every trial still in the grid has reported there; then the rung is decided at once
by :func:`rift_ray.rift.asha.rung_decisions` (best ``max(1, n // rf)`` by score, ties by
trial name), so the same scores always give the same decisions. ``async`` is Tune's
``ASHAScheduler``: each trial is judged against the trials that reported before it.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from rift_ray.rift.asha import rung_decisions
from rift_ray.store import FINETUNE_RUNGS_TABLE, Store, trial_name

KEPT, STOPPED, WAITING = "kept", "stopped", "waiting"


def _name(trial: Trial) -> str:
    conf = trial.config or {}
    return trial_name(list(conf.get("modules", [])), float(conf.get("lr", 0.0)))


def _score(result: dict[str, Any] | None) -> float:
    """A rung's score: ``val_score``; missing or NaN ranks last (as -inf)."""
    try:
        v = float((result or {}).get("val_score"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return -math.inf
    return -math.inf if math.isnan(v) else v


def _epoch(result: dict[str, Any] | None) -> int:
    r = result or {}
    return int(r.get("epoch") or r.get("training_iteration") or 0)


class RungLog:
    """The rows of ``tables/finetune_rungs.parquet`` of one Tune experiment: the table is read
    once, then each change written through (the other experiments' rows kept as read: one
    driver writes the sweep, one experiment at a time). Pickled without the rows (Tune keeps
    the scheduler in its experiment), so a restored copy reads the table again."""

    def __init__(self, store: Store, experiment: str) -> None:
        self.store, self.experiment = store, experiment
        self.rows: dict[tuple[str, int], dict[str, Any]] | None = None
        self.others: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store, "experiment": self.experiment, "rows": None, "others": []}

    def load(self) -> dict[tuple[str, int], dict[str, Any]]:
        if self.rows is None:
            rows = (
                self.store.get_table(FINETUNE_RUNGS_TABLE).to_pylist()
                if self.store.exists(FINETUNE_RUNGS_TABLE)
                else []
            )
            self.others = [r for r in rows if r["experiment"] != self.experiment]
            self.rows = {
                (r["trial"], int(r["rung"])): r for r in rows if r["experiment"] == self.experiment
            }
        return self.rows

    def decision(self, trial: str, rung: int) -> str | None:
        row = self.load().get((trial, rung))
        return None if row is None or row["decision"] == WAITING else str(row["decision"])

    def write(self, entries: list[tuple[str, int, float, str]]) -> None:
        """Set (trial, rung, score, decision) rows and write the table."""
        mine = self.load()
        for trial, rung, score, decision in entries:
            old = mine.get((trial, rung))
            arrival = old["arrival"] if old else 1 + sum(r == rung for _, r in mine)
            mine[(trial, rung)] = {"experiment": self.experiment, "trial": trial, "rung": rung,
                                   "score": score, "decision": decision, "arrival": arrival}  # fmt: skip
        rows = self.others + sorted(mine.values(), key=lambda r: (r["rung"], r["trial"]))
        self.store.put_table(FINETUNE_RUNGS_TABLE, rows)


class SyncHalving(FIFOScheduler):
    """Successive halving at ``rungs`` (``finetune.asha.mode: sync``), see the module doc.

    ``max_concurrent``: trials beyond it wait (paused before their first epoch) for a slot;
    Tune's own limit cannot be used, as it counts paused trials as running."""

    def __init__(
        self,
        store: Store,
        experiment: str,
        rungs: list[int],
        reduction_factor: float,
        max_concurrent: int | None = None,
    ) -> None:
        super().__init__()  # metric and mode come from the TuneConfig
        self._supports_buffered_results = False  # one report at a time: a rung is never skipped
        self.log = RungLog(store, experiment)
        self.rungs, self.rf, self.max_concurrent = sorted(rungs), reduction_factor, max_concurrent
        self._fresh()

    def _fresh(self) -> None:
        self.trials: dict[str, Trial] = {}
        self.scores: dict[int, dict[str, float]] = {r: {} for r in self.rungs}
        self.decided: dict[int, dict[str, bool]] = {}
        self.ended: set[str] = set()
        self.release: list[Trial] = []  # paused, to run (kept at a rung, or a free slot)
        self.queued: list[Trial] = []  # waiting for a slot (max_concurrent)
        self.to_stop: list[Trial] = []  # stopped once paused (replayed, or still saving)

    def __getstate__(self) -> dict[str, Any]:  # pickled into Tune's tuner.pkl: no trials
        state = dict(self.__dict__)
        for k in ("trials", "scores", "decided", "ended", "release", "queued", "to_stop"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fresh()

    def _replay(self) -> None:
        """The decisions and waiting scores stored by an earlier driver, once."""
        if self.decided or any(self.scores.values()):
            return
        for (trial, rung), row in self.log.load().items():
            if rung not in self.scores:
                continue
            self.scores[rung][trial] = float(row["score"])
            if row["decision"] != WAITING:
                self.decided.setdefault(rung, {})[trial] = row["decision"] == KEPT

    # -- Tune's hooks ---------------------------------------------------------------------
    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self._replay()
        name = _name(trial)
        self.trials[name] = trial
        if trial.status in (Trial.TERMINATED, Trial.ERROR):  # restored, done with
            self.ended.add(name)
        if trial.status != Trial.PENDING:
            return
        last = _epoch(trial.last_result)
        if last in self.rungs:  # restored after reporting at a rung
            kept = self.decided.get(last, {}).get(name)
            if kept is False:
                trial.set_status(Trial.PAUSED)
                self.to_stop.append(trial)
            elif kept is None:  # it was waiting for the rung's decision
                self.scores[last].setdefault(name, _score(trial.last_result))
                self.log.write([(name, last, self.scores[last][name], WAITING)])
                trial.set_status(Trial.PAUSED)
            return
        if self.max_concurrent:
            trial.set_status(Trial.PAUSED)
            self.queued.append(trial)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        name, rung = _name(trial), _epoch(result)
        if rung not in self.rungs or result.get("status") == "failed":
            return TrialScheduler.CONTINUE
        if name in self.decided.get(rung, {}):  # replayed
            return TrialScheduler.CONTINUE if self.decided[rung][name] else TrialScheduler.STOP
        self.scores[rung].setdefault(name, _score(result))
        self.log.write([(name, rung, self.scores[rung][name], WAITING)])
        if self._complete(rung):
            return self._decide(tune_controller, rung, trial)
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: Any) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.ended.add(_name(trial))
        self._settle(tune_controller)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        self._settle(tune_controller)
        pending = []
        for t in self.to_stop:  # stopped once paused: a save in flight would be discarded
            if t.status == Trial.PAUSED:
                tune_controller.stop_trial(t)
            elif t.is_saving:
                pending.append(t)
        self.to_stop = pending
        if self.max_concurrent:
            busy = sum(t.status in (Trial.RUNNING, Trial.PENDING) for t in self.trials.values())
            if busy >= self.max_concurrent:
                return None
        for pool in (self.release, self.queued):
            for t in list(pool):
                if t.status == Trial.PAUSED:
                    pool.remove(t)
                    return t
                if not t.is_saving:  # ended meanwhile (a trial still pausing stays)
                    pool.remove(t)
        return None

    # -- the rule ---------------------------------------------------------------------------
    def _live_at(self, rung: int) -> set[str]:
        """Trials still in the grid at ``rung``: not ended, kept at every earlier rung."""
        return {
            n for n in self.trials if n not in self.ended and all(
                self.decided.get(r, {}).get(n, False) for r in self.rungs if r < rung)
        }  # fmt: skip

    def _complete(self, rung: int) -> bool:
        live = self._live_at(rung)
        return rung not in self.decided and bool(live) and live <= set(self.scores[rung])

    def _settle(self, tune_controller: Any) -> None:
        """Decide every rung whose last trial has reported (or ended) by now."""
        for rung in self.rungs:
            if self._complete(rung):
                self._decide(tune_controller, rung, None)

    def _decide(self, tune_controller: Any, rung: int, current: Trial | None) -> str:
        live = self._live_at(rung)
        decisions = rung_decisions({n: self.scores[rung][n] for n in live}, self.rf)
        self.decided[rung] = decisions
        self.log.write([(n, rung, self.scores[rung][n], KEPT if keep else STOPPED)
                        for n, keep in decisions.items()])  # fmt: skip
        action = TrialScheduler.PAUSE
        for n, keep in decisions.items():
            t = self.trials[n]
            if t is current:
                action = TrialScheduler.CONTINUE if keep else TrialScheduler.STOP
            elif t.status == Trial.PAUSED or t.is_saving:
                if keep:
                    self.release.append(t)
                elif t.is_saving:  # its pause checkpoint (this rung's epoch) is on its way:
                    self.to_stop.append(t)  # stopping it now would discard it
                else:
                    tune_controller.stop_trial(t)
        return action

    def debug_string(self) -> str:
        return f"SyncHalving: rungs {self.rungs}, decided {sorted(self.decided)}"


class RecordedASHA(ASHAScheduler):
    """Tune's asynchronous ASHA (``finetune.asha.mode: async``) with every rung decision
    written to the rungs table, and replayed from it after a restore: the score still goes
    into the rung (later trials are judged against it), the decision is the stored one."""

    def __init__(self, store: Store, experiment: str, rungs: list[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log, self.rung_epochs = RungLog(store, experiment), list(rungs)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        rung = _epoch(result)
        if rung not in self.rung_epochs or result.get("status") == "failed":
            return str(action)
        name = _name(trial)
        stored = self.log.decision(name, rung)
        if stored is not None:
            return TrialScheduler.CONTINUE if stored == KEPT else TrialScheduler.STOP
        kept = action != TrialScheduler.STOP
        self.log.write([(name, rung, _score(result), KEPT if kept else STOPPED)])
        return str(action)
