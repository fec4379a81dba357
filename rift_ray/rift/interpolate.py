"""Stage 4: interpolate AT and fine-tuned weights, then choose alpha.

theta(alpha) = (1 - alpha) * theta_AT + alpha * theta_FT     (whole state dict, BN stats included)

rows = [{"alpha": a, **metrics(interpolate(at, ft, a))} for a in alphas]
choice = select_alpha(rows, tolerance=0.1)       # largest clean gain, robust drop <= 0.1 point
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

_EPS = 1e-9  # float slack for the tolerance comparison (accuracies are in percent)


def interpolate(
    state_at: Mapping[str, Tensor], state_ft: Mapping[str, Tensor], alpha: float
) -> dict[str, Tensor]:
    """``(1 - alpha) * at + alpha * ft`` for every floating tensor, in the AT tensors' dtype/device.

    ``alpha = 0`` returns clones of the AT tensors and ``alpha = 1`` of the FT tensors,
    bit-exactly. Integer buffers (BatchNorm ``num_batches_tracked``) cannot be mixed:
    they take the AT value when ``alpha < 0.5``, else the FT value.
    Raises ValueError for alpha outside [0, 1] and for key or shape mismatches (naming the key).
    """
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha: must be in [0, 1] (got {alpha})")
    missing = [k for k in state_at if k not in state_ft] + [
        k for k in state_ft if k not in state_at
    ]
    if missing:
        where = "fine-tuned" if missing[0] in state_at else "AT"
        raise ValueError(
            f"{missing[0]}: key missing from the {where} state dict ({len(missing)} mismatched keys)"
        )
    out: dict[str, Tensor] = {}
    for key, a in state_at.items():
        f = state_ft[key]
        if a.shape != f.shape:
            raise ValueError(f"{key}: shape {tuple(a.shape)} (AT) != {tuple(f.shape)} (fine-tuned)")
        f = f.to(device=a.device, dtype=a.dtype)
        if not a.is_floating_point():
            out[key] = (a if alpha < 0.5 else f).clone()
        elif alpha == 0.0:
            out[key] = a.clone()
        elif alpha == 1.0:
            out[key] = f.clone()
        else:
            out[key] = (1.0 - alpha) * a + alpha * f
    return out


@dataclass
class AlphaChoice:
    """The chosen interpolation weight. Gains and drops are in accuracy points vs the AT model.

    ``gain_interval`` / ``drop_interval``: (lo, hi) of the paired bootstrap intervals of the
    clean gain and of the robust drop, set only by
    :func:`rift_ray.rift.confidence.select_alpha_confident` when it picks an alpha > 0.
    """

    alpha: float | None
    clean_gain: float | None
    robust_drop: float | None
    feasible: bool
    reason: str
    row: dict[str, Any] | None
    gain_interval: tuple[float, float] | None = None
    drop_interval: tuple[float, float] | None = None


def select_alpha(
    rows: Sequence[Mapping[str, Any]],
    tolerance: float = 0.1,
    *,
    baseline: Mapping[str, Any] | None = None,
) -> AlphaChoice:
    """The alpha with the largest clean-accuracy gain whose robust accuracy is at most
    ``tolerance`` points below the AT model's (boundary included).

    ``rows``: dicts with ``alpha``, ``clean_acc``, ``robust_acc`` (percent, on validation).
    The AT reference is ``baseline`` (a dict with ``clean_acc``, ``robust_acc``) or else the
    row with ``alpha == 0``; ValueError if neither. Equal gains go to the smaller alpha
    (closer to the robust model). When no alpha gains clean accuracy within the
    constraint, the AT model is kept: ``alpha = 0.0``, ``feasible = True``.
    """
    if not rows:
        raise ValueError("select_alpha: no rows")
    if baseline is None:
        zero = [r for r in rows if math.isclose(float(r["alpha"]), 0.0, abs_tol=1e-12)]
        if not zero:
            raise ValueError(
                "select_alpha: no baseline: pass baseline= (AT metrics) or include a row with alpha=0"
            )
        baseline = zero[0]
    base_clean, base_rob = float(baseline["clean_acc"]), float(baseline["robust_acc"])
    feasible = [r for r in rows if float(r["robust_acc"]) >= base_rob - tolerance - _EPS]
    if not feasible:
        return AlphaChoice(
            None,
            None,
            None,
            False,
            f"no alpha keeps robust accuracy within {tolerance:g} points of the AT model",
            None,
        )
    best = min(feasible, key=lambda r: (-(float(r["clean_acc"]) - base_clean), float(r["alpha"])))
    gain = float(best["clean_acc"]) - base_clean
    drop = base_rob - float(best["robust_acc"])
    if gain <= 0:
        at_row = next((dict(r) for r in rows if float(r["alpha"]) == 0.0), None)
        return AlphaChoice(
            0.0,
            0.0,
            0.0,
            True,
            f"RiFT gives no clean gain with robust accuracy within {tolerance:g} points of AT; keeping the AT model (alpha=0)",
            at_row,
        )
    return AlphaChoice(
        float(best["alpha"]),
        gain,
        drop,
        True,
        f"alpha={float(best['alpha']):g}: clean {gain:+.2f} points, robust {-drop:+.2f} points (tolerance {tolerance:g})",
        dict(best),
    )


def best_trial(
    choices: Iterable[Mapping[str, Any]], among: Container[str] | None = None
) -> Mapping[str, Any] | None:
    """The winning trial by the paper's rule: of the feasible per-trial choices (dicts with
    ``trial``, ``alpha``, ``clean_gain``, ``robust_drop``, ``feasible``; those in ``among``
    when given), the largest clean gain; ties to the smaller robust drop, then the trial
    name, so the winner does not depend on the order in which trials finished. None when
    no trial has a feasible alpha."""
    feasible = [
        c
        for c in choices
        if c["feasible"] and c["alpha"] is not None and (among is None or c["trial"] in among)
    ]
    return min(
        feasible,
        key=lambda c: (-(c["clean_gain"] or 0.0), c["robust_drop"] or 0.0, c["trial"]),
        default=None,
    )


@dataclass
class AlphaSearch:
    """The outcome of :func:`search_alpha`: the choice, the rows measured, and how.

    ``rows``: one dict per measured alpha (``alpha`` plus the metrics), by alpha; alpha = 0
    is the baseline when one was given. ``evaluations``: calls of ``evaluate_fn``.
    ``used_grid``: the measurements were not monotone (or tied), so every alpha was evaluated.
    """

    choice: AlphaChoice
    rows: list[dict[str, Any]]
    evaluations: int
    used_grid: bool


def _monotone(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Robust accuracy non-increasing and clean accuracy non-decreasing along ``rows`` (by alpha)."""
    return all(
        float(b["robust_acc"]) <= float(a["robust_acc"])
        and float(b["clean_acc"]) >= float(a["clean_acc"])
        for a, b in zip(rows, rows[1:])
    )


