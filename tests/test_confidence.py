"""Alpha selection with paired intervals (rift_ray.rift.confidence): bits, intervals, the
noise floor, and the winner's curse of the paper's rule on 1,000 validation images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rift_ray.rift.confidence import (
    Interval,
    confirm,
    noise_floor,
    pack,
    paired_interval,
    select_alpha_confident,
    unpack,
)
from rift_ray.rift.interpolate import AlphaChoice, select_alpha

N = 1000
CLEAN_AT, ROBUST_AT = 820, 530  # the AT model: images 0..819 clean-correct, 0..529 robust-correct


def correct(n_right: int, up: int = 0, down: int = 0, n: int = N) -> np.ndarray:
    """Images 0..n_right-1 correct, then ``up`` wrong images (from n_right on) flipped to
    correct and ``down`` correct images (from 0 on) flipped to wrong: accuracy changes by
    100 * (up - down) / n points against ``correct(n_right)``."""
    v = np.zeros(n, dtype=bool)
    v[:n_right] = True
    v[n_right : n_right + up] = True
    v[:down] = False
    return v


def point(alpha: float, clean: tuple[int, int], robust: tuple[int, int]) -> dict:
    """alpha's per-image vectors vs the AT model: clean (up, down), robust (better, worse)."""
    c, r = correct(CLEAN_AT, *clean), correct(ROBUST_AT, *robust)
    return {"alpha": alpha, "clean_acc": 100 * c.mean(), "robust_acc": 100 * r.mean(),
            "clean": c, "robust": r}  # fmt: skip


AT = point(0.0, (0, 0), (0, 0))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_unpack_round_trip(n: int) -> None:
    v = (np.arange(n) * 7919 % 3 == 0) & (np.arange(n) % 5 != 1)
    data = pack(v)
    assert len(data) == (n + 7) // 8
    assert np.array_equal(unpack(data, n), v) and unpack(data, n).dtype == np.bool_
    assert np.array_equal(unpack(pack(torch.from_numpy(v)), n), v)
    assert unpack(pack(np.zeros(0, dtype=bool)), 0).shape == (0,)
    with pytest.raises(ValueError, match="bytes"):
        unpack(data + b"\0", n)
    with pytest.raises(ValueError, match="bool"):
        pack(v.astype(np.uint8))


def test_paired_interval_known_case() -> None:
    a = correct(700)
    b = correct(700, up=30, down=10)  # +20 images of 1000: +2.0 points
    iv = paired_interval(a, b)
    assert isinstance(iv, Interval) and iv.n == N
    assert iv.diff == 2.0 and iv.lo < 2.0 < iv.hi and iv.lo > 0
    d = b.astype(float) - a.astype(float)
    normal_width = 2 * 1.96 * 100 * d.std() / np.sqrt(N)
    assert iv.hi - iv.lo == pytest.approx(normal_width, rel=0.15)
    assert iv.method == "paired bootstrap over images, 2000 resamples, percentile 95%"
    assert paired_interval(b, a).diff == -2.0  # b minus a, signed


def test_paired_interval_is_deterministic_for_a_seed() -> None:
    a, b = correct(700), correct(700, up=30, down=10)
    assert paired_interval(a, b, seed=3) == paired_interval(a, b, seed=3)
    # Bool inputs put the ends on a 0.1-point grid; continuous scores show the seed at work.
    fa, fb = np.linspace(0, 1, N), np.linspace(0, 1, N)[::-1] ** 2
    assert paired_interval(fa, fb, seed=3) != paired_interval(fa, fb, seed=4)
    assert paired_interval(torch.from_numpy(a), torch.from_numpy(b)) == paired_interval(a, b)


def test_paired_interval_degenerate_and_float_inputs() -> None:
    a = correct(700)
    iv = paired_interval(a, a.copy())
    assert (iv.diff, iv.lo, iv.hi) == (0.0, 0.0, 0.0)
    # Fractions of 15 corruption cells classified correctly, per image.
    fa = (np.arange(N) % 16) / 15.0
    fa = np.minimum(fa, 1.0)
    fb = np.minimum(fa + np.where(np.arange(N) % 4 == 0, 2 / 15, 0.0), 1.0)
    iv = paired_interval(fa, fb, level=0.9, resamples=500)
    assert iv.diff == pytest.approx(100 * (fb.mean() - fa.mean()))
    assert 0 < iv.lo < iv.diff < iv.hi
    assert iv.method == "paired bootstrap over images, 500 resamples, percentile 90%"


