"""Mean and standard deviation over the seeds of a ``seeds: [...]`` sweep (no Ray, no I/O).

Each seed's RiFT stages end in a summary of the usual shape (docs/tables.md,
``summary.json``). :func:`seeds_summary` combines them into the sweep's summary::

    {"seeds": [0, 1, 2], "n": 3, "per_seed": [<summary of seed 0>, ...],
     "mean": {"at": {"test": {"clean_acc": 81.2, ...}, ...}, "rift": {...}, "delta": {...},
              "alpha": 0.7, "clean_gain_val": 1.1, "robust_drop_val": 0.0,
              "autoattack": {"at": {"robust_acc": ...}, "rift": {...}}},
     "std": <the same shape: sample standard deviation, null with one value>,
     "count": <the same shape: how many seeds had the figure>,
     "chosen": {"modules": {"layer2.1.conv2": 3}, "lr": {"0.001": 2, "0.005": 1}, "trial": {...}}}

``delta`` is RiFT minus AT per split and metric, computed per seed and then averaged.
``mean``/``std`` have the figure layout of a single summary, so code that shows one
summary's ``at``/``rift`` figures shows their means unchanged.

With several ``finetune.strategies`` (each seed's ``summary["strategies"]`` rows),
:func:`strategies_over_seeds` adds ``"strategies"``: per strategy the same ``mean``/``std``/
``count`` of its best trial (``rift``), its change over the same seed's AT model (``delta``)
and ``alpha``; and per non-primary strategy and test accuracy the paired difference
primary minus that strategy, seed by seed, with a 95% Student t interval over seeds::

    "strategies": {"primary": "lowest",
                   "rows": [{"strategy": "lowest", "primary": true, "n": 3,
                             "mean": {"rift": {"test": {...}, "val": {...}}, "delta": {...},
                                      "alpha": 0.7}, "std": {...}, "count": {...}}, ...],
                   "paired": [{"strategy": "random", "vs": "lowest", "metric": "test_clean_acc",
                               "mean": 0.31, "std": 0.2, "n": 3, "ci95": [-0.19, 0.81]}, ...]}
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

from rift_ray.metrics import ACCURACIES, METRICS, is_finite

SCALARS = ("alpha", "clean_gain_val", "robust_drop_val")
Path = tuple[str, ...]


def figures(summary: dict[str, Any]) -> dict[Path, float]:
    """Every figure of one seed's summary, keyed by its path in the summary."""
    out: dict[Path, float] = {}
    for split in ("val", "test"):
        at = (summary.get("at") or {}).get(split) or {}
        rift = (summary.get("rift") or {}).get(split) or {}
        for k in METRICS:  # those a summary's at / rift lack are skipped
            for who, m in (("at", at), ("rift", rift)):
                if is_finite(m.get(k)):
                    out[(who, split, k)] = float(m[k])
            if is_finite(at.get(k)) and is_finite(rift.get(k)):
                out[("delta", split, k)] = float(rift[k]) - float(at[k])
    for k in SCALARS:
        if is_finite(summary.get(k)):
            out[(k,)] = float(summary[k])
    for who, aa in (summary.get("autoattack") or {}).items():
        for k in ("robust_acc", "clean_acc"):
            if is_finite((aa or {}).get(k)):
                out[("autoattack", who, k)] = float(aa[k])
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator; None for one value)."""
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _set(tree: dict[str, Any], path: Path, value: Any) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _mean_std_count(per_seed_figures: list[dict[Path, float]]) -> dict[str, Any]:
    """``mean``, ``std`` and ``count`` trees of per-seed figures keyed by path."""
    by_path: dict[Path, list[float]] = {}
    for f in per_seed_figures:
        for path, v in f.items():
            by_path.setdefault(path, []).append(v)
    out: dict[str, Any] = {"mean": {}, "std": {}, "count": {}}
    for path, values in by_path.items():
        m, sd = mean_std(values)
        _set(out["mean"], path, m)
        _set(out["std"], path, sd)
        _set(out["count"], path, len(values))
    return out


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``n``, ``mean``, ``std``, ``count`` and ``chosen`` over per-seed summaries (and
    ``strategies`` when the seeds compared several, :func:`strategies_over_seeds`)."""
    stats = _mean_std_count([figures(s) for s in per_seed])

    def counts(key: Any) -> dict[str, int]:
        c = Counter(key(s) for s in per_seed if s.get("trial") is not None)
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    chosen = {
        "modules": counts(lambda s: "+".join(s.get("modules") or [])),
        "lr": counts(lambda s: f"{s.get('lr'):g}"),
        "trial": counts(lambda s: str(s.get("trial"))),
    }
    out = {"n": len(per_seed), **stats, "chosen": chosen}
    # RiFT - AT over seeds: the t interval of the per-seed changes (each seed's own paired
    # interval over images is in its summary)
    deltas: dict[Path, list[float]] = {}
    for s in per_seed:
        for path, v in figures(s).items():
            if path[0] == "delta":
                deltas.setdefault(path, []).append(v)
    ci: dict[str, Any] = {}
    for path, values in deltas.items():
        if len(values) > 1:
            _set(ci, path, mean_ci95(values)["ci95"])
    if ci:
        out["ci95"] = ci
    strategies = strategies_over_seeds(per_seed)
    if strategies is not None:
        out["strategies"] = strategies
    return out


