"""Which module set(s) to fine-tune: the paper's choice, its ablations, and a joint selection.

The paper fine-tunes the single lowest-MRC module and compares it with the most critical
module and with a random one; it leaves open how to score several modules together.
:func:`greedy_joint_selection` grows a set greedily by the joint MRC
(:func:`rift_ray.rift.mrc.robust_criticality`) of the set with each candidate added:

    chosen, scored = greedy_joint_selection(ranked, size=3, candidates=4, score=score_sets)
    # ranked: modules by single-module MRC, lowest first
    # score_sets([("a", "b"), ("a", "c")]) -> [mrc_ab, mrc_ac] (None for a failed set)

The scoring function gets one step's candidate sets at once, so a caller can score them
in parallel (the Ray stage does); each step depends on the set chosen by the previous one.

What each strategy of ``finetune.strategies`` (``config.Strategy``) means is
:data:`STRATEGIES`, here and nowhere else: its module sets (:func:`strategy_sets`) and how
many it yields at most (:func:`max_module_sets`, what ``--dry-run`` and the cluster check
count). To add a strategy, add its name to ``config.Strategy`` and its entry to
:data:`STRATEGIES`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import get_args

from rift_ray.config import FinetuneConfig, Strategy
from rift_ray.rift.finetune import ALL_WEIGHTS, BN_STATS


@dataclass(frozen=True)
class ScoredSet:
    """One set the greedy selection scored: at ``step`` (1-based; the set's size), the set
    ``modules`` = the set chosen at the previous step plus ``added``. ``mrc`` is its joint
    MRC (step 1: the single-module MRC it starts from), None when scoring failed;
    ``chosen`` marks the set kept at that step."""

    step: int
    modules: tuple[str, ...]
    added: str
    mrc: float | None
    chosen: bool


def greedy_joint_selection(
    ranked: Sequence[str],
    size: int,
    candidates: int,
    score: Callable[[list[tuple[str, ...]]], list[float | None]],
    *,
    first_mrc: float | None = None,
    on_step: Callable[[list[ScoredSet]], None] | None = None,
) -> tuple[tuple[str, ...], list[ScoredSet]]:
    """Greedy joint selection of up to ``size`` modules; return (the set, every scored set).

    Starts from ``ranked[0]`` (the lowest single-module MRC; ``first_mrc`` is recorded with
    it). At each step k = 2..size the ``candidates`` next modules of ``ranked`` not chosen
    yet are each added to the current set; ``score`` gives the joint MRC of every such set
    (one call per step) and the set with the lowest joint MRC is kept (ties: the candidate
    earlier in ``ranked``). A set whose score is None or not finite is never kept; when
    every candidate of a step fails, or none is left, the selection stops there (the
    returned set is then smaller than ``size``). ``on_step`` is called after every step with
    the records so far (e.g. to store them).
    """
    if size < 1 or candidates < 1:
        raise ValueError("greedy_joint_selection: needs size >= 1 and candidates >= 1")
    if not ranked:
        raise ValueError("greedy_joint_selection: no ranked modules")
    if len(set(ranked)) != len(ranked):
        raise ValueError("greedy_joint_selection: a module is ranked twice")
    chosen: tuple[str, ...] = (ranked[0],)
    records = [ScoredSet(1, chosen, ranked[0], first_mrc, True)]
    if on_step is not None:
        on_step(list(records))
    for step in range(2, size + 1):
        pool = [m for m in ranked if m not in chosen][:candidates]
        if not pool:
            break
        sets = [(*chosen, m) for m in pool]
        scores = list(score(sets))
        if len(scores) != len(sets):
            raise ValueError(f"score: returned {len(scores)} values for {len(sets)} sets")
        ok = [i for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
        best = min(ok, key=lambda i: (scores[i], i), default=None)
        records += [ScoredSet(step, s, s[-1], scores[i], i == best) for i, s in enumerate(sets)]
        if on_step is not None:
            on_step(list(records))
        if best is None:
            break
        chosen = sets[best]
    return chosen, records


def random_modules(modules: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` distinct modules drawn uniformly from ``modules`` by a generator seeded with ``seed``.

    Independent of the MRC ranking (pass the modules in a fixed order, e.g. forward order).
    """
    if not 1 <= count <= len(modules):
        raise ValueError(f"random_modules: cannot draw {count} of {len(modules)} modules")
    return random.Random(seed).sample(list(modules), count)


@dataclass(frozen=True)
class SelectionInput:
    """What a strategy chooses from. ``ranked``: the modules with an MRC, lowest first;
    ``forward``: every candidate module in forward order; ``greedy``: runs the greedy joint-MRC
    selection and returns its set (the caller scores the sets, e.g. as Ray tasks)."""

    ranked: list[str]
    forward: list[str]
    settings: FinetuneConfig
    seed: int
    greedy: Callable[[], Sequence[str]] | None = None


def _lowest(inp: SelectionInput) -> list[list[str]]:
    """The paper's RiFT: the single lowest-MRC module."""
    return [inp.ranked[:1]]


def _lowest_k(inp: SelectionInput) -> list[list[str]]:
    """Best of k: each of the ``top_k`` lowest-MRC modules (the best by validation wins), and
    with ``joint`` them together (the paper's top-k ablation)."""
    f = inp.settings
    top = inp.ranked[: f.top_k]
    return [[m] for m in top] + ([top] if f.joint and len(top) > 1 else [])


def _full(inp: SelectionInput) -> list[list[str]]:
    """Ablation: every weight fine-tuned (BatchNorm's included), then interpolated."""
    return [[ALL_WEIGHTS]]


def _last_layer(inp: SelectionInput) -> list[list[str]]:
    """Ablation: the classifier only (the last module in forward order)."""
    return [[inp.forward[-1]]]


def _bn_stats(inp: SelectionInput) -> list[list[str]]:
    """Ablation: no weight trained; only the BatchNorm running statistics move to clean data."""
    return [[BN_STATS]]


def first_block(forward: Sequence[str]) -> list[str]:
    """The first stage of a ResNet-like model: every module under the top-level container
    of the first module with a dotted name (``layer1`` of a ResNet, ``block1`` of a WRN);
    the stem conv before it is not included. Surgical fine-tuning's "block 1". A model
    without nested modules has no block: its first module stands for it."""
    dotted = [m for m in forward if "." in m]
    if not dotted:
        return list(forward[:1])
    top = dotted[0].split(".")[0]
    return [m for m in forward if m.split(".")[0] == top and "." in m]


def _first_block(inp: SelectionInput) -> list[list[str]]:
    """Ablation: the first block (:func:`first_block`), as in surgical fine-tuning."""
    return [first_block(inp.forward)]


def _highest(inp: SelectionInput) -> list[list[str]]:
    """The paper's ablation: the most critical module."""
    return [[inp.ranked[-1]]]


def _random(inp: SelectionInput) -> list[list[str]]:
    """The paper's ablation: ``random_draws`` seeded random modules, each alone."""
    pool = [m for m in inp.forward if m in inp.ranked]
    return [[m] for m in random_modules(pool, min(inp.settings.random_draws, len(pool)), inp.seed)]


def _greedy(inp: SelectionInput) -> list[list[str]]:
    """One set grown by joint MRC (:func:`greedy_joint_selection`)."""
    if inp.greedy is None:
        raise ValueError("the greedy strategy needs a joint-MRC selection (SelectionInput.greedy)")
    return [list(inp.greedy())]


@dataclass(frozen=True)
class StrategyDef:
    """One strategy: its module sets, how many it yields at most for given settings, and
    whether it trains weights (``bn_stats`` does not: one trial, learning rate 0)."""

    sets: Callable[[SelectionInput], list[list[str]]]
    max_sets: Callable[[FinetuneConfig], int]
    trains: bool = True


STRATEGIES: dict[Strategy, StrategyDef] = {
    "lowest": StrategyDef(_lowest, lambda f: 1),
    "lowest_k": StrategyDef(_lowest_k, lambda f: f.top_k + (1 if f.joint and f.top_k > 1 else 0)),
    "greedy": StrategyDef(_greedy, lambda f: 1),
    "random": StrategyDef(_random, lambda f: f.random_draws),
    "highest": StrategyDef(_highest, lambda f: 1),
    "full": StrategyDef(_full, lambda f: 1),
    "last_layer": StrategyDef(_last_layer, lambda f: 1),
    "bn_stats": StrategyDef(_bn_stats, lambda f: 1, trains=False),
    "first_block": StrategyDef(_first_block, lambda f: 1),
}
if set(STRATEGIES) != set(get_args(Strategy)):  # the closed set of names lives in config
    raise ImportError(f"STRATEGIES {sorted(STRATEGIES)} != config.Strategy {get_args(Strategy)}")


def strategy_sets(
    inp: SelectionInput,
) -> tuple[dict[str, list[list[str]]], list[list[str]]]:
    """(strategy -> its module sets, the distinct sets to fine-tune, in order) for every
    strategy of ``inp.settings.strategies``.

    A set chosen by two strategies (say ``random`` drawing the lowest-MRC module) is
    fine-tuned once and counts for both; sets equal up to order are the same set.
    """
    by_strategy: dict[str, list[list[str]]] = {
        s: STRATEGIES[s].sets(inp) for s in inp.settings.strategies
    }
    canonical: dict[frozenset[str], list[str]] = {}
    for name, groups in by_strategy.items():
        by_strategy[name] = [canonical.setdefault(frozenset(g), g) for g in groups]
    return by_strategy, list(canonical.values())


def set_label(modules: str) -> str:
    """A module set (names joined by ``+``) as people read it: the ablations' sets spelled out."""
    return {
        ALL_WEIGHTS: "every weight", BN_STATS: "no weight (BatchNorm statistics only)"
    }.get(modules, modules)  # fmt: skip


def strategy_lrs(strategy: str, lrs: Sequence[float]) -> list[float]:
    """The learning rates a strategy's sets are fine-tuned with: ``finetune.lrs``, or [0.0]
    for a strategy that trains no weight (``bn_stats``)."""
    return list(lrs) if STRATEGIES[strategy].trains else [0.0]  # type: ignore[index]


def max_module_sets(settings: FinetuneConfig) -> int:
    """Module sets stage 3 fine-tunes, at most (sets two strategies share are fine-tuned
    once); times ``len(lrs)`` it bounds the number of fine-tuning trials."""
    return sum(STRATEGIES[s].max_sets(settings) for s in settings.strategies)


def max_trials(settings: FinetuneConfig) -> int:
    """Fine-tuning trials at most: each strategy's sets times its learning rates."""
    return sum(
        STRATEGIES[s].max_sets(settings) * len(strategy_lrs(s, settings.lrs))
        for s in settings.strategies
    )


__all__ = [
    "STRATEGIES",
    "ScoredSet",
    "SelectionInput",
    "StrategyDef",
    "greedy_joint_selection",
    "max_module_sets",
    "max_trials",
    "random_modules",
    "first_block",
    "strategy_lrs",
    "strategy_sets",
]
