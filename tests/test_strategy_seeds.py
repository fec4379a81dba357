"""Module-selection strategies over the seeds of a ``seeds`` sweep: mean ± std per strategy,
the paired difference primary - strategy with its 95% Student t interval, and how the
printed summary, the report and W&B show them (no Ray; numbers checked by hand)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from rift_ray.aggregate import (
    T_975,
    diff_text,
    mean_ci95,
    seeds_summary,
    strategies_over_seeds,
    strategy_seed_cells,
    strategy_seed_rows,
    t_975,
)
from rift_ray.cli import print_summary
from rift_ray.report import render_html
from rift_ray.results import SweepResults
from rift_ray.store import Store

T2 = math.sqrt(1.805 / 0.0975)  # t_{0.975, 2}: 1/2 + t / (2 sqrt(2 + t^2)) = 0.975
T1 = math.tan(math.pi * 0.475)  # t_{0.975, 1}: the Cauchy quantile


def row(strategy: str, clean: float, robust: float | None, corr: float | None, **kw: Any) -> dict:
    """One seed's strategy comparison row (rift_ray.stages.selection.compare_strategies)."""
    return {
        "strategy": strategy,
        "primary": strategy == "lowest",
        "modules": kw.get("modules", "layer2.1.conv2"),
        "trial": f"{strategy}_t",
        "lr": 0.01,
        "alpha": kw.get("alpha", 0.5),
        "clean_gain_val": 1.0,
        "robust_drop_val": 0.0,
        "val_clean_acc": clean - 1,
        "val_robust_acc": robust,
        "val_corruption_acc": None,
        "test_clean_acc": clean,
        "test_robust_acc": robust,
        "test_corruption_acc": corr,
    }


