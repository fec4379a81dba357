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
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from rift_ray.metrics import METRICS, is_finite

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


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """``n``, ``mean``, ``std``, ``count`` and ``chosen`` over per-seed summaries."""
    by_path: dict[Path, list[float]] = {}
    for s in per_seed:
        for path, v in figures(s).items():
            by_path.setdefault(path, []).append(v)
    mean: dict[str, Any] = {}
    std: dict[str, Any] = {}
    count: dict[str, Any] = {}
    for path, values in by_path.items():
        m, sd = mean_std(values)
        _set(mean, path, m)
        _set(std, path, sd)
        _set(count, path, len(values))

    def counts(key: Any) -> dict[str, int]:
        c = Counter(key(s) for s in per_seed if s.get("trial") is not None)
        return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

    chosen = {
        "modules": counts(lambda s: "+".join(s.get("modules") or [])),
        "lr": counts(lambda s: f"{s.get('lr'):g}"),
        "trial": counts(lambda s: str(s.get("trial"))),
    }
    return {"n": len(per_seed), "mean": mean, "std": std, "count": count, "chosen": chosen}


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
    "aggregate",
    "figures",
    "is_seeds_summary",
    "lookup",
    "mean_std",
    "mean_std_text",
    "seeds_summary",
]
