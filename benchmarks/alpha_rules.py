"""Both alpha* rules on a seeded sweep's stored per-image results: what each keeps on test.

    python benchmarks/alpha_rules.py results/cifar10-cpu-confident [--tolerance 0.1]

For every seed of a ``seeds`` sweep (or the sweep itself) and every surviving fine-tuning
trial, alpha* is chosen on validation by the paper's rule (``select_alpha``, point
estimates) and by the confident rule (``select_alpha_confident``, paired bootstrap
intervals), both from ``tables/per_image.parquet`` (no model is evaluated). Printed per
trial: each rule's alpha* with its validation gain and drop, and the same model's test
clean gain and robust drop against the AT model; then, per rule, how often the test robust
drop stays within the tolerance and the mean test clean gain. The primary strategy's winner
(the sweep's final model) is marked.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from rift_ray.rift.confidence import select_alpha_confident
from rift_ray.rift.interpolate import select_alpha
from rift_ray.stages.per_image import AT_TRIAL, images_of


def seed_dirs(root: Path) -> list[Path]:
    seeds = sorted((root / "seeds").glob("*"), key=lambda p: int(p.name))
    return seeds or [root]


def choices(sweep: Path, tolerance: float) -> list[dict[str, Any]]:
    """One row per (trial, rule): alpha*, validation gain / drop, test gain / drop."""
    rows = pq.read_table(sweep / "tables/per_image.parquet").to_pylist()
    summary = json.loads((sweep / "summary.json").read_text())
    acc = {(r["trial"], r["split"], r["alpha"]): r for r in rows}
    at = {split: images_of(acc[(AT_TRIAL, split, 0.0)]) for split in ("val", "test")}
    out = []
    for trial in sorted({r["trial"] for r in rows} - {AT_TRIAL}):
        alphas = sorted(a for (t, s, a) in acc if t == trial and s == "val")
        points = [{"alpha": 0.0, "clean_acc": 100 * at["val"]["clean"].mean(),
                   "robust_acc": 100 * at["val"]["robust"].mean(), **at["val"]}]  # fmt: skip
        for a in alphas:
            im = images_of(acc[(trial, "val", a)])
            points.append({"alpha": a, "clean_acc": 100 * im["clean"].mean(),
                           "robust_acc": 100 * im["robust"].mean(), **im})  # fmt: skip
        for rule, choose in (
            ("paper", lambda p: select_alpha(p, tolerance=tolerance)),
            ("confident", lambda p: select_alpha_confident(p, tolerance)),
        ):
            c = choose(points)
            a = float(c.alpha or 0.0)
            test = at["test"] if a == 0.0 else images_of(acc[(trial, "test", a)])
            out.append({
                "seed": summary.get("seed"), "trial": trial, "rule": rule, "alpha": a,
                "val_gain": c.clean_gain, "val_drop": c.robust_drop,
                "test_gain": 100 * (test["clean"].mean() - at["test"]["clean"].mean()),
                "test_drop": 100 * (at["test"]["robust"].mean() - test["robust"].mean()),
                "final": trial == summary.get("trial"),
            })  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--tolerance", type=float, default=0.1)
    args = ap.parse_args()
    rows = [r for d in seed_dirs(args.sweep) for r in choices(d, args.tolerance)]
    print("| seed | trial | rule | alpha* | val gain | val drop | test gain | test drop |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mark = " (final)" if r["final"] else ""
        print(f"| {r['seed']} | {r['trial']}{mark} | {r['rule']} | {r['alpha']:g} | "
              f"{r['val_gain']:+.2f} | {r['val_drop']:+.2f} | {r['test_gain']:+.2f} | "
              f"{r['test_drop']:+.2f} |")  # fmt: skip
    print()
    for scope, keep in (("every trial", lambda r: True), ("final models", lambda r: r["final"])):
        for rule in ("paper", "confident"):
            sel = [r for r in rows if r["rule"] == rule and keep(r)]
            moved = [r for r in sel if r["alpha"] > 0]
            within = sum(r["test_drop"] <= args.tolerance + 1e-9 for r in sel)
            print(
                f"{scope}, {rule}: {len(sel)} choices, {len(moved)} with alpha* > 0; test robust "
                f"drop within {args.tolerance:g}: {within}/{len(sel)}; mean test clean gain "
                f"{statistics.fmean(r['test_gain'] for r in sel):+.2f}, mean test robust drop "
                f"{statistics.fmean(r['test_drop'] for r in sel):+.2f}"
            )


if __name__ == "__main__":
    main()