def test_paired_interval_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="1000 images, b has 999"):
        paired_interval(correct(700), correct(700)[:-1])
    with pytest.raises(ValueError, match="no images"):
        paired_interval(np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        paired_interval(np.full(3, 2.0), np.zeros(3))


def test_noise_floor() -> None:
    assert noise_floor(1000) == 0.6
    assert noise_floor(5000) == pytest.approx(0.12)
    assert noise_floor(1000, level=0.99) == pytest.approx(0.8)  # 2 * 0.5**8 < 0.01 <= 2 * 0.5**7


# The winner's curse. Every alpha truly loses 0.5 to 1.0 point of robust accuracy; alpha
# 0.6's measured drop is 0.1 by chance (30 images worse, 29 better) and its clean gain is
# the largest. Alpha 0.1 barely moves: its robust predictions equal the AT model's.
CURSED = [
    AT,
    point(0.2, clean=(15, 5), robust=(20, 25)),  # +1.0 clean, drop 0.5
    point(0.4, clean=(22, 7), robust=(25, 32)),  # +1.5, drop 0.7
    point(0.6, clean=(28, 8), robust=(29, 30)),  # +2.0, drop 0.1 (lucky)
    point(0.8, clean=(25, 7), robust=(30, 40)),  # +1.8, drop 1.0
]
SAFE = point(0.1, clean=(10, 0), robust=(0, 0))  # +1.0, drop 0 on every image


def test_winners_curse_paper_rule_picks_the_lucky_alpha_the_confident_rule_does_not() -> None:
    rows = [{k: p[k] for k in ("alpha", "clean_acc", "robust_acc")} for p in CURSED]
    paper = select_alpha(rows, tolerance=0.1)
    assert paper.alpha == 0.6 and paper.clean_gain == pytest.approx(2.0)
    assert paper.robust_drop == pytest.approx(0.1)

    kept = select_alpha_confident(CURSED, tolerance=0.1)
    assert isinstance(kept, AlphaChoice)
    assert (kept.alpha, kept.clean_gain, kept.robust_drop, kept.feasible) == (0.0, 0.0, 0.0, True)
    assert kept.gain_interval is None and kept.drop_interval is None
    assert "keeping the AT model (alpha=0)" in kept.reason and "drop upper bound" in kept.reason
    assert "\n" not in kept.reason and "1000 images resolve no less than 0.6 points" in kept.reason
    assert kept.row is not None and "clean" not in kept.row  # no per-image vectors in the row

    # With an alpha whose robust predictions do not move, the paper rule still takes the
    # lucky 0.6; the confident rule takes the safe alpha.
    with_safe = [*CURSED, SAFE]
    rows = [{k: p[k] for k in ("alpha", "clean_acc", "robust_acc")} for p in with_safe]
    assert select_alpha(rows, tolerance=0.1).alpha == 0.6
    choice = select_alpha_confident(with_safe, tolerance=0.1)
    assert choice.alpha == 0.1 and choice.robust_drop == 0.0 and choice.drop_interval == (0, 0)


def test_confident_rule_picks_a_clearly_good_alpha_with_its_intervals() -> None:
    points = [
        AT,
        point(0.5, clean=(40, 5), robust=(0, 0)),
        point(0.7, clean=(50, 5), robust=(0, 0)),
    ]
    c = select_alpha_confident(points, tolerance=0.1)
    assert c.alpha == 0.7 and c.feasible and c.clean_gain == 4.5 and c.robust_drop == 0.0
    assert c.gain_interval is not None and 0 < c.gain_interval[0] < 4.5 < c.gain_interval[1]
    assert c.drop_interval == (0.0, 0.0)
    assert c.reason.startswith("confident rule: alpha=0.7: clean +4.50 [")
    assert c.row == {k: points[2][k] for k in ("alpha", "clean_acc", "robust_acc")}
    # Ties go to the smaller alpha.
    tie = [AT, point(0.5, (50, 5), (0, 0)), point(0.3, (50, 5), (0, 0))]
    assert select_alpha_confident(tie).alpha == 0.3


def test_confident_rule_needs_the_at_model_and_consistent_rows() -> None:
    with pytest.raises(ValueError, match="alpha=0"):
        select_alpha_confident(CURSED[1:])
    bad = {**CURSED[1], "clean_acc": 90.0}
    with pytest.raises(ValueError, match="clean_acc 90"):
        select_alpha_confident([AT, bad])


def test_confirm_on_held_out_images() -> None:
    n = 5000
    at = {"clean": correct(4100, n=n), "robust": correct(2650, n=n)}
    good = {"clean": correct(4100, 80, 20, n=n), "robust": correct(2650, 20, 20, n=n)}
    ok = confirm(at, good, tolerance=0.1)
    assert ok["confirmed"] and ok["reason"].startswith("confirmed: clean +1.20")
    assert ok["clean_gain"]["diff"] == 1.2 and ok["robust_drop"]["diff"] == 0.0
    assert ok["robust_drop"]["lo"] <= 0.1 and ok["clean_gain"]["n"] == n
    # The lucky alpha on test: its drop is 1.0 point, clearly above the tolerance.
    cursed = {"clean": correct(4100, 80, 20, n=n), "robust": correct(2650, 30, 80, n=n)}
    bad = confirm(at, cursed, tolerance=0.1)
    assert not bad["confirmed"] and bad["robust_drop"]["diff"] == 1.0
    assert bad["robust_drop"]["lo"] > 0.1
    assert bad["reason"].startswith("not confirmed (robust drop significantly above 0.1)")
