"""Stage 4: interpolate AT and fine-tuned weights, then choose alpha.

theta(alpha) = (1 - alpha) * theta_AT + alpha * theta_FT     (whole state dict, BN stats included)

rows = [{"alpha": a, **metrics(interpolate(at, ft, a))} for a in alphas]
choice = select_alpha(rows, tolerance=0.1)       # largest clean gain, robust drop <= 0.1 point
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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
    """The chosen interpolation weight. Gains and drops are in accuracy points vs the AT model."""

    alpha: float | None
    clean_gain: float | None
    robust_drop: float | None
    feasible: bool
    reason: str
    row: dict[str, Any] | None


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
