"""Successive-halving rungs (rift_ray.rift.asha) against Tune's own ASHA bracket, and the rung
rule a ``--retry-failed`` fine-tuning trial is judged by (RungStopper)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from rift_ray.config import SweepConfig
from rift_ray.rift.asha import continues, cutoff, milestones, rung_decisions
from rift_ray.stages.base import SweepState
from rift_ray.stages.finetune import RungStopper


class _T:
    def __init__(self, i: int) -> None:
        self.trial_id = f"t{i}"


@pytest.mark.parametrize(
    "grace,rf,max_t", [(1, 2, 4), (1, 3, 9), (1, 2, 5), (2, 2, 8), (1, 4, 20), (2, 3, 2), (1, 2, 1)]
)
def test_milestones_are_tunes_rungs_below_max_epochs(grace: int, rf: int, max_t: int) -> None:
    if max_t <= grace:
        assert milestones(grace, rf, max_t) == []
        return
    tune_rungs = sorted(m for m, _ in _Bracket(grace, max_t, rf, s=0)._rungs)
    assert milestones(grace, rf, max_t) == [m for m in tune_rungs if m < max_t]


def test_continues_is_tunes_decision_for_the_last_reporter() -> None:
    rng = random.Random(0)
    checked = stops = 0
    for _ in range(400):
        rf = rng.choice([2, 3, 4])
        n = rng.randint(0, 7)
        scores = [round(rng.uniform(0, 1), 1) for _ in range(n + 1)]  # ties on purpose
        bracket = _Bracket(1, 8, rf, s=0)
        for i, s in enumerate(scores[:-1]):
            bracket.on_result(_T(i), 1, s)  # the others reach rung 1 first
        action = bracket.on_result(_T(n), 1, scores[-1])
        assert continues(scores[-1], scores[:-1], rf) == (action == TrialScheduler.CONTINUE)
        checked += 1
        stops += action == TrialScheduler.STOP
    assert checked == 400 and 50 < stops < 350  # both outcomes were exercised


def test_cutoff_with_failed_epochs() -> None:
    assert cutoff([], 2) is None
    assert cutoff([float("nan")], 2) is None
    assert cutoff([0.2, 0.4], 2) == pytest.approx(0.3)
    assert cutoff([float("-inf"), float("-inf")], 2) == -math.inf
    assert continues(0.1, [float("-inf")], 2)  # any finite score beats a failed epoch
    assert not continues(float("nan"), [0.1], 2)


def test_rung_decisions_keep_the_top_fraction_ties_by_name() -> None:
    scores = {"d": 0.5, "b": 0.9, "a": 0.5, "c": 0.1}
    assert rung_decisions(scores, 2) == {"a": True, "b": True, "c": False, "d": False}
    assert rung_decisions({"x": 0.1, "y": 0.2, "z": 0.3}, 2) == {"x": False, "y": False, "z": True}
    assert rung_decisions({"x": 0.1}, 3) == {"x": True}  # at least one goes on
    nan = {"a": float("nan"), "b": float("-inf"), "c": 0.0, "d": -1.0}
    assert rung_decisions(nan, 2) == {"a": False, "b": False, "c": True, "d": True}
    # the same scores in any order give the same decisions
    items = list(scores.items())
    random.Random(1).shuffle(items)
    assert rung_decisions(dict(items), 2) == rung_decisions(scores, 2)


def _state() -> tuple[SweepState, Any]:
    cfg = SweepConfig.model_validate(
        {"name": "r", "finetune": {"lrs": [0.01, 0.1], "epochs": 4,
                                   "asha": {"grace_period": 1, "reduction_factor": 2}}}
    )  # fmt: skip
    st = SweepState()
    st.by_strategy = {"lowest": [["conv1"]], "random": [["linear"]]}
    st.ft_rows = [
        {"trial": "conv1_lr0.01", "modules": "conv1", "lr": 0.01, "status": "finished"},
        {"trial": "conv1_lr0.1", "modules": "conv1", "lr": 0.1, "status": "failed"},
        {"trial": "linear_lr0.01", "modules": "linear", "lr": 0.01, "status": "finished"},
        {"trial": "linear_lr0.1", "modules": "linear", "lr": 0.1, "status": "stopped"},
    ]
    score = {"conv1_lr0.01": 0.5, "conv1_lr0.1": float("-inf"), "linear_lr0.01": 2.0,
             "linear_lr0.1": 1.0}  # fmt: skip
    st.epoch_rows = [
        {"trial": t, "epoch": e, "val_score": score[t] + e}
        for t in score
        for e in ([1] if t in ("conv1_lr0.1", "linear_lr0.1") else [1, 2, 3, 4])
    ]
    return st, cfg.finetune


def test_rung_stopper_judges_against_its_own_strategys_trials() -> None:
    st, f = _state()
    failed = [r for r in st.ft_rows if r["status"] == "failed"]
    stop = RungStopper.for_trials(failed, st, f, "lowest")
    assert stop.trials == [(["conv1"], 0.1)]
    # rungs 1 and 2 (not 4 = max epochs); peers: conv1_lr0.01 only, not the failed trial
    # itself, nor the `random` strategy's linear trials (their own experiment and ASHA)
    assert stop.recorded == {"conv1_lr0.1": {1: {"conv1_lr0.01": 1.5}, 2: {"conv1_lr0.01": 2.5}}}
    assert stop.mode == "sync"  # the config's finetune.asha.mode
    at = {"trial": "conv1_lr0.1", "status": "ok"}
    assert not stop("id", {**at, "epoch": 1, "val_score": 1.6})
    assert stop("id", {**at, "epoch": 1, "val_score": 1.4})
    assert not stop("id", {**at, "epoch": 3, "val_score": -9.0})  # no rung at epoch 3
    assert stop("id", {**at, "epoch": 2, "val_score": 2.0})
    assert not stop("id", {**at, "epoch": 1, "status": "failed", "val_score": -9.0})
    assert not stop.stop_all()


def test_rung_stopper_with_no_peer_lets_the_trial_run(tmp_path: Path) -> None:
    st, f = _state()
    failed = [r for r in st.ft_rows if r["modules"] == "conv1"]  # both of its strategy's trials
    stop = RungStopper.for_trials(failed, st, f, "lowest")
    assert stop.recorded == {"conv1_lr0.01": {1: {}, 2: {}}, "conv1_lr0.1": {1: {}, 2: {}}}
    assert not stop("id", {"trial": "conv1_lr0.1", "epoch": 1, "val_score": -5.0})


def test_rung_stopper_follows_the_sweeps_mode() -> None:
    """Peers scored 1.0 and 3.0 at rung 1, the retried trial 2.0: successive halving keeps
    one of three (3.0), Tune's ASHA lets it on (2.0 reaches the median cutoff)."""
    recorded = {"me": {1: {"a": 1.0, "b": 3.0}}}
    result = {"trial": "me", "epoch": 1, "val_score": 2.0}
    assert RungStopper([], recorded, 2.0, "sync")("id", result)
    assert not RungStopper([], recorded, 2.0, "async")("id", result)
