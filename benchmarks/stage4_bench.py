"""Stage 4, whole grid vs ``clean_first`` without a test curve, side by side on a stored sweep.

Copies a finished sweep twice, recomputes stage 4 in each (``--restart interpolate``: stages
1-3 and stored AutoAttack shards are reused, so the times are stage 4's own PGD and
corruption evaluations plus Ray's start), and compares wall time, the alpha points measured,
alpha* and the headline figures of every seed.

    RIFT_CIFAR10_ARCHIVE=../shared/data/cifar10-jpeg.tar.gz \\
        python -m benchmarks.stage4_bench sweeps/cifar10-cpu.yaml --sweep results/cifar10-cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine

VARIANTS = {
    "grid": ["interpolate.search=grid", "interpolate.test_curve=true"],
    "clean_first": ["interpolate.search=clean_first", "interpolate.test_curve=false"],
}


def summaries(sweep: Path) -> dict[str, dict[str, Any]]:
    """The per-seed summaries (or the one summary) of a sweep, by seed."""
    seeds = sorted((sweep / "seeds").glob("*/summary.json"))
    files = seeds or [sweep / "summary.json"]
    return {p.parent.name if seeds else "-": json.loads(p.read_text()) for p in files}


def headline(s: dict[str, Any]) -> tuple[Any, ...]:
    test = (s.get("rift") or {}).get("test") or {}
    return (s["trial"], s["alpha"], *(round(test.get(k) or -1, 6) for k in
            ("clean_acc", "robust_acc", "corruption_acc")))  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--sweep", required=True, help="a finished sweep's directory")
    args = ap.parse_args()
    src = Path(args.sweep)
    print(f"machine: {machine()}")
    out: dict[str, dict[str, Any]] = {}
    for name, sets in VARIANTS.items():
        copy = src.parent / f"{src.name}-bench-{name}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(src, copy)
        cmd = ["rift-ray", "sweep", args.config, "--name", copy.name, "--storage",
               str(src.parent), "--restart", "interpolate"]  # fmt: skip
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        wall = time.perf_counter() - t0
        if rc != 0:
            print(f"{name}: rift-ray exited {rc}: {' '.join(cmd)}", file=sys.stderr)
            return 1
        out[name] = {"wall": wall, "seeds": summaries(copy)}
    print("| variant | command wall s | stage 4 s (sum over seeds) | val PGD points | "
          "val clean-only points | test points |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name, r in out.items():
        ss = r["seeds"].values()
        pts = [s.get("interpolate_points") or {} for s in ss]
        print(f"| {name} | {r['wall']:.0f} | {sum(s['seconds']['interpolate'] for s in ss):.0f} "
              f"| {sum(p.get('val_pgd', 0) for p in pts) or 'all'} | "
              f"{sum(p.get('val_clean_only', 0) for p in pts)} | "
              f"{sum(p.get('test', 0) for p in pts) or 'all'} |")  # fmt: skip
    g, c = out["grid"]["seeds"], out["clean_first"]["seeds"]
    same = all(headline(g[k]) == headline(c[k]) for k in g)
    t_g = sum(s["seconds"]["interpolate"] for s in g.values())
    t_c = sum(s["seconds"]["interpolate"] for s in c.values())
    print(
        f"\nstage 4 grid / clean_first: {t_g / t_c:.2f}x; alpha* and test figures "
        f"{'identical' if same else 'DIFFER'} in every seed"
    )
    for k in g:
        print(f"  seed {k}: grid {headline(g[k])}  clean_first {headline(c[k])}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
