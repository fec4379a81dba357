"""``interpolate.search: clean_first``: the rule's alpha* on the full grid, with PGD only
where it decides (rift_ray.rift.clean_first), on synthetic and on real curves."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rift_ray.rift import select_alpha
from rift_ray.rift.clean_first import candidates, search_clean_first
from rift_ray.rift.confidence import select_alpha_confident

# Validation curves (alpha, clean %, PGD-10 %) of the 18 trials of docs/results.md's run
# (sweeps/cifar10-cpu.yaml, seeds 0-2; "seed:trial"); the AT model: 44.4 clean, 29.4 PGD.
AT = {"clean_acc": 44.4, "robust_acc": 29.4}
REAL = [
    ("0:all_lr0.005", [(0.25, 44.9, 29), (0.5, 45.6, 27.5), (0.75, 45.4, 25.5), (1, 46.3, 23.2)]),
    (
        "0:bn_stats_lr0",
        [(0.25, 44.2, 29.5), (0.5, 44.5, 29.7), (0.75, 44.6, 29.9), (1, 44.4, 29.8)],
    ),
    (
        "0:layer1.0.conv1_lr0.02",
        [(0.25, 44.6, 29.7), (0.5, 45.2, 29.2), (0.75, 45.5, 28), (1, 45, 25.8)],
    ),
    (
        "0:layer2.0.shortcut.0_lr0.02",
        [(0.25, 44.2, 29.1), (0.5, 44.9, 29.4), (0.75, 45.4, 29.3), (1, 45.1, 28)],
    ),
    (
        "0:layer3.0.conv1_lr0.005",
        [(0.25, 44.5, 29.4), (0.5, 45.4, 29.5), (0.75, 45.7, 29.2), (1, 45.7, 28.2)],
    ),
    (
        "0:linear_lr0.005",
        [(0.25, 44, 29.6), (0.5, 43.8, 29.2), (0.75, 44.4, 29.3), (1, 44.2, 28.7)],
    ),
    ("1:all_lr0.005", [(0.25, 44.7, 28.5), (0.5, 45.7, 27.3), (0.75, 45.9, 25.7), (1, 46.4, 22.6)]),
    ("1:bn_stats_lr0", [(0.25, 44.4, 29.3), (0.5, 44.3, 29.3), (0.75, 44.3, 29.2), (1, 44, 29.2)]),
    (
        "1:layer1.0.conv1_lr0.005",
        [(0.25, 44.4, 29.4), (0.5, 45.3, 29.4), (0.75, 45.4, 28.6), (1, 45.3, 26.7)],
    ),
    (
        "1:layer1.0.conv2_lr0.005",
        [(0.25, 44.4, 29.4), (0.5, 45, 29.3), (0.75, 45, 28.3), (1, 45.2, 27.4)],
    ),
    (
        "1:layer2.0.shortcut.0_lr0.005",
        [(0.25, 44.3, 29.3), (0.5, 44.3, 29.2), (0.75, 44.4, 29.2), (1, 44.1, 29.3)],
    ),
    ("1:linear_lr0.005", [(0.25, 44, 29.1), (0.5, 43.8, 29.1), (0.75, 43.6, 29.1), (1, 43.4, 29)]),
    ("2:all_lr0.005", [(0.25, 44.8, 29.3), (0.5, 46.4, 27.9), (0.75, 46.8, 26.1), (1, 46.4, 23.8)]),
    (
        "2:bn_stats_lr0",
        [(0.25, 44.4, 29.5), (0.5, 44.4, 29.8), (0.75, 44.4, 29.8), (1, 44.4, 29.8)],
    ),
    ("2:conv1_lr0.005", [(0.25, 44.7, 29.3), (0.5, 45.1, 28.5), (0.75, 46, 27), (1, 46.9, 26.2)]),
    (
        "2:layer1.0.conv1_lr0.005",
        [(0.25, 44.6, 30.1), (0.5, 45.6, 29.6), (0.75, 45.8, 28.3), (1, 46, 25.9)],
    ),
    (
        "2:layer2.0.shortcut.0_lr0.02",
        [(0.25, 44.3, 29.2), (0.5, 44, 29.4), (0.75, 44.6, 29.8), (1, 45.2, 28.7)],
    ),
    (
        "2:linear_lr0.005",
        [(0.25, 44.4, 29.4), (0.5, 44, 29.6), (0.75, 43.8, 29.8), (1, 43.8, 29.4)],
    ),
]


def _search(curve: dict[float, tuple[float, float]], base: dict, tol: float = 0.1):
    calls: list[float] = []

    def robust(a: float) -> dict:
        calls.append(a)
        return {"robust_acc": curve[a][1]}

    s = search_clean_first(lambda a: {"clean_acc": curve[a][0]}, robust, sorted(curve), base, tol)
    return s, calls


def _grid(curve: dict[float, tuple[float, float]], base: dict, tol: float = 0.1) -> float:
    rows = [{"alpha": 0.0, **base}] + [
        {"alpha": a, "clean_acc": c, "robust_acc": r} for a, (c, r) in curve.items()
    ]
    return float(select_alpha(rows, tol).alpha)


@pytest.mark.parametrize("name, points", REAL, ids=[n for n, _ in REAL])
def test_real_curves_give_the_grids_alpha(name: str, points: list) -> None:
    curve = {a: (c, r) for a, c, r in points}
    s, calls = _search(curve, AT)
    assert s.alpha == _grid(curve, AT)
    assert calls == s.robust_alphas and len(calls) <= len(curve)


def test_real_curves_need_half_the_pgd_points() -> None:
    """On the run's 18 trials x 4 alphas the grid measured PGD at 72 points; the search at
    34 of them (counted here, so a change in the order rule shows)."""
    used = sum(len(_search({a: (c, r) for a, c, r in p}, AT)[1]) for _, p in REAL)
    assert used == 34


def test_random_non_monotone_curves_give_the_grids_alpha() -> None:
    """Curves of any shape, with ties in clean accuracy (values on a coarse lattice): the
    search always lands where select_alpha over the whole grid does."""
    rng = random.Random(0)
    saved = 0
    for case in range(2000):
        n = rng.randint(1, 11)
        alphas = sorted(rng.sample([i / 10 for i in range(1, 11)], min(n, 10)))
        curve = {a: (rng.randint(0, 12) / 2, rng.randint(0, 12) / 2) for a in alphas}
        base = {"clean_acc": rng.randint(0, 12) / 2, "robust_acc": rng.randint(0, 12) / 2}
        tol = rng.choice([0.0, 0.1, 0.5, 1.0])
        s, calls = _search(curve, base, tol)
        assert s.alpha == _grid(curve, base, tol), (case, curve, base, tol)
        # PGD ran exactly at the alphas whose clean gain beats (or ties, at a smaller alpha)
        # the chosen one's, and at the chosen one
        gain = {a: c - base["clean_acc"] for a, (c, _) in curve.items()}
        if s.alpha > 0:
            assert calls[-1] == s.alpha
            assert all(gain[a] > gain[s.alpha] or (gain[a] == gain[s.alpha] and a < s.alpha)
                       for a in calls[:-1])  # fmt: skip
        else:
            assert calls == [a for a in sorted(curve, key=lambda a: (-gain[a], a)) if gain[a] > 0]
        saved += len(curve) - len(calls)
    assert saved > 0


def test_no_clean_gain_means_no_pgd() -> None:
    curve = {0.5: (44.0, 29.4), 1.0: (44.4, 20.0)}
    s, calls = _search(curve, AT)
    assert (s.alpha, calls) == (0.0, [])
    assert s.rows[0.5]["clean_acc"] == 44.0 and "robust_acc" not in s.rows[1.0]


def _points(rng: np.random.Generator, n: int, alphas: list[float]) -> list[dict]:
    """Per-image correctness of the AT model and of alphas that flip a few images."""
    clean0, robust0 = rng.random(n) < 0.45, rng.random(n) < 0.3
    pts = [{"alpha": 0.0, "clean": clean0, "robust": robust0}]
    for a in alphas:
        c, r = clean0.copy(), robust0.copy()
        c[rng.random(n) < 0.2 * a] = True  # clean gains grow with alpha
        r[rng.random(n) < rng.uniform(0, 0.15) * a] = False  # robust losses, noisy
        pts.append({"alpha": a, "clean": c, "robust": r})
    for p in pts:
        p["clean_acc"], p["robust_acc"] = 100 * p["clean"].mean(), 100 * p["robust"].mean()
    return pts


def test_confident_rule_gives_the_grids_alpha() -> None:
    rng = np.random.default_rng(0)
    alphas = [0.25, 0.5, 0.75, 1.0]
    picked = set()
    for _ in range(12):
        pts = _points(rng, 300, alphas)
        by = {p["alpha"]: p for p in pts}
        calls: list[float] = []

        def robust(a: float, by: dict = by, calls: list = calls) -> dict:
            calls.append(a)
            return {"robust_acc": by[a]["robust_acc"], "robust": by[a]["robust"]}

        s = search_clean_first(
            lambda a, by=by: {"clean_acc": by[a]["clean_acc"], "clean": by[a]["clean"]},
            robust, alphas, by[0.0], tolerance=2.0, rule="confident",
        )  # fmt: skip
        full = select_alpha_confident(pts, tolerance=2.0)
        assert s.alpha == full.alpha
        assert set(calls) <= set(candidates(s.rows, by[0.0], "confident"))
        picked.add(s.alpha)
    assert len(picked) > 1  # the cases exercise both outcomes


def test_unknown_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="rule: must be 'paper' or 'confident'"):
        candidates({0.5: {"clean_acc": 50.0}}, AT, "best")
