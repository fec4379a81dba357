"""The method's decisions, Ray-free: what each strategy selects, how many sets it yields,
which trial wins, the ASHA score; and the one error formatter, the names the store gives."""

from __future__ import annotations

import pytest

from rift_ray.config import load_config
from rift_ray.errors import one_line
from rift_ray.rift.finetune import asha_score
from rift_ray.rift.interpolate import best_trial
from rift_ray.rift.selection import (
    STRATEGIES,
    SelectionInput,
    first_block,
    max_module_sets,
    random_modules,
    strategy_lrs,
    strategy_sets,
)
from rift_ray.store import autoattack_shard, experiment_dir, experiment_name, trial_name

RANKED = ["l2", "l1", "linear", "conv1", "l3"]  # by MRC, lowest first
FORWARD = ["conv1", "l1", "l2", "l3", "linear"]


def _sets(*overrides: str, greedy: list[str] | None = None) -> dict[str, list[list[str]]]:
    f = load_config(None, list(overrides)).finetune
    inp = SelectionInput(RANKED, FORWARD, f, 3, (lambda: greedy) if greedy else None)
    return strategy_sets(inp)[0]


ALL = "[lowest,lowest_k,greedy,random,highest,full,last_layer,bn_stats,first_block]"


def test_each_strategy_yields_its_sets_and_no_more_than_it_declares() -> None:
    all9 = [f"finetune.strategies={ALL}", "finetune.random_draws=2"]
    by = _sets(*all9, "finetune.top_k=3", "finetune.joint=true", greedy=["l2", "conv1"])
    assert by["lowest"] == [["l2"]]  # the paper: the single lowest-MRC module
    assert by["lowest_k"] == [["l2"], ["l1"], ["linear"], ["l2", "l1", "linear"]]
    assert by["greedy"] == [["l2", "conv1"]]
    assert by["highest"] == [["l3"]]
    assert by["random"] == [[m] for m in random_modules(FORWARD, 2, 3)]
    assert by["full"] == [[":all"]] and by["bn_stats"] == [[":bn_stats"]]
    assert by["last_layer"] == [["linear"]]
    assert by["first_block"] == [["conv1"]]  # no nested module: the first one stands for it
    f = load_config(None, [*all9, "finetune.top_k=3", "finetune.joint=true"]).finetune
    assert max_module_sets(f) == 1 + 4 + 1 + 2 + 1 + 4 == sum(len(v) for v in by.values())
    assert set(STRATEGIES) == set(ALL.strip("[]").split(","))
    assert strategy_lrs("bn_stats", [0.1, 0.2]) == [0.0]
    assert strategy_lrs("full", [0.1, 0.2]) == [0.1, 0.2]
    assert (
        trial_name([":all"], 0.01) == "all_lr0.01"
        and trial_name([":bn_stats"], 0) == "bn_stats_lr0"
    )


def test_first_block_is_the_first_stage_of_real_architectures() -> None:
    from torch import nn

    from rift_ray.models import build_model

    def forward(arch: str, **kw: int) -> list[str]:
        m = build_model(arch, 10, **kw)
        return [n for n, x in m.named_modules() if isinstance(x, (nn.Conv2d, nn.Linear))]

    assert first_block(forward("small_resnet")) == ["layer1.0.conv1", "layer1.0.conv2"]
    wrn = first_block(forward("wrn", depth=16, widen_factor=2))
    assert wrn[0] == "block1.layer.0.conv1" and all(m.startswith("block1.") for m in wrn)
    assert len(wrn) == 2 * 2 + 1  # two blocks of two convs, and the first block's shortcut
    assert first_block(["conv", "fc"]) == ["conv"]


def test_top_k_belongs_to_lowest_k_and_lowest_is_one_module() -> None:
    with pytest.raises(ValueError, match="top_k: 3 applies to the lowest_k strategy"):
        load_config(None, ["finetune.top_k=3"])
    with pytest.raises(ValueError, match="joint: true applies to the lowest_k"):
        load_config(None, ["finetune.joint=true"])
    by = _sets("finetune.strategies=[lowest,lowest_k]", "finetune.top_k=2")
    assert by == {"lowest": [["l2"]], "lowest_k": [["l2"], ["l1"]]}


def test_a_set_two_strategies_choose_is_fine_tuned_once() -> None:
    f = load_config(None, ["finetune.strategies=[lowest,greedy]"]).finetune
    by, sets = strategy_sets(SelectionInput(RANKED, FORWARD, f, 0, lambda: ["l2"]))
    assert by == {"lowest": [["l2"]], "greedy": [["l2"]]} and sets == [["l2"]]
    assert by["lowest"][0] is by["greedy"][0]


def test_greedy_without_a_scorer_is_an_error() -> None:
    with pytest.raises(ValueError, match="greedy"):
        _sets("finetune.strategies=[greedy]", "finetune.primary=greedy")


