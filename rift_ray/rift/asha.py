"""Successive-halving rungs of the fine-tuning grid, as plain functions (no Ray).

    milestones(grace_period=1, reduction_factor=2, max_epochs=4)   # [1, 2]
    continues(0.31, [0.40, 0.28, 0.35], reduction_factor=2)        # False (cutoff 0.35)

The rungs are Tune's ``ASHAScheduler``'s (one bracket): epochs ``grace * rf**k`` below
``max_epochs``. Tune's asynchronous rule: a trial reaching a rung goes on when its score is at
least the ``1 - 1/rf`` percentile of the scores the rung recorded before it, so the decision
depends on which trials happened to report first (:func:`continues`). The synchronous rule
decides a rung once all its trials have reported, by rank (:func:`rung_decisions`), so the
same scores always give the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def milestones(grace_period: int, reduction_factor: float, max_epochs: int) -> list[int]:
    """The epochs at which a decision is made, ascending (none at ``max_epochs`` itself)."""
    grace = min(grace_period, max_epochs)
    if max_epochs <= grace or reduction_factor <= 1:
        return []
    n = int(math.log(max_epochs / grace) / math.log(reduction_factor) + 1e-9) + 1
    rungs = sorted({int(grace * reduction_factor**k) for k in range(n)})
    return [m for m in rungs if m < max_epochs]


def cutoff(others: Iterable[float], reduction_factor: float) -> float | None:
    """Tune's ASHA cutoff at a rung where ``others`` were recorded before this trial: their
    ``1 - 1/rf`` percentile, NaN ignored (None when nothing was recorded: the trial goes on)."""
    vals = [float(v) for v in others if not math.isnan(v)]
    if not vals:
        return None
    finite = [v for v in vals if math.isfinite(v)]
    low = (min(finite) if finite else 0.0) - 1.0  # stands for -inf (a failed epoch), below all
    q = float(np.percentile([v if math.isfinite(v) else low for v in vals],
                            (1 - 1 / reduction_factor) * 100))  # fmt: skip
    return -math.inf if q <= low else q


def continues(score: float, others: Iterable[float], reduction_factor: float) -> bool:
    """Whether a trial with ``score`` at a rung goes on, judged against the ``others`` recorded
    there, as Tune's ASHA judges a trial that reports last at that rung."""
    cut = cutoff(others, reduction_factor)
    return cut is None or (not math.isnan(score) and score >= cut)


def kept(n: int, reduction_factor: float) -> int:
    """Trials of a complete rung of ``n`` that go on under successive halving."""
    return max(1, int(n // reduction_factor))


def rung_decisions(scores: dict[str, float], reduction_factor: float) -> dict[str, bool]:
    """A complete rung decided at once (successive halving): the best ``max(1, n // rf)``
    trials by score go on, ties broken by trial name; NaN and -inf rank last. Returns every
    trial's decision (True: kept), in trial-name order."""

    def key(t: str) -> tuple[float, str]:
        s = scores[t]
        return (-s if math.isfinite(s) else math.inf, t)

    ranked = sorted(scores, key=key)
    keep = set(ranked[: kept(len(ranked), reduction_factor)])
    return {t: t in keep and math.isfinite(scores[t]) for t in sorted(scores)}
