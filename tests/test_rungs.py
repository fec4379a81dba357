"""Rung decisions of the fine-tuning grid (rift_ray.stages.rungs) against a simulated Tune
controller: the trials report in different orders, drivers are killed and the experiment
restored, and the decisions must not change."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from rift_ray.stages.rungs import RecordedASHA, SyncHalving
from rift_ray.store import FINETUNE_RUNGS_TABLE, Store

LRS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05]
EPOCHS, RUNGS = 4, [1, 2]
# val_score of each trial after each epoch; two ties at rung 1 (broken by trial name)
SCORES = {
    0.001: [0.1, 0.5, 0.6, 0.7],
    0.002: [0.3, 0.2, 0.1, 0.0],
    0.005: [0.3, 0.4, 0.9, 1.0],
    0.01: [0.6, 0.1, 0.2, 0.3],
    0.02: [float("nan"), 0.9, 0.9, 0.9],
    0.05: [-0.2, 0.8, 0.8, 0.8],
}


class FakeTrial:
    def __init__(self, lr: float) -> None:
        self.config = {"modules": ["conv1"], "lr": lr}
        self.trial_id = f"t{lr:g}"
        self.status = Trial.PENDING
        self.last_result: dict[str, Any] = {}
        self.is_saving = False
        self.epoch = 0

    def set_status(self, status: str) -> None:
        self.status = status

    @property
    def name(self) -> str:
        return f"conv1_lr{self.config['lr']:g}"


class FakeController:
    """What a scheduler may call on Tune's controller, as Tune does it."""

    def __init__(self, sched: Any, trials: list[FakeTrial]) -> None:
        self.sched, self.trials = sched, trials

    def get_trials(self) -> list[FakeTrial]:
        return self.trials

    def stop_trial(self, t: FakeTrial) -> None:
        if t.status in (Trial.PENDING, Trial.PAUSED):
            self.sched.on_trial_remove(self, t)
        elif t.status == Trial.RUNNING:
            self.sched.on_trial_complete(self, t, t.last_result)
        t.status = Trial.TERMINATED


def simulate(
    sched: Any, trials: list[FakeTrial], seed: int, reports: int | None = None, slots: int = 99
) -> dict[str, tuple[int, str]]:
    """Run the grid: each step a random running trial reports its next epoch (``reports``:
    stop after that many, as a killed driver). Returns trial -> (epochs, status)."""
    rng, ctl = random.Random(seed), FakeController(sched, trials)
    for t in trials:  # a restore adds every trial again, finished ones too
        sched.on_trial_add(ctl, t)
    n = 0
    while True:
        while (t := sched.choose_trial_to_run(ctl)) is not None and t.status != Trial.PENDING:
            t.status = Trial.PENDING  # a paused trial the scheduler lets run again
        for t in trials:  # Tune starts pending trials as resources allow
            if t.status == Trial.PENDING and sum(x.status == Trial.RUNNING for x in trials) < slots:
                t.status = Trial.RUNNING
        running = [t for t in trials if t.status == Trial.RUNNING]
        if not running or (reports is not None and n >= reports):
            break
        t = rng.choice(running)
        t.epoch += 1
        n += 1
        t.last_result = {"epoch": t.epoch, "val_score": SCORES[t.config["lr"]][t.epoch - 1]}
        action = sched.on_trial_result(ctl, t, t.last_result)
        if action == TrialScheduler.STOP:
            ctl.stop_trial(t)
        elif action == TrialScheduler.PAUSE:
            t.status = Trial.PAUSED
        elif t.epoch == EPOCHS:
            t.status = Trial.TERMINATED
            sched.on_trial_complete(ctl, t, t.last_result)
    return {t.name: (t.epoch, t.status) for t in trials}


def sync(tmp_path: Path, name: str = "s", slots: int | None = None) -> SyncHalving:
    return SyncHalving(Store.open(str(tmp_path), name), "finetune-h", RUNGS, 2.0, slots)


# successive halving by hand: rung 1 ranks 0.01 (0.6), then 0.002 and 0.005 tied at 0.3
# (0.002 first by name), 0.001, 0.05; 0.02 is NaN: keep 3 -> 0.01, 0.002, 0.005.
# rung 2: 0.005 (0.4) > 0.002 (0.2) > 0.01 (0.1): keep 1 -> 0.005, which runs all 4 epochs
EXPECTED = {
    "conv1_lr0.001": (1, Trial.TERMINATED),
    "conv1_lr0.002": (2, Trial.TERMINATED),
    "conv1_lr0.005": (4, Trial.TERMINATED),
    "conv1_lr0.01": (2, Trial.TERMINATED),
    "conv1_lr0.02": (1, Trial.TERMINATED),
    "conv1_lr0.05": (1, Trial.TERMINATED),
}


@pytest.mark.parametrize("seed", range(6))
def test_sync_decisions_do_not_depend_on_the_reporting_order(tmp_path: Path, seed: int) -> None:
    sched = sync(tmp_path)
    assert simulate(sched, [FakeTrial(lr) for lr in LRS], seed) == EXPECTED
    rows = Store.open(str(tmp_path), "s").get_table(FINETUNE_RUNGS_TABLE).to_pylist()
    got = {(r["trial"], r["rung"]): r["decision"] for r in rows}
    assert got == {
        **{(f"conv1_lr{lr:g}", 1): "stopped" for lr in (0.001, 0.02, 0.05)},
        **{(f"conv1_lr{lr:g}", 1): "kept" for lr in (0.002, 0.005, 0.01)},
        ("conv1_lr0.002", 2): "stopped", ("conv1_lr0.01", 2): "stopped",
        ("conv1_lr0.005", 2): "kept",
    }  # fmt: skip
    assert {r["experiment"] for r in rows} == {"finetune-h"}


