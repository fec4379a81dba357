"""Choosing alpha with its noise in view: paired intervals over images (issue 21).

The paper's rule (:func:`rift_ray.rift.interpolate.select_alpha`) maximises the clean gain
under "robust drop <= 0.1 point" measured on ~1,000 validation images, where a paired
difference is noisy by several tenths of a point: the winner is the alpha whose drop was
most under-estimated, and on test its drop is larger (the winner's curse). Here each
alpha is compared with the AT model (alpha = 0) image by image, and only alphas whose
bootstrap interval clears the constraint qualify:

    points = [{"alpha": a, "clean": clean_correct(a), "robust": robust_correct(a)}
              for a in (0.0, 0.1, 0.2, 0.3)]               # per-image bools, validation images
    choice = select_alpha_confident(points, tolerance=0.1)  # an AlphaChoice, like select_alpha's
    check = confirm(test_at, test_chosen, tolerance=0.1)    # the same dicts on held-out images
    noise_floor(1000)                                       # 0.6 points: the finest resolvable

Per-image vectors (bool, one entry per image, the same images in the same order for every
model) travel compactly as bits: :func:`pack` / :func:`unpack`. All accuracies, gains,
drops and interval ends are in percent points. numpy only (torch tensors are accepted);
no Ray, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from rift_ray.rift.interpolate import AlphaChoice

_EPS = 1e-9  # float slack for comparisons with the tolerance (points)
_CHUNK_CELLS = 1_000_000  # resampled indices drawn at once: 8 MB of int64, 8 MB of gathered values


def _as_array(x: Any, name: str) -> NDArray[Any]:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be 1-D (one entry per image), got shape {arr.shape}")
    return arr


def pack(correct: NDArray[np.bool_] | torch.Tensor) -> bytes:
    """Per-image correctness (bool, 1-D, length n) as ceil(n / 8) bytes, bit i = image i
    (little bit order within each byte; padding bits are 0). Inverse: :func:`unpack`."""
    arr = _as_array(correct, "pack")
    if arr.dtype != np.bool_:
        raise ValueError(f"pack: expects a bool array, got dtype {arr.dtype}")
    return np.packbits(arr, bitorder="little").tobytes()


def unpack(data: bytes, n: int) -> NDArray[np.bool_]:
    """The n bools packed by :func:`pack`. ValueError when ``data`` is not ceil(n / 8) bytes
    or a padding bit is set (the wrong n, or not a packed vector)."""
    if n < 0 or len(data) != (n + 7) // 8:
        raise ValueError(f"unpack: {len(data)} bytes cannot hold n={n} bits (need {(n + 7) // 8})")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[n:].any():
        raise ValueError(f"unpack: padding bits beyond n={n} are set (wrong n?)")
    return bits[:n].astype(np.bool_)


@dataclass(frozen=True)
class Interval:
    """A paired difference in points and its bootstrap interval.

    ``diff``: 100 * (mean(b) - mean(a)); ``lo``, ``hi``: its interval; ``n``: images;
    ``method``: how the interval was made, in words.
    """

    diff: float
    lo: float
    hi: float
    n: int
    method: str


def paired_interval(
    a: NDArray[Any] | torch.Tensor,
    b: NDArray[Any] | torch.Tensor,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """The difference of two models' accuracies on the same images, b minus a, in points,
    with its paired percentile bootstrap interval.

    ``a``, ``b``: per-image scores, image i of ``a`` and of ``b`` the same image: bool
    correctness, or floats in [0, 1] (e.g. the fraction of corruption cells in which an
    image is classified correctly). Images are resampled with replacement, the same
    indices for a and b (done by resampling the per-image difference d = b - a);
    ``lo``, ``hi`` are the (1 - level) / 2 and (1 + level) / 2 percentiles of the
    ``resamples`` resampled mean differences. Deterministic for a given ``seed``; memory
    stays near 16 MB whatever n. When a == b on every image the interval is [0, 0].
    ValueError for different lengths, no images, values outside [0, 1], level outside
    (0, 1) or resamples < 1.
    """
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if len(x) != len(y):
        raise ValueError(f"paired_interval: a has {len(x)} images, b has {len(y)}")
    n = len(x)
    if n < 1:
        raise ValueError("paired_interval: no images (n = 0)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_interval: level must be in (0, 1) (got {level})")
    if resamples < 1:
        raise ValueError(f"paired_interval: resamples must be >= 1 (got {resamples})")
    d = y.astype(np.float64) - x.astype(np.float64)
    for name, v in (("a", x), ("b", y)):
        if v.dtype != np.bool_ and not (np.all(v >= 0.0) and np.all(v <= 1.0)):
            raise ValueError(f"paired_interval: {name} has values outside [0, 1] (or NaN)")
    method = f"paired bootstrap over images, {resamples} resamples, percentile {100 * level:g}%"
    if not d.any():
        return Interval(0.0, 0.0, 0.0, n, method)
    rng = np.random.default_rng(seed)
    rows = max(1, min(resamples, _CHUNK_CELLS // n))
    means = np.empty(resamples)
    for start in range(0, resamples, rows):
        k = min(rows, resamples - start)
        means[start : start + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
    lo, hi = np.percentile(100.0 * means, [50.0 * (1 - level), 50.0 * (1 + level)])
    diff = 100.0 * float(d.sum()) / n  # exact for counts: 100 * 20 / 1000 == 2.0
    return Interval(diff, float(lo), float(hi), n, method)


def _drop(change: Interval) -> Interval:
    """The robust drop (AT minus alpha) from the robust change (alpha minus AT)."""
    return Interval(-change.diff + 0.0, -change.hi + 0.0, -change.lo + 0.0, change.n, change.method)


def noise_floor(n: int, level: float = 0.95) -> float:
    """The smallest accuracy difference, in points, that a paired comparison on n images
    can resolve at all at ``level``.

    With k discordant images (right for one model, wrong for the other) all in the same
    direction, the two-sided exact sign test (McNemar) has p = 2 * 0.5**k; the floor is
    100 * k_min / n with k_min the smallest k with p < 1 - level (6 at 95%). It is a
    lower bound: discordant images in both directions leave the difference the same and
    only raise the p-value. n = 1000 -> 0.6 points, n = 5000 -> 0.12.
    """
    if n < 1:
        raise ValueError(f"noise_floor: n must be >= 1 (got {n})")
    if not 0.0 < level < 1.0:
        raise ValueError(f"noise_floor: level must be in (0, 1) (got {level})")
    k = 1
    while 2.0 * 0.5**k >= 1.0 - level:
        k += 1
    return 100.0 * k / n


def _is_zero(alpha: Any) -> bool:
    return math.isclose(float(alpha), 0.0, abs_tol=1e-12)


def _plain_row(point: Mapping[str, Any]) -> dict[str, Any]:
    """The point without its per-image vectors, so it stays a small, serialisable row."""
    return {k: v for k, v in point.items() if not isinstance(v, np.ndarray | torch.Tensor)}


def _check_accuracy(point: Mapping[str, Any], key: str, vector: str) -> None:
    """A stated accuracy must be the per-image vector's (within rounding): catches vectors
    from another split, model or attack than the row's numbers."""
    if key not in point:
        return
    measured = 100.0 * float(np.mean(_as_array(point[vector], vector)))
    if abs(float(point[key]) - measured) > 0.05:
        raise ValueError(
            f"alpha={float(point['alpha']):g}: {key} {float(point[key]):g} but the per-image "
            f"'{vector}' vector gives {measured:.2f}"
        )