def _choice(trial: str, gain: float | None, drop: float = 0.0, ok: bool = True) -> dict:
    return {"trial": trial, "alpha": 0.5, "clean_gain": gain, "robust_drop": drop, "feasible": ok}


def test_winner_is_the_largest_feasible_gain_ties_by_drop_then_name() -> None:
    choices = [
        _choice("b", 1.0, 0.05),
        _choice("a", 1.0, 0.05),
        _choice("c", 1.0, 0.0),
        _choice("d", 9.0, ok=False),
    ]
    assert best_trial(choices)["trial"] == "c"  # type: ignore[index]
    assert best_trial(choices[:2])["trial"] == "a"  # type: ignore[index]
    assert best_trial(choices, among={"a", "b"})["trial"] == "a"  # type: ignore[index]
    assert best_trial([_choice("d", 9.0, ok=False)]) is None
    assert best_trial(choices, among=set()) is None


def test_asha_score_is_the_paper_gain_when_feasible_and_penalises_beyond_tolerance() -> None:
    at = {"clean_acc": 80.0, "robust_acc": 40.0}
    feasible = {"clean_acc": 81.5, "robust_acc": 39.95}  # drop 0.05 <= 0.1
    infeasible = {"clean_acc": 83.0, "robust_acc": 39.0}  # drop 1.0: 0.9 beyond the tolerance
    assert asha_score([at, feasible], 0.1, 2.0) == pytest.approx(1.5)
    # no feasible alpha: the penalised score, below every trial with a feasible one
    assert asha_score([at, infeasible], 0.1, 2.0) == pytest.approx(3.0 - 2.0 * 0.9 - 200.0)
    assert asha_score([at, infeasible], 0.1, 2.0, "penalised") == pytest.approx(3.0 - 2.0 * 0.9)
    assert asha_score([at, feasible, infeasible], 0.1, 2.0) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="unknown score"):
        asha_score([at, feasible], 0.1, 2.0, "best")


def test_asha_score_ranks_trials_as_the_paper_rule_does() -> None:
    """Issue 14, F1: a trial worth +1.0 by the rule (with an infeasible alpha 0.1 point beyond
    the tolerance at +2.1) must not outrank one worth +1.2."""
    at = {"clean_acc": 80.0, "robust_acc": 40.0}
    a = [at, {"clean_acc": 81.0, "robust_acc": 40.0}, {"clean_acc": 82.1, "robust_acc": 39.8}]
    b = [at, {"clean_acc": 81.2, "robust_acc": 39.95}]
    assert asha_score(a, 0.1, 2.0, "penalised") == pytest.approx(1.9)  # the old ranking: a first
    assert asha_score(a, 0.1, 2.0, "penalised") > asha_score(b, 0.1, 2.0, "penalised")
    assert asha_score(a, 0.1, 2.0) == pytest.approx(1.0)  # the rule's gain
    assert asha_score(b, 0.1, 2.0) == pytest.approx(1.2)
    assert asha_score(b, 0.1, 2.0) > asha_score(a, 0.1, 2.0)
    # a feasible but losing trial still outranks one that keeps no alpha feasible
    losing = [at, {"clean_acc": 79.0, "robust_acc": 40.0}]
    none = [at, {"clean_acc": 85.0, "robust_acc": 30.0}]
    assert asha_score(losing, 0.1, 2.0) == pytest.approx(-1.0)
    assert asha_score(losing, 0.1, 2.0) > asha_score(none, 0.1, 2.0)


def test_one_line_keeps_a_traceback_last_line_and_joins_other_text() -> None:
    tb = "boom\nTraceback (most recent call last):\n  File 'x'\nValueError: bad value\n"
    assert one_line(RuntimeError(tb)) == "ValueError: bad value"
    assert one_line(ValueError("a\n  b"), typed=True) == "ValueError: a b"
    assert one_line("x" * 500, limit=10) == "x" * 10

    class Wrapped(Exception):
        cause = KeyError("inner")

    assert one_line(Wrapped("outer"), typed=True) == "KeyError: 'inner'"


def test_store_names_ray_experiments_trials_and_shards() -> None:
    assert experiment_name("adv_train", "h1") == "at-h1"
    assert experiment_name("mrc", "h2") == "mrc-h2"
    assert experiment_name("finetune", "h3", "greedy") == "finetune-h3-greedy"
    assert experiment_dir("mrc-h2") == "ray/mrc-h2"
    assert trial_name(["layer1.0.conv1", "fc"], 0.01) == "layer1.0.conv1+fc_lr0.01"
    assert trial_name(["a/b c"], 1e-3) == "a_b_c_lr0.001"
    assert autoattack_shard("rift", 2) == "artifacts/autoattack/rift/shard-2.json"