def search_alpha(
    evaluate_fn: Callable[[float], Mapping[str, Any]],
    alphas: Sequence[float],
    tolerance: float = 0.1,
    baseline: Mapping[str, Any] | None = None,
) -> AlphaSearch:
    """:func:`select_alpha` over ``alphas`` with far fewer evaluations in the usual case.

    ``evaluate_fn(alpha)`` returns ``clean_acc`` and ``robust_acc`` (percent) of the
    interpolated model. ``baseline``: the AT model's metrics, which are also alpha = 0's
    (interpolate at 0 is the AT model); when None, alpha = 0 must be in ``alphas`` and is
    evaluated first.

    The usual trade-off is monotone: robust accuracy falls and clean accuracy rises
    with alpha. Then the feasible alphas (robust drop <= ``tolerance``) are a prefix of
    the grid and alpha* is its last point: a binary search finds that boundary
    (ceil(log2(len + 1)) evaluations: 4 for alphas 0.1..1.0), and the point before it
    is evaluated to rule out a tie (select_alpha gives equal gains to the smaller alpha).
    If the evaluated rows are not monotone, or that tie is there, the rest of the grid is
    evaluated. The answer is always ``select_alpha`` on the evaluated rows, and equals
    the full grid's whenever the curves are monotone; a dip between evaluated points is
    not seen (evaluate the whole grid and call select_alpha where that matters).
    """
    grid = sorted({float(a) for a in alphas})
    if not grid:
        raise ValueError("search_alpha: no alphas")
    rows: dict[float, dict[str, Any]] = {}
    if baseline is not None and grid[0] == 0.0:
        rows[0.0] = {**baseline, "alpha": 0.0}
    calls = 0

    def measure(alpha: float) -> dict[str, Any]:
        nonlocal calls
        if alpha not in rows:
            rows[alpha] = {**evaluate_fn(alpha), "alpha": alpha}
            calls += 1
        return rows[alpha]

    if baseline is None:
        if grid[0] != 0.0:
            raise ValueError("search_alpha: pass baseline= or include alpha=0 in alphas")
        baseline = measure(0.0)
    threshold = float(baseline["robust_acc"]) - tolerance - _EPS

    # Binary search; invariant: grid[:lo] feasible (alpha = 0 by definition), grid[hi:] not.
    lo, hi = (1 if grid[0] == 0.0 else 0), len(grid)
    while lo < hi:
        mid = (lo + hi) // 2
        if float(measure(grid[mid])["robust_acc"]) >= threshold:
            lo = mid + 1
        else:
            hi = mid
    last = lo - 1  # the largest feasible index (-1: none)
    tie = last >= 1 and (
        float(measure(grid[last - 1])["clean_acc"]) >= float(rows[grid[last]]["clean_acc"])
    )
    used_grid = tie or not _monotone([rows[a] for a in sorted(rows)])
    if used_grid:
        for a in grid:
            measure(a)
    ordered = [rows[a] for a in sorted(rows)]
    return AlphaSearch(
        select_alpha(ordered, tolerance, baseline=baseline), ordered, calls, used_grid
    )