def select_alpha_confident(
    points: Sequence[Mapping[str, Any]],
    tolerance: float = 0.1,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> AlphaChoice:
    """The paper's alpha rule with the validation noise taken into account.

    ``points``: dicts with ``alpha``, per-image ``clean`` and ``robust`` bool vectors (the
    same validation images, same order, for every alpha) and optionally ``clean_acc``,
    ``robust_acc`` (percent; ValueError if they disagree with the vectors by > 0.05).
    One point must have alpha == 0, the AT model (ValueError if none).

    For each alpha > 0, :func:`paired_interval` vs alpha 0 (``level``, ``resamples``,
    ``seed``) of the clean gain (alpha minus AT) and of the robust drop (AT minus alpha).
    An alpha qualifies when the drop interval's upper end is <= ``tolerance`` and the gain
    interval's lower end is > 0. Of those, the largest clean gain (point estimate) wins,
    ties to the smaller alpha; ``gain_interval`` and ``drop_interval`` are set. None
    qualifies: the AT model is kept (alpha 0.0, feasible True, gain and drop 0.0) and the
    reason names the closest candidate and what failed. With a two-sided ``level``
    interval each check is one-sided at (1 + level) / 2; the intervals are per alpha, not
    corrected for the number of alphas.
    """
    zero = [p for p in points if _is_zero(p["alpha"])]
    if not zero:
        raise ValueError("select_alpha_confident: no point with alpha=0 (the AT model)")
    at = zero[0]
    for p in points:
        _check_accuracy(p, "clean_acc", "clean")
        _check_accuracy(p, "robust_acc", "robust")
    opts: dict[str, Any] = {"level": level, "resamples": resamples, "seed": seed}
    scored = []  # (alpha, gain, drop, qualifies, point)
    for p in sorted((p for p in points if not _is_zero(p["alpha"])), key=lambda p: p["alpha"]):
        gain = paired_interval(at["clean"], p["clean"], **opts)
        drop = _drop(paired_interval(at["robust"], p["robust"], **opts))
        ok = drop.hi <= tolerance + _EPS and gain.lo > 0.0
        scored.append((float(p["alpha"]), gain, drop, ok, p))
    at_row = _plain_row(at)
    if not scored:
        reason = "confident rule: no alpha > 0 to compare; keeping the AT model (alpha=0)"
        return AlphaChoice(0.0, 0.0, 0.0, True, reason, at_row)
    winners = [s for s in scored if s[3]]
    if winners:
        alpha, gain, drop, _, p = min(winners, key=lambda s: (-s[1].diff, s[0]))
        reason = (
            f"confident rule: alpha={alpha:g}: clean {gain.diff:+.2f} [{gain.lo:+.2f}, "
            f"{gain.hi:+.2f}] points, robust drop {drop.diff:.2f} [{drop.lo:.2f}, {drop.hi:.2f}] "
            f"(tolerance {tolerance:g}, {100 * level:g}%, n={gain.n})"
        )
        intervals = (gain.lo, gain.hi), (drop.lo, drop.hi)
        return AlphaChoice(alpha, gain.diff, drop.diff, True, reason, _plain_row(p), *intervals)
    # The closest miss: the best gain among drops within tolerance, else the smallest drop bound.
    drop_ok = [s for s in scored if s[2].hi <= tolerance + _EPS]
    if drop_ok:
        alpha, gain, drop, _, _ = min(drop_ok, key=lambda s: (-s[1].lo, s[0]))
        failed = f"clean gain lower bound {gain.lo:+.2f}, drop upper bound {drop.hi:.2f}"
    else:
        alpha, gain, drop, _, _ = min(scored, key=lambda s: (s[2].hi, s[0]))
        failed = f"drop upper bound {drop.hi:.2f}, clean gain lower bound {gain.lo:+.2f}"
    floor = noise_floor(gain.n, level)
    note = f"; {gain.n} images resolve no less than {floor:.2g} points" if tolerance < floor else ""
    reason = (
        f"confident rule: no alpha's robust drop is within {tolerance:g} points at "
        f"{100 * level:g}% with a clean gain above 0 (closest alpha={alpha:g}: {failed}){note}; "
        "keeping the AT model (alpha=0)"
    )
    return AlphaChoice(0.0, 0.0, 0.0, True, reason, at_row)


def confirm(
    at: Mapping[str, Any],
    chosen: Mapping[str, Any],
    tolerance: float = 0.1,
    *,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Check a chosen alpha on held-out images that selection never saw.

    ``at``, ``chosen``: dicts with per-image ``clean`` and ``robust`` bool vectors of the
    AT model and of the chosen alpha on the same held-out images. Computes the paired
    intervals (:func:`paired_interval`) of the clean gain (chosen minus AT) and of the
    robust drop (AT minus chosen), in points. Confirmed when the drop is not significantly
    above the tolerance (drop interval's lower end <= ``tolerance``) and the gain is not
    significantly below 0 (gain interval's upper end >= 0): a failure is evidence against
    the choice, a confirmation only the absence of such evidence.

    Returns ``{"confirmed": bool, "clean_gain": {diff, lo, hi, n, method},
    "robust_drop": {diff, lo, hi, n, method}, "reason": one line}``.
    """
    opts: dict[str, Any] = {"level": level, "resamples": resamples, "seed": seed}
    gain = paired_interval(at["clean"], chosen["clean"], **opts)
    drop = _drop(paired_interval(at["robust"], chosen["robust"], **opts))
    drop_ok = drop.lo <= tolerance + _EPS
    gain_ok = gain.hi >= -_EPS
    numbers = (
        f"clean {gain.diff:+.2f} [{gain.lo:+.2f}, {gain.hi:+.2f}], robust drop {drop.diff:.2f} "
        f"[{drop.lo:.2f}, {drop.hi:.2f}] points on {gain.n} held-out images "
        f"(tolerance {tolerance:g}, {100 * level:g}%)"
    )
    failures = [
        *([] if drop_ok else [f"robust drop significantly above {tolerance:g}"]),
        *([] if gain_ok else ["clean gain significantly below 0"]),
    ]
    reason = (
        f"confirmed: {numbers}"
        if not failures
        else f"not confirmed ({' and '.join(failures)}): {numbers}"
    )
    return {
        "confirmed": drop_ok and gain_ok,
        "clean_gain": asdict(gain),
        "robust_drop": asdict(drop),
        "reason": reason,
    }
