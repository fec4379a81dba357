"""alpha* with PGD only where the answer can be: clean accuracy first (``interpolate.search:
clean_first``).

Both alpha rules maximise the clean gain over the alphas that pass a robustness check. Clean
accuracy costs one forward pass per image; PGD-k costs about 3k + 2. So clean accuracy is
measured at every alpha, the candidates are ordered by clean gain (largest first, ties to the
smaller alpha, as the rules break them), and PGD runs down that list until the first one
passes. That alpha is the one the rule picks on the full grid: every alpha with a larger
gain was measured and failed, and no alpha with a smaller gain can win. No assumption about
the shape of the curves is made, so there is nothing to fall back from.

    search = search_clean_first(clean_at, robust_at, [0.25, 0.5, 0.75, 1.0], at_val, 0.1)
    search.rows            # every alpha: clean figures; robust figures where PGD ran
    search.robust_alphas   # where PGD ran, in order

- ``paper``: candidates are the alphas with a clean gain above 0 (a gain <= 0 never beats
  the AT model, which the rule keeps then); the check is robust drop <= tolerance.
- ``confident``: candidates are the alphas whose paired clean-gain interval lies above 0
  (:func:`rift_ray.rift.confidence.select_alpha_confident`; it needs only clean results);
  the check is the robust-drop interval's upper end <= tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rift_ray.rift.confidence import paired_interval

_EPS = 1e-9  # as rift.interpolate and rift.confidence: float slack against the tolerance


@dataclass
class CleanFirstSearch:
    """``rows``: alpha -> the measured row (``clean_acc`` always; ``robust_acc`` and the
    per-image ``robust`` only where PGD ran). ``robust_alphas``: the alphas PGD ran at, in
    the order it did. ``alpha``: the rule's alpha* (0.0: the AT model is kept)."""

    rows: dict[float, dict[str, Any]]
    robust_alphas: list[float]
    alpha: float


def candidates(
    clean: Mapping[float, Mapping[str, Any]],
    baseline: Mapping[str, Any],
    rule: str = "paper",
) -> list[float]:
    """The alphas that could be alpha*, best first: by clean gain over ``baseline`` (largest
    first; equal gains to the smaller alpha). ``paper``: gain > 0; ``confident``: the paired
    gain interval's lower end > 0 (rows and baseline carry per-image ``clean`` vectors)."""
    base = float(baseline["clean_acc"])
    keep = []
    for alpha, row in clean.items():
        if rule == "confident":  # the gain as select_alpha_confident measures it
            iv = paired_interval(baseline["clean"], row["clean"])
            gain, ok = iv.diff, iv.lo > 0.0
        elif rule == "paper":  # as select_alpha: a gain <= 0 keeps the AT model
            gain = float(row["clean_acc"]) - base
            ok = gain > 0.0
        else:
            raise ValueError(f"rule: must be 'paper' or 'confident' (got {rule!r})")
        if ok:
            keep.append((-gain, float(alpha)))
    return [alpha for _, alpha in sorted(keep)]


def passes(
    row: Mapping[str, Any], baseline: Mapping[str, Any], tolerance: float, rule: str = "paper"
) -> bool:
    """The rule's robustness check of one measured alpha against the AT model."""
    if rule == "confident":
        drop_hi = -paired_interval(baseline["robust"], row["robust"]).lo
        return drop_hi <= tolerance + _EPS
    return float(row["robust_acc"]) >= float(baseline["robust_acc"]) - tolerance - _EPS


def search_clean_first(
    clean_fn: Callable[[float], Mapping[str, Any]],
    robust_fn: Callable[[float], Mapping[str, Any]],
    alphas: Sequence[float],
    baseline: Mapping[str, Any],
    tolerance: float = 0.1,
    rule: str = "paper",
) -> CleanFirstSearch:
    """alpha* of ``rule`` over ``alphas`` (> 0), measuring PGD only where it decides.

    ``clean_fn(alpha)``: ``clean_acc`` (percent) and, for ``confident``, the per-image
    ``clean`` bools; ``robust_fn(alpha)``: ``robust_acc`` and, for ``confident``, ``robust``
    (it may return the clean figures too; they win over ``clean_fn``'s). ``baseline``: the
    AT model's (alpha 0) figures, per-image vectors included for ``confident``.
    """
    grid = sorted({float(a) for a in alphas if float(a) > 0.0})
    rows = {a: {**clean_fn(a), "alpha": a} for a in grid}
    tried: list[float] = []
    for alpha in candidates(rows, baseline, rule):
        rows[alpha] = {**rows[alpha], **robust_fn(alpha), "alpha": alpha}
        tried.append(alpha)
        if passes(rows[alpha], baseline, tolerance, rule):
            return CleanFirstSearch(rows, tried, alpha)
    return CleanFirstSearch(rows, tried, 0.0)