def seed(s: int, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A seed's summary: AT test clean 80 + s, PGD 40, corruption 60 + s; RiFT = lowest."""
    at = {"clean_acc": 80.0 + s, "robust_acc": 40.0, "corruption_acc": 60.0 + s}
    low = next(r for r in rows if r["strategy"] == "lowest")
    rift = {k: low[f"test_{k}"] for k in ("clean_acc", "robust_acc", "corruption_acc")}
    return {
        "name": "x", "seed": s, "modules": ["layer2.1.conv2"], "lr": 0.01, "trial": "lowest_t",
        "alpha": low["alpha"], "clean_gain_val": 1.0, "robust_drop_val": 0.0, "primary": "lowest",
        "at": {"val": {"clean_acc": 79.0 + s, "robust_acc": 40.0}, "test": at},
        "rift": {"val": {"clean_acc": rift["clean_acc"] - 1}, "test": rift},
        "strategies": rows, "failures": [], "seconds": {"total": 1.0},
    }  # fmt: skip


# test clean: lowest 82 84 86 (over AT 2 3 4), random 81 82 86 (1 1 4), highest 79 80 (-1 -1)
# test PGD:   lowest 40 40.5 39.5, random 39 40 39.5, highest 38 and None (no figure)
# corruption: lowest 62 63 64 (over AT 2 2 2), random 61 61 61, highest never measured
PER_SEED = [
    seed(0, [row("lowest", 82, 40.0, 62, alpha=0.5), row("random", 81, 39.0, 61),
             row("highest", 79, 38.0, None)]),
    seed(1, [row("lowest", 84, 40.5, 63, alpha=0.7), row("random", 82, 40.0, 61),
             row("highest", 80, None, None)]),
    seed(2, [row("lowest", 86, 39.5, 64, alpha=0.9), row("random", 86, 39.5, 61)]),
]  # fmt: skip


def summary_of(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    seeds = [s["seed"] for s in per_seed]
    return seeds_summary({"name": "x", "seed": 0, "seeds": seeds}, per_seed, {"total": 3.0})


def test_t_quantiles() -> None:
    assert len(T_975) == 30
    assert t_975(1) == pytest.approx(T1, rel=1e-14) and t_975(2) == pytest.approx(T2, rel=1e-14)
    assert t_975(2) == pytest.approx(4.302652729911275, rel=1e-9)  # the usual 10-digit value
    assert t_975(30) == pytest.approx(2.042272456301238, rel=1e-14)
    assert list(T_975) == sorted(T_975, reverse=True)
    # beyond the table: within 2e-6 of the exact quantile, toward the normal 1.959964
    assert t_975(31) == pytest.approx(2.039513446396408, abs=2e-6)
    assert t_975(100) == pytest.approx(1.9839715185235518, abs=1e-7)
    assert t_975(31) < t_975(30) and t_975(10**6) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError):
        t_975(0)


def test_mean_ci95_by_hand() -> None:
    ci = mean_ci95([1.0, 2.0, 0.0])  # mean 1, sample std 1, n 3
    assert (ci["mean"], ci["std"], ci["n"]) == (1.0, 1.0, 3)
    assert ci["ci95"] == pytest.approx([1 - T2 / math.sqrt(3), 1 + T2 / math.sqrt(3)], rel=1e-14)
    assert mean_ci95([2.0]) == {"mean": 2.0, "std": None, "n": 1, "ci95": None}
    assert mean_ci95([2.0, 2.0])["ci95"] == [2.0, 2.0]


def test_strategies_mean_std_count_and_paired_differences() -> None:
    st = summary_of(PER_SEED)["strategies"]
    assert st["primary"] == "lowest"
    rows = {r["strategy"]: r for r in st["rows"]}
    assert list(rows) == ["lowest", "random", "highest"]  # configured order
    low, rnd, high = rows["lowest"], rows["random"], rows["highest"]
    assert (low["primary"], rnd["primary"]) == (True, False)
    assert (low["n"], rnd["n"], high["n"]) == (3, 3, 2)  # highest missing in seed 2
    # lowest: accuracy 82 84 86 -> 84 +- 2; over AT 2 3 4 -> 3 +- 1; alpha 0.7 +- 0.2
    assert low["mean"]["rift"]["test"]["clean_acc"] == 84.0
    assert low["std"]["rift"]["test"]["clean_acc"] == 2.0
    delta = (low["mean"]["delta"]["test"], low["std"]["delta"]["test"])
    assert (delta[0]["clean_acc"], delta[1]["clean_acc"]) == (3.0, 1.0)
    assert (low["mean"]["alpha"], low["std"]["alpha"]) == (pytest.approx(0.7), pytest.approx(0.2))
    assert (delta[0]["corruption_acc"], delta[1]["corruption_acc"]) == (2.0, 0.0)
    assert low["count"]["delta"]["test"]["robust_acc"] == 3
    assert low["std"]["delta"]["test"]["robust_acc"] == pytest.approx(0.5)  # 0, 0.5, -0.5
    # random: over AT 1 1 4 -> 2 +- sqrt(3)
    assert rnd["mean"]["delta"]["test"]["clean_acc"] == 2.0
    assert rnd["std"]["delta"]["test"]["clean_acc"] == pytest.approx(math.sqrt(3))
    # highest: two seeds (count 2), PGD once (the None skipped: count 1, std None)
    assert high["count"]["rift"]["test"]["clean_acc"] == 2
    assert high["mean"]["delta"]["test"]["clean_acc"] == -1.0
    assert high["count"]["rift"]["test"]["robust_acc"] == 1
    assert high["std"]["rift"]["test"]["robust_acc"] is None
    assert "corruption_acc" not in high["mean"]["rift"]["test"]
    assert low["mean"]["rift"]["val"]["clean_acc"] == 83.0  # val figures too

    paired = {(p["strategy"], p["metric"]): p for p in st["paired"]}
    assert set(paired) == {
        ("random", "test_clean_acc"),
        ("random", "test_robust_acc"),
        ("random", "test_corruption_acc"),
        ("highest", "test_clean_acc"),
        ("highest", "test_robust_acc"),
    }  # fmt: skip  (highest has no corruption figure: no pair)
    assert all(p["vs"] == "lowest" for p in paired.values())
    # lowest - random, clean: 1, 2, 0 -> 1 +- 1, 1 +- t_{.975,2} / sqrt(3)
    p = paired[("random", "test_clean_acc")]
    assert (p["mean"], p["std"], p["n"]) == (1.0, 1.0, 3)
    half = 4.302652729749464 / math.sqrt(3)
    assert p["ci95"] == pytest.approx([1 - half, 1 + half], rel=1e-14)
    # PGD: 1, 0.5, 0 -> 0.5 +- 0.5; corruption: 1, 2, 3 -> 2 +- 1
    p = paired[("random", "test_robust_acc")]
    assert (p["mean"], p["std"]) == (0.5, 0.5)
    assert p["ci95"] == pytest.approx([0.5 - 0.5 * half, 0.5 + 0.5 * half], rel=1e-14)
    p = paired[("random", "test_corruption_acc")]
    assert (p["mean"], p["std"]) == (2.0, 1.0)
    assert p["ci95"] == pytest.approx([2 - half, 2 + half], rel=1e-14)
    # lowest - highest, clean: 3, 4 (seeds 0, 1 only) -> 3.5 +- sqrt(0.5), t with 1 df
    p = paired[("highest", "test_clean_acc")]
    assert (p["mean"], p["n"]) == (3.5, 2) and p["std"] == pytest.approx(math.sqrt(0.5))
    assert p["ci95"] == pytest.approx([3.5 - T1 * 0.5, 3.5 + T1 * 0.5], rel=1e-12)
    # PGD: measured on seed 0 only -> n 1, no std, no interval
    p = paired[("highest", "test_robust_acc")]
    assert p == {"strategy": "highest", "vs": "lowest", "metric": "test_robust_acc",
                 "mean": 2.0, "std": None, "n": 1, "ci95": None}  # fmt: skip


def test_one_seed_has_no_intervals_and_one_strategy_no_comparison() -> None:
    st = summary_of(PER_SEED[:1])["strategies"]
    assert all(p["n"] == 1 and p["ci95"] is None and p["std"] is None for p in st["paired"])
    assert all(r["std"]["rift"]["test"]["clean_acc"] is None for r in st["rows"])
    only = [{**s, "strategies": s["strategies"][:1]} for s in PER_SEED]
    assert "strategies" not in summary_of(only)  # the default [lowest]: nothing to compare
    before = [{k: v for k, v in s.items() if k != "strategies"} for s in PER_SEED]
    assert strategies_over_seeds(before) is None  # summaries from before finetune.strategies
    assert strategy_seed_rows(summary_of(only)) == []


def test_text_rows_and_diff_text() -> None:
    assert diff_text(0.31, 0.2, [-0.19, 0.81]) == "+0.31 ± 0.20 [-0.19, +0.81]"
    assert diff_text(-1.0, None, None, 1) == "-1.00 (n=1)"
    assert diff_text(None, 1.0) == "-"
    s = summary_of(PER_SEED)
    rows = strategy_seed_rows(s)
    # 3 strategies x (clean, PGD, corruption): corruption shown, measured by some strategy
    assert [(r["strategy"], r["metric"]) for r in rows][:3] == [
        ("lowest", "clean_acc"), ("lowest", "robust_acc"), ("lowest", "corruption_acc"),
    ]  # fmt: skip
    assert len(rows) == 9
    rnd = next(r for r in rows if (r["strategy"], r["metric"]) == ("random", "clean_acc"))
    assert (rnd["diff_mean"], rnd["diff_n"], rnd["vs"]) == (1.0, 3, "lowest")
    assert rnd["ci95_lo"] == pytest.approx(1 - 4.302652729749464 / math.sqrt(3))
    cells = strategy_seed_cells(s)
    assert cells[0] == {
        "strategy": "lowest (primary)",
        "metric": "clean",
        "accuracy": "84.00 ± 2.00",
        "change over AT": "+3.00 ± 1.00 (n=3)",
        "lowest - strategy [95% CI]": "",
    }
    by = {(c["strategy"], c["metric"]): c for c in cells}
    col = "lowest - strategy [95% CI]"
    assert by[("random", "clean")][col] == "+1.00 ± 1.00 [-1.48, +3.48] (n=3)"
    assert by[("highest", "clean")][col] == "+3.50 ± 0.71 [-2.85, +9.85] (n=2)"  # 1 df
    assert by[("highest", "PGD")][col] == "+2.00 (n=1)"
    assert by[("highest", "corruption")]["change over AT"] == "-"


def test_printed_summary_shows_the_strategy_table(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per table row
    print_summary(summary_of(PER_SEED))
    out = capsys.readouterr().out
    assert "Module selection strategies" in out and "95% t interval" in out
    line = next(ln for ln in out.splitlines() if "random" in ln and "clean" in ln)
    assert "+2.00 ± 1.73 (n=3)" in line and "+1.00 ± 1.00 [-1.48, +3.48] (n=3)" in line
    assert "lowest (primary)" in out
    print_summary(summary_of([{**s, "strategies": s["strategies"][:1]} for s in PER_SEED]))
    assert "Module selection strategies" not in capsys.readouterr().out


def test_report_shows_the_strategy_table(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path), "x")
    res = SweepResults(
        store, config={"name": "x", "seeds": [0, 1, 2]}, summary=summary_of(PER_SEED)
    )
    html = render_html(res)
    assert "<h2>Module selection strategies</h2>" in html
    assert "lowest - strategy [95% CI]" in html
    assert "+1.00 ± 1.00 [-1.48, +3.48] (n=3)" in html and "+3.00 ± 1.00 (n=3)" in html
    assert "<details><summary>Per seed</summary>" in html and "highest" in html


def test_wandb_logs_the_strategy_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wandb_offline import offline_run_dirs, read_offline_run

    from rift_ray.config import SweepConfig
    from rift_ray.tracking import Tracker

    wb = tmp_path / "wb"
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(wb))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(var, raising=False)
    cfg = SweepConfig.model_validate({"name": "w", "storage": str(tmp_path), "seeds": [0, 1, 2]})
    t = Tracker(cfg, Store.open(str(tmp_path), "w"))
    t.log_seeds(summary_of(PER_SEED))
    t.finish()
    (run,) = [read_offline_run(d, wait=30) for d in offline_run_dirs(str(tmp_path / "w/wandb"))]
    rows = run.table("seeds/strategies")
    assert len(rows) == 9 and rows[0]["strategy"] == "lowest"
    assert run.summary["paired/random/test_clean_acc/mean"] == 1.0
    assert run.summary["paired/random/test_clean_acc/ci95_hi"] == pytest.approx(
        1 + 4.302652729749464 / math.sqrt(3)
    )
    assert "paired/highest/test_robust_acc/ci95_lo" not in run.summary  # n = 1


def test_regenerated_corruptions_are_labelled_in_the_strategy_tables() -> None:
    from rift_ray.results import strategy_columns

    regen = [{**s, "corruption_source": "generated"} for s in PER_SEED]
    metrics = {c["metric"] for c in strategy_seed_cells(summary_of(regen))}
    assert "corruption (regenerated)" in metrics and "corruption" not in metrics
    assert "corruption" in {c["metric"] for c in strategy_seed_cells(summary_of(PER_SEED))}
    col = next(c for c in strategy_columns(True) if c.key == "test_corruption_acc")
    assert (col.label, col.short) == ("test corruption (regenerated)", "test corr. (regen.)")
    assert strategy_columns(False)[-1].label == "test corruption"