def test_async_asha_decisions_do_depend_on_it(tmp_path: Path) -> None:
    """The reason sync exists: Tune's ASHA on the same scores, other orders, other outcomes."""
    outcomes = set()
    for seed in range(12):
        sched = RecordedASHA(Store.open(str(tmp_path), f"a{seed}"), "finetune-h", RUNGS,
                             time_attr="epoch", max_t=EPOCHS, grace_period=1,
                             reduction_factor=2, metric="val_score", mode="max")  # fmt: skip
        out = simulate(sched, [FakeTrial(lr) for lr in LRS], seed)
        outcomes.add(tuple(sorted(out.items())))
    assert len(outcomes) > 1


@pytest.mark.parametrize("cut", [3, 7, 9, 12])
def test_sync_killed_and_restored_decides_as_uninterrupted(tmp_path: Path, cut: int) -> None:
    """A driver killed after ``cut`` reports (some trials paused at a rung, some decisions
    stored); Tune restores the pickled scheduler and the trials, unfinished ones PENDING
    with their last result; the grid ends as an uninterrupted one does."""
    sched = sync(tmp_path)
    pickled = pickle.dumps(sched)  # what Tune's tuner.pkl holds: no rung state
    trials = [FakeTrial(lr) for lr in LRS]
    simulate(sched, trials, seed=cut, reports=cut)
    for t in trials:  # Tune's restore: unfinished trials come back PENDING
        if t.status != Trial.TERMINATED:
            t.status = Trial.PENDING
    restored = pickle.loads(pickled)
    assert simulate(restored, trials, seed=100 + cut) == EXPECTED


def test_async_replays_stored_decisions_after_a_restore(tmp_path: Path) -> None:
    def asha() -> RecordedASHA:
        return RecordedASHA(Store.open(str(tmp_path), "a"), "finetune-h", RUNGS,
                            time_attr="epoch", max_t=EPOCHS, grace_period=1,
                            reduction_factor=2, metric="val_score", mode="max")  # fmt: skip

    first = simulate(asha(), [FakeTrial(lr) for lr in LRS], seed=0)
    stored = Store.open(str(tmp_path), "a").get_table(FINETUNE_RUNGS_TABLE).to_pylist()
    # a resumed driver whose trials report in another order gets the stored decisions
    again = simulate(pickle.loads(pickle.dumps(asha())), [FakeTrial(lr) for lr in LRS], seed=5)
    assert again == first
    assert Store.open(str(tmp_path), "a").get_table(FINETUNE_RUNGS_TABLE).to_pylist() == stored


def test_sync_with_a_concurrency_limit_runs_every_trial(tmp_path: Path) -> None:
    """max_concurrent_trials 2: trials beyond it wait paused for a slot, the rung waits for
    them, the decisions are the same."""
    sched = sync(tmp_path, slots=2)
    trials = [FakeTrial(lr) for lr in LRS]
    assert simulate(sched, trials, seed=3, slots=2) == EXPECTED


def test_other_experiments_rows_are_kept(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), "s")
    simulate(sync(tmp_path), [FakeTrial(lr) for lr in LRS], seed=0)
    other = SyncHalving(store, "finetune-h-greedy", RUNGS, 2.0)
    simulate(other, [FakeTrial(lr) for lr in LRS[:2]], seed=0)
    rows = store.get_table(FINETUNE_RUNGS_TABLE).to_pylist()
    assert {r["experiment"] for r in rows} == {"finetune-h", "finetune-h-greedy"}
    assert len([r for r in rows if r["experiment"] == "finetune-h"]) == 9


def test_a_loser_still_saving_its_pause_checkpoint_is_stopped_once_paused(tmp_path: Path) -> None:
    """Tune's stop_trial discards a save in flight: a trial that lost the rung while its pause
    checkpoint (that epoch's weights and history) was still being saved is stopped only once
    it is paused, so the stopped trial keeps the epoch it reported."""
    sched = SyncHalving(Store.open(str(tmp_path), "s"), "finetune-h", [1], 2.0, None)
    a, b = FakeTrial(0.01), FakeTrial(0.005)  # at epoch 1: a 0.6 would win, so score b higher
    ctl = FakeController(sched, [a, b])
    for t in (a, b):
        sched.on_trial_add(ctl, t)
        t.status = Trial.RUNNING
    assert sched.on_trial_result(ctl, a, {"epoch": 1, "val_score": 0.1}) == TrialScheduler.PAUSE
    a.is_saving = True  # Tune is saving a's pause checkpoint; a is still RUNNING
    assert sched.on_trial_result(ctl, b, {"epoch": 1, "val_score": 0.9}) == TrialScheduler.CONTINUE
    assert a.status == Trial.RUNNING  # not stopped: its save would be lost
    assert sched.choose_trial_to_run(ctl) is None and a.status == Trial.RUNNING
    a.is_saving, a.status = False, Trial.PAUSED  # the save landed
    assert sched.choose_trial_to_run(ctl) is None
    assert a.status == Trial.TERMINATED and sched.to_stop == []