# -- module-selection strategies over seeds --------------------------------------------------

T_975 = (
    12.706204736174705, 4.302652729749464, 3.1824463052837095, 2.7764451051977943,
    2.5705818356363155, 2.44691185114497, 2.3646242515927853, 2.3060041352041667,
    2.2621571627982053, 2.228138851986275, 2.2009851600916397, 2.178812829667229,
    2.1603686564627926, 2.144786687917804, 2.1314495455597755, 2.1199052992212546,
    2.109815577833317, 2.1009220402410387, 2.0930240544083096, 2.085963447265865,
    2.0796138447276804, 2.0738730679040263, 2.0686576104190486, 2.063898561628026,
    2.0595385527532977, 2.055529438642873, 2.0518305164802855, 2.048407141795245,
    2.0452296421327043, 2.042272456301238,
)  # fmt: skip
"""t_{0.975, df} for df = 1..30: the Student t quantile of a two-sided 95% interval, solved
to 16 digits with mpmath (df 1: tan(0.475 pi); df 2: sqrt(1.805 / 0.0975))."""


def t_975(df: int) -> float:
    """The Student t quantile t_{0.975, df} (df >= 1): :data:`T_975` up to 30 degrees of
    freedom; beyond, the Cornish-Fisher expansion around the normal 1.95996 (Abramowitz and
    Stegun 26.7.5; off by less than 2e-6 from df 31 on)."""
    if df < 1:
        raise ValueError(f"t_975: df must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = statistics.NormalDist().inv_cdf(0.975)
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def mean_ci95(values: list[float]) -> dict[str, Any]:
    """``mean``, sample ``std``, ``n`` and the 95% Student t interval of the mean
    ``ci95 = [mean - t s / sqrt(n), mean + t s / sqrt(n)]`` (t with n - 1 degrees of freedom;
    ``std`` and ``ci95`` None for fewer than two values)."""
    m, sd = mean_std(values)
    n = len(values)
    if sd is None:
        return {"mean": m, "std": None, "n": n, "ci95": None}
    half = t_975(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "std": sd, "n": n, "ci95": [m - half, m + half]}


def strategy_figures(summary: dict[str, Any], row: dict[str, Any]) -> dict[Path, float]:
    """The figures of one seed's strategy row (``summary["strategies"]``): its best trial's
    accuracy (``rift``), minus the same seed's AT model (``delta``), and ``alpha``."""
    out: dict[Path, float] = {}
    for split in ("val", "test"):
        at = (summary.get("at") or {}).get(split) or {}
        for k in ACCURACIES:
            v = row.get(f"{split}_{k}")
            if is_finite(v):
                out[("rift", split, k)] = float(v)
                if is_finite(at.get(k)):
                    out[("delta", split, k)] = float(v) - float(at[k])
    if is_finite(row.get("alpha")):
        out[("alpha",)] = float(row["alpha"])
    return out


def strategies_over_seeds(per_seed: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Every strategy's figures over seeds and the paired differences primary minus each
    other strategy (test accuracies, seed by seed); None unless the seeds compared several
    strategies. A strategy's ``n`` counts the seeds that ran it; ``count`` per figure the
    seeds that measured it (a strategy with no feasible trial has no figures that seed)."""
    tables = [(s, s.get("strategies") or []) for s in per_seed]
    names = list(dict.fromkeys(r["strategy"] for _, rows in tables for r in rows))
    if len(names) <= 1:
        return None
    flagged = [r["strategy"] for _, rows in tables for r in rows if r.get("primary")]
    primary = flagged[0] if flagged else next((s.get("primary") for s in per_seed), None)
    by_seed = [{r["strategy"]: strategy_figures(s, r) for r in rows} for s, rows in tables]
    rows = []
    for name in names:
        figs = [f[name] for f in by_seed if name in f]
        rows.append(
            {"strategy": name, "primary": name == primary, "n": len(figs), **_mean_std_count(figs)}
        )
    paired = []
    for name in names:
        if name == primary:
            continue
        for k in ACCURACIES:
            path = ("rift", "test", k)
            diffs = [
                f[primary][path] - f[name][path]
                for f in by_seed
                if path in f.get(primary, {}) and path in f.get(name, {})
            ]
            if diffs:
                paired.append(
                    {"strategy": name, "vs": primary, "metric": f"test_{k}", **mean_ci95(diffs)}
                )
    return {"primary": primary, "rows": rows, "paired": paired}


def diff_text(
    mean: Any, std: Any = None, ci95: Any = None, n: int | None = None, digits: int = 2
) -> str:
    """A difference as ``+0.31 ± 0.20 [-0.19, +0.81] (n=3)``: signed mean, std where there is
    one, the interval where given, n where given; ``-`` without a mean."""
    if not is_finite(mean):
        return "-"
    text = f"{mean:+.{digits}f}" + (f" ± {std:.{digits}f}" if is_finite(std) else "")
    if ci95:
        text += f" [{ci95[0]:+.{digits}f}, {ci95[1]:+.{digits}f}]"
    return text + (f" (n={n})" if n is not None else "")


def strategy_seed_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The strategy comparison of a seeds summary as numbers, one row per strategy and test
    accuracy that some strategy measured: its accuracy and change over AT (mean, std, n) and
    the paired difference primary minus it (``diff_*``, ``ci95_lo``/``ci95_hi``; None on the
    primary's rows). Empty without ``summary["strategies"]``."""
    st = summary.get("strategies")
    if not isinstance(st, dict):
        return []
    paired = {(p["strategy"], p["metric"]): p for p in st.get("paired") or []}
    shown = [
        k for k in ACCURACIES if any(lookup(r, "count", "rift", "test", k) for r in st["rows"])
    ]
    out = []
    for r in st["rows"]:
        for k in shown:
            p = paired.get((r["strategy"], f"test_{k}")) or {}
            ci = p.get("ci95") or [None, None]
            out.append(
                {
                    "strategy": r["strategy"],
                    "primary": r["primary"],
                    "metric": k,
                    "acc_mean": lookup(r, "mean", "rift", "test", k),
                    "acc_std": lookup(r, "std", "rift", "test", k),
                    "delta_mean": lookup(r, "mean", "delta", "test", k),
                    "delta_std": lookup(r, "std", "delta", "test", k),
                    "delta_n": lookup(r, "count", "delta", "test", k),
                    "vs": p.get("vs"),
                    "diff_mean": p.get("mean"),
                    "diff_std": p.get("std"),
                    "diff_n": p.get("n"),
                    "ci95_lo": ci[0],
                    "ci95_hi": ci[1],
                }
            )
    return out


def strategy_seed_cells(summary: dict[str, Any]) -> list[dict[str, str]]:
    """:func:`strategy_seed_rows` as text for the printed summary and the report: strategy
    (``(primary)`` marked), metric, test accuracy and change over AT as mean ± std, and the
    paired difference primary - strategy with its 95% interval and n."""
    primary = lookup(summary, "strategies", "primary")
    regenerated = any(  # eval.corruption_source: generated, a fallback said wherever shown
        s.get("corruption_source") == "generated" for s in summary.get("per_seed") or []
    )
    out = []
    for r in strategy_seed_rows(summary):
        acc = r["acc_mean"]
        out.append(
            {
                "strategy": r["strategy"] + (" (primary)" if r["primary"] else ""),
                "metric": METRICS[r["metric"]]
                + (" (regenerated)" if r["metric"] == "corruption_acc" and regenerated else ""),
                "accuracy": "-"
                if not is_finite(acc)
                else f"{acc:.2f}" + (f" ± {r['acc_std']:.2f}" if is_finite(r["acc_std"]) else ""),
                "change over AT": diff_text(r["delta_mean"], r["delta_std"], n=r["delta_n"]),
                f"{primary} - strategy [95% CI]": ""
                if r["primary"]
                else diff_text(
                    r["diff_mean"],
                    r["diff_std"],
                    None if r["ci95_lo"] is None else [r["ci95_lo"], r["ci95_hi"]],
                    r["diff_n"],
                ),
            }
        )
    return out


def seeds_summary(
    base: dict[str, Any], per_seed: list[dict[str, Any]], seconds: dict[str, float]
) -> dict[str, Any]:
    """The summary of a ``seeds`` sweep: ``base`` (name, seed, seeds, config_hash, versions ...),
    the aggregate, every seed's failures (with its seed) and the per-seed summaries."""
    failures = [{"seed": s.get("seed"), **f} for s in per_seed for f in s.get("failures") or []]
    return {
        **base,
        **aggregate(per_seed),
        "failures": failures,
        "seconds": seconds,
        "per_seed": per_seed,
    }


def is_seeds_summary(summary: dict[str, Any] | None) -> bool:
    """True for the summary of a ``seeds`` sweep (per-seed summaries and their aggregate)."""
    return bool(summary) and "per_seed" in summary  # type: ignore[operator]


def lookup(tree: dict[str, Any] | None, *path: str) -> Any:
    """``tree[path[0]][path[1]]...``, None where any level is missing."""
    cur: Any = tree
    for k in path:
        if not isinstance(cur, dict):
            return None
        cur = cur.get(k)
    return cur


def mean_std_text(summary: dict[str, Any], *path: str, digits: int = 2, n: bool = True) -> str:
    """``81.23 ± 0.45 (n=3)`` for the figure at ``path`` of a seeds summary; ``-`` if absent."""
    m = lookup(summary.get("mean"), *path)
    if not is_finite(m):
        return "-"
    sd = lookup(summary.get("std"), *path)
    k = lookup(summary.get("count"), *path)
    text = f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if is_finite(sd) else "")
    return text + (f" (n={k})" if n and k is not None else "")


__all__ = [
    "T_975",
    "aggregate",
    "diff_text",
    "figures",
    "is_seeds_summary",
    "lookup",
    "mean_ci95",
    "mean_std",
    "mean_std_text",
    "seeds_summary",
    "strategies_over_seeds",
    "strategy_figures",
    "strategy_seed_cells",
    "strategy_seed_rows",
    "t_975",
]
